"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

Post-activation residual blocks on 32x32 inputs: a 3x3 convolution stem, stages whose first block downsamples
(stride 2) from the second stage on, global average pooling. Shortcuts that change shape are a 1x1 convolution
followed by batch norm (option B of the paper), as most knowledge-distillation codebases use.

The blocks and the stage builder here are shared: ResNeXt (``resnext.py``) reuses :class:`Bottleneck` and
:class:`CifarResNet`, the pre-activation networks (``preact_resnet.py``, ``wide_resnet.py``) reuse
:func:`make_stages`. OKDDip's non-standard "ResNet-110" and "WRN-20-8" live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn

from kd_lightning.models.registry import Backbone, he_init_, register_backbone

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "make_stages"]

#: ``block(in_channels, out_channels, stride) -> nn.Module``: one residual block.
BlockFn = Callable[[int, int, int], nn.Module]


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``kernel_size`` x ``kernel_size`` convolution ('same' padding, no bias) followed by batch norm."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=False
    )
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a strided 1x1 convolution + batch norm (option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut, ReLU after the sum (He et al. 2016, Fig. 2 left)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            conv_bn(in_channels, out_channels, 3, stride),
            nn.ReLU(inplace=True),
            conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, optionally grouped), 1x1 expand, each with BN; ReLU after the sum.

    He et al. 2016 (Fig. 5 right) with ``width_ratio=0.25``; ResNeXt's block (Xie et al. 2017, Fig. 3c) with
    ``groups`` = cardinality. The inner width is ``int(out_channels * width_ratio)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, width_ratio: float = 0.25, groups: int = 1
    ) -> None:
        super().__init__()
        width = int(out_channels * width_ratio)
        self.residual = nn.Sequential(
            conv_bn(in_channels, width, 1),
            nn.ReLU(inplace=True),
            conv_bn(width, width, 3, stride, groups),
            nn.ReLU(inplace=True),
            conv_bn(width, out_channels, 1),
        )
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


def make_stages(block: BlockFn, in_channels: int, widths: Sequence[int], depths: Sequence[int]) -> nn.ModuleList:
    """One ``nn.Sequential`` of ``depths[i]`` blocks per stage, ``widths[i]`` output channels each.

    The first block of every stage but the first downsamples (stride 2) and changes the width.
    """
    stages = []
    for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        blocks = [block(in_channels, width, 1 if i == 0 else 2)]
        blocks += [block(width, width, 1) for _ in range(depth - 1)]
        stages.append(nn.Sequential(*blocks))
        in_channels = width
    return nn.ModuleList(stages)


class CifarResNet(Backbone):
    """Post-activation ResNet for 32x32 inputs: conv3x3-BN-ReLU stem, residual stages, global average pooling.

    Args:
        block: residual block, called as ``block(in_channels, out_channels, stride)``.
        depths: number of blocks per stage.
        widths: output channels of each stage (the feature width ``D`` is the last one).
        num_classes: outputs of the classifier.
        stem_width: output channels of the stem convolution.
    """

    def __init__(
        self, block: BlockFn, depths: Sequence[int], widths: Sequence[int], num_classes: int, stem_width: int = 16
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_width, 3), nn.ReLU(inplace=True))
        self.stages = make_stages(block, stem_width, widths, depths)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(widths[-1], num_classes)
        he_init_(self)


def _resnet(blocks_per_stage: int, num_classes: int) -> CifarResNet:
    """He et al.'s CIFAR ResNet of depth ``6 * blocks_per_stage + 2`` (16/32/64 channels)."""
    return CifarResNet(BasicBlock, (blocks_per_stage,) * 3, (16, 32, 64), num_classes)


@register_backbone("resnet8_w8")
def resnet8_w8(num_classes: int) -> CifarResNet:
    """A CPU-sized CIFAR ResNet: 3 x 1 basic blocks with 8/16/32 channels (ResNet-8 at half width), for quick runs."""
    return CifarResNet(BasicBlock, (1, 1, 1), (8, 16, 32), num_classes, stem_width=8)


@register_backbone("resnet20")
def resnet20(num_classes: int) -> CifarResNet:
    """ResNet-20 (He et al. 2016): 3 x 3 basic blocks, 16/32/64 channels; 0.28M parameters (100 classes)."""
    return _resnet(3, num_classes)


@register_backbone("resnet32")
def resnet32(num_classes: int) -> CifarResNet:
    """ResNet-32 (He et al. 2016): 3 x 5 basic blocks, 16/32/64 channels; 0.47M parameters (100 classes)."""
    return _resnet(5, num_classes)


@register_backbone("resnet44")
def resnet44(num_classes: int) -> CifarResNet:
    """ResNet-44 (He et al. 2016): 3 x 7 basic blocks, 16/32/64 channels; 0.67M parameters (100 classes)."""
    return _resnet(7, num_classes)


@register_backbone("resnet56")
def resnet56(num_classes: int) -> CifarResNet:
    """ResNet-56 (He et al. 2016): 3 x 9 basic blocks, 16/32/64 channels; 0.86M parameters (100 classes)."""
    return _resnet(9, num_classes)


@register_backbone("resnet110")
def resnet110(num_classes: int) -> CifarResNet:
    """ResNet-110 (He et al. 2016): 3 x 18 basic blocks, 16/32/64 channels; 1.74M parameters (100 classes)."""
    return _resnet(18, num_classes)


@register_backbone("okddip_resnet110")
def okddip_resnet110(num_classes: int) -> CifarResNet:
    """OKDDip's "ResNet-110" (Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020).

    Follows the authors' code (``models/model_cifar/resnet.py``), not He et al.'s ResNet-110: 3 x 12 bottleneck
    blocks (expansion 4) with inner widths 16/32/64 and outputs 64/128/256, so features are 256-d;
    1.17M parameters (100 classes).
    """
    return CifarResNet(partial(Bottleneck, width_ratio=0.25), (12, 12, 12), (64, 128, 256), num_classes)


@register_backbone("okddip_wrn_20_8")
def okddip_wrn_20_8(num_classes: int) -> CifarResNet:
    """OKDDip's "WRN-20-8" (Chen et al., AAAI 2020), the authors' ``wide_resnet20_8``.

    Follows the authors' code, not Zagoruyko & Komodakis' WRN: a post-activation bottleneck ResNet with 3 x 2
    blocks whose inner widths are 8x the standard ones (128/256/512) and whose outputs are 64/128/256, so
    features are 256-d; 6.87M parameters (100 classes).
    """
    return CifarResNet(partial(Bottleneck, width_ratio=2.0), (2, 2, 2), (64, 128, 256), num_classes)
