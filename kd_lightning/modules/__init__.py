"""Method modules: one LightningModule per method, all built on :class:`ClassifierModule`."""

from kd_lightning.modules.class_targets import ClassTargetTable, TopKClassTargetTable
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.dups import DUPSModule, StagedDistillModule
from kd_lightning.modules.generations import GenerationModule, eta_from_confidence
from kd_lightning.modules.language_model import (
    LanguageModelDistillModule,
    LanguageModelDUPSModule,
    LanguageModelMixin,
    LanguageModelModule,
)
from kd_lightning.modules.okddip import (
    CLILRModule,
    DMLModule,
    OKDDipModule,
    ONEModule,
    StudentGroupModule,
)
from kd_lightning.modules.self_distill import SelfDistillModule
from kd_lightning.modules.snapshot import SnapshotDistillModule
from kd_lightning.modules.teacher import FrozenTeacher

__all__ = [
    "CLILRModule",
    "ClassTargetTable",
    "ClassifierModule",
    "DMLModule",
    "DUPSModule",
    "DistillModule",
    "FrozenTeacher",
    "GenerationModule",
    "LanguageModelDUPSModule",
    "LanguageModelDistillModule",
    "LanguageModelMixin",
    "LanguageModelModule",
    "OKDDipModule",
    "ONEModule",
    "SelfDistillModule",
    "SnapshotDistillModule",
    "StagedDistillModule",
    "StudentGroupModule",
    "TopKClassTargetTable",
    "eta_from_confidence",
]
