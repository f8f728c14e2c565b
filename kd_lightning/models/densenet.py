"""DenseNets for CIFAR (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017, Sec. 3-4).

Three dense blocks on 32x32, 16x16 and 8x8 maps. Each layer adds ``k`` (growth rate) feature maps with
BN-ReLU-conv3x3, preceded in DenseNet-B by a BN-ReLU-conv1x1 bottleneck to ``4k`` maps; transitions are
BN-ReLU-conv1x1-avgpool, compressing the channels by ``theta`` (DenseNet-C; 0.5 in DenseNet-BC). The stem is a 3x3
convolution with 16 channels (``2k`` for DenseNet-BC); dropout, when used, follows every convolution, as in the
authors' Torch code. Stage ``i > 0`` starts with the transition that downsamples into it (as ResNet stages start
with their strided block), so ``stages = [block1, transition1 + block2, transition2 + block3]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd_lightning.models.preact_resnet import bn_relu, conv
from kd_lightning.models.registry import Backbone, he_init_, register_backbone

__all__ = ["DenseLayer", "DenseNet", "Transition"]


class DenseLayer(nn.Module):
    """``x -> cat([x, H(x)])`` where ``H`` makes ``growth_rate`` maps: [BN-ReLU-conv1x1(4k)] BN-ReLU-conv3x3(k)."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool, drop_rate: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if bottleneck:
            layers += [bn_relu(in_channels), conv(in_channels, 4 * growth_rate, 1), nn.Dropout(drop_rate)]
            in_channels = 4 * growth_rate
        layers += [bn_relu(in_channels), conv(in_channels, growth_rate, 3), nn.Dropout(drop_rate)]
        self.new_features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.new_features(x)], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 to ``out_channels``, dropout, 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float) -> None:
        super().__init__(
            bn_relu(in_channels), conv(in_channels, out_channels, 1), nn.Dropout(drop_rate), nn.AvgPool2d(2)
        )


class DenseNet(Backbone):
    """DenseNet(-BC)-``depth``-``growth_rate`` for 32x32 inputs (Huang et al. 2017, Table 2).

    Args:
        depth: total depth ``L``: ``3n + 4`` with ``n`` layers per block, ``6n + 4`` with bottlenecks.
        growth_rate: maps added per layer, ``k``.
        num_classes: outputs of the classifier.
        bottleneck: DenseNet-B layers (conv1x1 to ``4k`` maps before each conv3x3); the stem then has ``2k``
            channels instead of 16.
        compression: transition compression ``theta`` in (0, 1] (DenseNet-BC: 0.5).
        drop_rate: dropout probability after each convolution (0.2 in the paper's runs without augmentation).

    Raises:
        ValueError: ``depth`` does not fit 3 blocks of equal size, or ``compression`` is not in (0, 1].
    """

    def __init__(
        self,
        depth: int,
        growth_rate: int,
        num_classes: int,
        bottleneck: bool = False,
        compression: float = 1.0,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        convs_per_layer = 2 if bottleneck else 1
        if depth < 4 + 3 * convs_per_layer or (depth - 4) % (3 * convs_per_layer):
            raise ValueError(f"DenseNet depth must be {3 * convs_per_layer}n + 4 with n >= 1, got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        layers_per_block = (depth - 4) // (3 * convs_per_layer)
        channels = 2 * growth_rate if bottleneck else 16
        self.stem = conv(3, channels, 3)
        stages = []
        for i in range(3):
            stage: list[nn.Module] = []
            if i > 0:
                compressed = math.floor(compression * channels)
                stage.append(Transition(channels, compressed, drop_rate))
                channels = compressed
            for _ in range(layers_per_block):
                stage.append(DenseLayer(channels, growth_rate, bottleneck, drop_rate))
                channels += growth_rate
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(bn_relu(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        he_init_(self)


@register_backbone("densenet40_12")
def densenet40_12(num_classes: int, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-40, k=12 (Huang et al. 2017): 3 x 12 layers, no bottleneck or compression; 1.06M parameters.

    Args:
        num_classes: outputs of the classifier (parameter count given for 100).
        drop_rate: dropout probability after each convolution.
    """
    return DenseNet(40, 12, num_classes, drop_rate=drop_rate)


@register_backbone("densenet100_12")
def densenet100_12(num_classes: int, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-100, k=12 (Huang et al. 2017): 3 x 32 layers, no bottleneck or compression; 7.08M parameters.

    Args:
        num_classes: outputs of the classifier (parameter count given for 100).
        drop_rate: dropout probability after each convolution.
    """
    return DenseNet(100, 12, num_classes, drop_rate=drop_rate)


@register_backbone("densenet_bc40_12")
def densenet_bc40_12(num_classes: int, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-BC-40, k=12 (Huang et al. 2017; OKDDip's "DenseNet-40-12"): 3 x 6 layers, theta 0.5; 0.19M parameters.

    Args:
        num_classes: outputs of the classifier (parameter count given for 100).
        drop_rate: dropout probability after each convolution.
    """
    return DenseNet(40, 12, num_classes, bottleneck=True, compression=0.5, drop_rate=drop_rate)


@register_backbone("densenet_bc100_12")
def densenet_bc100_12(num_classes: int, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-BC-100, k=12 (Huang et al. 2017): 3 x 16 bottleneck layers, theta 0.5; 0.80M parameters.

    Args:
        num_classes: outputs of the classifier (parameter count given for 100).
        drop_rate: dropout probability after each convolution.
    """
    return DenseNet(100, 12, num_classes, bottleneck=True, compression=0.5, drop_rate=drop_rate)


@register_backbone("densenet_bc190_40")
def densenet_bc190_40(num_classes: int, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-BC-190, k=40 (Huang et al. 2017): 3 x 31 bottleneck layers, theta 0.5; 25.8M parameters.

    Args:
        num_classes: outputs of the classifier (parameter count given for 100).
        drop_rate: dropout probability after each convolution.
    """
    return DenseNet(190, 40, num_classes, bottleneck=True, compression=0.5, drop_rate=drop_rate)
