"""Pre-activation ResNets for CIFAR (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

The ImageNet layouts (64-128-256-512 base widths, [2,2,2,2] ... [3,4,23,3] blocks) on 32x32 inputs: a bare 3x3
convolution stem without max-pool, BN-ReLU-conv residual units (Fig. 4e), and a final BN-ReLU before the global
average pooling. When a unit changes the shape, its 1x1 projection shortcut takes the pre-activated input, as in
the authors' fb.resnet.torch ``preresnet.lua``. :class:`PreActBlock` is also the wide basic block of WRN
(``wide_resnet.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kd_lightning.models.registry import Backbone, he_init_, register_backbone
from kd_lightning.models.resnet_cifar import BlockFn, make_stages

__all__ = ["PreActBlock", "PreActBottleneck", "PreActResNet"]


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free convolution with 'same' padding."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)


def bn_relu(channels: int) -> nn.Sequential:
    """Batch norm followed by ReLU: the pre-activation of a unit (and the network's final activation)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class _PreActUnit(nn.Module):
    """``residual(preact(x)) + shortcut``: shortcut is ``x``, or a 1x1 projection of ``preact(x)``.

    Subclasses assign ``self.residual`` (which starts with a convolution and ends with one).
    """

    residual: nn.Module

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.preact = bn_relu(in_channels)
        keeps_shape = stride == 1 and in_channels == out_channels
        self.projection = None if keeps_shape else conv(in_channels, out_channels, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.preact(x)
        shortcut = x if self.projection is None else self.projection(out)
        return self.residual(out) + shortcut


class PreActBlock(_PreActUnit):
    """Pre-activation basic unit: (BN-ReLU-conv3x3) x 2 (He et al. 2016b, Fig. 4e).

    With ``dropout > 0`` it is the wide basic block of WRN (Zagoruyko & Komodakis 2016, Fig. 1d): dropout between
    the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.residual = nn.Sequential(
            conv(in_channels, out_channels, 3, stride),
            bn_relu(out_channels),
            nn.Dropout(dropout),
            conv(out_channels, out_channels, 3),
        )


class PreActBottleneck(_PreActUnit):
    """Pre-activation bottleneck unit: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 (expansion 4)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, stride)
        width = out_channels // 4
        self.residual = nn.Sequential(
            conv(in_channels, width, 1),
            bn_relu(width),
            conv(width, width, 3, stride),
            bn_relu(width),
            conv(width, out_channels, 1),
        )


class PreActResNet(Backbone):
    """Pre-activation ResNet: conv3x3 stem, pre-activation stages, head = BN-ReLU-global average pooling.

    Args:
        block: residual unit, called as ``block(in_channels, out_channels, stride)``.
        depths: number of units per stage.
        widths: output channels of each stage (the feature width ``D`` is the last one).
        num_classes: outputs of the classifier.
        stem_width: output channels of the stem convolution.
    """

    def __init__(
        self, block: BlockFn, depths: Sequence[int], widths: Sequence[int], num_classes: int, stem_width: int = 64
    ) -> None:
        super().__init__()
        self.stem = conv(3, stem_width, 3)
        self.stages = make_stages(block, stem_width, widths, depths)
        self.head = nn.Sequential(bn_relu(widths[-1]), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(widths[-1], num_classes)
        he_init_(self)


_BASIC_WIDTHS = (64, 128, 256, 512)
_BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)


@register_backbone("preact_resnet18")
def preact_resnet18(num_classes: int) -> PreActResNet:
    """PreAct ResNet-18 (He et al. 2016b): [2,2,2,2] basic units, 64-512 channels; 11.2M parameters (100 classes)."""
    return PreActResNet(PreActBlock, (2, 2, 2, 2), _BASIC_WIDTHS, num_classes)


@register_backbone("preact_resnet34")
def preact_resnet34(num_classes: int) -> PreActResNet:
    """PreAct ResNet-34 (He et al. 2016b): [3,4,6,3] basic units, 64-512 channels; 21.3M parameters (100 classes)."""
    return PreActResNet(PreActBlock, (3, 4, 6, 3), _BASIC_WIDTHS, num_classes)


@register_backbone("preact_resnet50")
def preact_resnet50(num_classes: int) -> PreActResNet:
    """PreAct ResNet-50 (He et al. 2016b): [3,4,6,3] bottleneck units, 256-2048 channels; 23.7M parameters (100
    classes)."""
    return PreActResNet(PreActBottleneck, (3, 4, 6, 3), _BOTTLENECK_WIDTHS, num_classes)


@register_backbone("preact_resnet101")
def preact_resnet101(num_classes: int) -> PreActResNet:
    """PreAct ResNet-101 (He et al. 2016b): [3,4,23,3] bottleneck units, 256-2048 channels; 42.7M parameters (100
    classes)."""
    return PreActResNet(PreActBottleneck, (3, 4, 23, 3), _BOTTLENECK_WIDTHS, num_classes)
