"""VGG for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks", ICLR 2015, configuration D).

The CIFAR variant used throughout the distillation literature: the 13 3x3 convolutions of VGG-16, each followed
by batch norm (Ioffe & Szegedy 2015) and ReLU, five 2x2 max-pools that take 32x32 inputs down to 1x1x512, and a
single linear classifier instead of the three ImageNet fully connected layers. The stem is empty and the five
stages end at the max-pools; the head only flattens.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kd_lightning.models.registry import Backbone, he_init_, register_backbone

__all__ = ["VGG"]

#: Output channels of the convolutions of each stage of VGG-16 (configuration D); each stage ends in a max-pool.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg_stage(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """(conv3x3-BN-ReLU) for each width, then a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class VGG(Backbone):
    """VGG with batch norm for 32x32 inputs: stages of conv-BN-ReLU ending in max-pools, a linear classifier.

    Args:
        stage_widths: output channels of the convolutions, one tuple per stage.
        num_classes: outputs of the classifier.
    """

    def __init__(self, stage_widths: Sequence[Sequence[int]], num_classes: int) -> None:
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in stage_widths[:-1]]
        self.stem = nn.Identity()
        self.stages = nn.ModuleList(vgg_stage(c, widths) for c, widths in zip(in_channels, stage_widths, strict=True))
        self.head = nn.Flatten()
        self.classifier = nn.Linear(stage_widths[-1][-1], num_classes)
        he_init_(self)


@register_backbone("vgg16")
def vgg16(num_classes: int) -> VGG:
    """VGG-16 with BN for CIFAR: 13 conv layers (64-512 channels), 5 stages; 14.8M parameters (100 classes)."""
    return VGG(VGG16_STAGES, num_classes)
