"""torchvision's ImageNet ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1).

The networks of ``torchvision.models`` rearranged into the backbone contract: ``stem = conv1-bn1-relu-maxpool``,
``stages = layer1..layer4``, ``head = avgpool-flatten``, ``classifier = fc``. The parameters are torchvision's own
modules, so torchvision's weights load as they are; ``pretrained`` picks them (nothing is downloaded by default).
"""

from __future__ import annotations

from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

from kd_lightning.models.registry import Backbone, register_backbone

__all__ = ["TorchvisionResNet", "resolve_weights"]

_IMAGENET_CLASSES = 1000


class TorchvisionResNet(Backbone):
    """A ``torchvision.models.ResNet`` split into ``stem``, ``stages``, ``head`` and ``classifier``."""

    input_shape = (3, 224, 224)

    def __init__(self, net: models.ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.head = nn.Sequential(net.avgpool, nn.Flatten())
        self.classifier = net.fc


def resolve_weights(arch: str, pretrained: bool | str) -> WeightsEnum | None:
    """torchvision weights of ``arch``: None for False, ``DEFAULT`` for True, else the enum member of that name.

    Raises:
        ValueError: ``pretrained`` names no weights of ``arch`` (the message lists the valid names).
    """
    if pretrained is False:
        return None
    weights = models.get_model_weights(arch)
    name = "DEFAULT" if pretrained is True else pretrained
    if name not in weights.__members__:
        valid = ", ".join(weights.__members__)
        raise ValueError(f"unknown weights {pretrained!r} for {arch}; use True, False or one of: {valid}")
    return weights[name]


def _build(arch: str, num_classes: int, pretrained: bool | str) -> TorchvisionResNet:
    """torchvision's ``arch`` with the chosen weights; a classifier for other than 1000 classes is re-created."""
    weights = resolve_weights(arch, pretrained)
    if weights is None:
        return TorchvisionResNet(models.get_model(arch, weights=None, num_classes=num_classes))
    net = models.get_model(arch, weights=weights)
    if num_classes != _IMAGENET_CLASSES:
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    return TorchvisionResNet(net)


@register_backbone("resnet18")
def resnet18(num_classes: int, pretrained: bool | str = False) -> TorchvisionResNet:
    """ImageNet ResNet-18: [2,2,2,2] basic blocks, 512-d features; 11.7M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False (random init), True (torchvision's ``DEFAULT`` weights) or a weights name such as
            ``"IMAGENET1K_V1"``.
    """
    return _build("resnet18", num_classes, pretrained)


@register_backbone("resnet34")
def resnet34(num_classes: int, pretrained: bool | str = False) -> TorchvisionResNet:
    """ImageNet ResNet-34: [3,4,6,3] basic blocks, 512-d features; 21.8M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name.
    """
    return _build("resnet34", num_classes, pretrained)


@register_backbone("resnet50")
def resnet50(num_classes: int, pretrained: bool | str = False) -> TorchvisionResNet:
    """ImageNet ResNet-50: [3,4,6,3] bottleneck blocks, 2048-d features; 25.6M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name (``"IMAGENET1K_V1"``/``"V2"``).
    """
    return _build("resnet50", num_classes, pretrained)


@register_backbone("resnet101")
def resnet101(num_classes: int, pretrained: bool | str = False) -> TorchvisionResNet:
    """ImageNet ResNet-101: [3,4,23,3] bottleneck blocks, 2048-d features; 44.5M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name.
    """
    return _build("resnet101", num_classes, pretrained)


@register_backbone("resnet152")
def resnet152(num_classes: int, pretrained: bool | str = False) -> TorchvisionResNet:
    """ImageNet ResNet-152: [3,8,36,3] bottleneck blocks, 2048-d features; 60.2M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name.
    """
    return _build("resnet152", num_classes, pretrained)
