"""ResNeXt for CIFAR (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017, Sec. 5.3).

ResNeXt-29 (C x d): a 64-channel conv3x3-BN-ReLU stem, three stages of three grouped bottleneck blocks
(:class:`~kd_lightning.models.resnet_cifar.Bottleneck` with ``groups = C``) whose outputs are 256/512/1024 channels
and whose grouped 3x3 convolutions have ``C * d`` channels in the first stage, doubling at each stage.
"""

from __future__ import annotations

from functools import partial

from kd_lightning.models.registry import register_backbone
from kd_lightning.models.resnet_cifar import Bottleneck, CifarResNet

__all__ = ["resnext29"]


def resnext29(cardinality: int, bottleneck_width: int, num_classes: int) -> CifarResNet:
    """ResNeXt-29 (``cardinality`` x ``bottleneck_width``d) for 32x32 inputs (Xie et al. 2017, Sec. 5.3).

    The first stage's output has 256 channels and its grouped convolution ``cardinality * bottleneck_width``;
    both double at each stage, so the block's inner width is a fixed ratio of its output width.
    """
    block = partial(Bottleneck, width_ratio=cardinality * bottleneck_width / 256, groups=cardinality)
    return CifarResNet(block, (3, 3, 3), (256, 512, 1024), num_classes, stem_width=64)


@register_backbone("resnext29_8x64d")
def resnext29_8x64d(num_classes: int) -> CifarResNet:
    """ResNeXt-29 (8 x 64d): cardinality 8, 512/1024/2048 grouped channels; 34.5M parameters (100 classes)."""
    return resnext29(8, 64, num_classes)
