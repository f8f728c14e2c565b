"""Backbones; importing this package registers every built-in backbone."""

from kd_lightning.models import (  # noqa: F401  (imported to register their backbones)
    densenet,
    library,
    mlp,
    preact_resnet,
    resnet_cifar,
    resnext,
    torchvision_models,
    vgg,
    wide_resnet,
)
from kd_lightning.models.branches import StudentGroup
from kd_lightning.models.registry import Backbone, create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "StudentGroup", "create_backbone", "list_backbones", "register_backbone"]
