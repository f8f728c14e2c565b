"""torchvision's ImageNet ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1).

The networks of ``torchvision.models`` rearranged into the backbone contract by
:mod:`kd_lightning.models.library` (these names are ``torchvision/resnet18`` ... registered under their short
names): ``stem = conv1-bn1-relu-maxpool``, ``stages = layer1..layer4``, ``head = avgpool-flatten``,
``classifier = fc``. The parameters are torchvision's own modules, so torchvision's weights load as they are;
``pretrained`` picks them (nothing is downloaded by default).
"""

from __future__ import annotations

from kd_lightning.models.library import LibraryBackbone, resolve_weights, torchvision_backbone
from kd_lightning.models.registry import register_backbone

__all__ = ["resolve_weights"]


def _build(arch: str, num_classes: int, pretrained: bool | str) -> LibraryBackbone:
    """torchvision's ``arch`` as ``torchvision/<arch>`` builds it, with the chosen weights."""
    return torchvision_backbone(arch, num_classes, pretrained)


@register_backbone("resnet18")
def resnet18(num_classes: int, pretrained: bool | str = False) -> LibraryBackbone:
    """ImageNet ResNet-18: [2,2,2,2] basic blocks, 512-d features; 11.7M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False (random init), True (torchvision's ``DEFAULT`` weights) or a weights name such as
            ``"IMAGENET1K_V1"``.
    """
    return _build("resnet18", num_classes, pretrained)


@register_backbone("resnet34")
def resnet34(num_classes: int, pretrained: bool | str = False) -> LibraryBackbone:
    """ImageNet ResNet-34: [3,4,6,3] basic blocks, 512-d features; 21.8M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name.
    """
    return _build("resnet34", num_classes, pretrained)


@register_backbone("resnet50")
def resnet50(num_classes: int, pretrained: bool | str = False) -> LibraryBackbone:
    """ImageNet ResNet-50: [3,4,6,3] bottleneck blocks, 2048-d features; 25.6M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name (``"IMAGENET1K_V1"``/``"V2"``).
    """
    return _build("resnet50", num_classes, pretrained)


@register_backbone("resnet101")
def resnet101(num_classes: int, pretrained: bool | str = False) -> LibraryBackbone:
    """ImageNet ResNet-101: [3,4,23,3] bottleneck blocks, 2048-d features; 44.5M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name.
    """
    return _build("resnet101", num_classes, pretrained)


@register_backbone("resnet152")
def resnet152(num_classes: int, pretrained: bool | str = False) -> LibraryBackbone:
    """ImageNet ResNet-152: [3,8,36,3] bottleneck blocks, 2048-d features; 60.2M parameters (1000 classes).

    Args:
        num_classes: outputs of the classifier (re-created after loading weights when not 1000).
        pretrained: False, True (``DEFAULT`` weights) or a torchvision weights name.
    """
    return _build("resnet152", num_classes, pretrained)
