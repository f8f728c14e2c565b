"""Method modules: one LightningModule per method, all built on :class:`ClassifierModule`."""

from kd_lightning.modules.class_targets import ClassTargetTable, TopKClassTargetTable
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule, KDStudentModule
from kd_lightning.modules.dups import DUPSModule, StagedDistillModule
from kd_lightning.modules.generations import GenerationModule, eta_from_confidence
from kd_lightning.modules.group_baselines import CLILRModule, DMLModule, ONEModule
from kd_lightning.modules.language_model import (
    LanguageModelDistillModule,
    LanguageModelDUPSModule,
    LanguageModelMixin,
    LanguageModelModule,
)
from kd_lightning.modules.okddip import OKDDipModule
from kd_lightning.modules.self_distill import SelfDistillModule
from kd_lightning.modules.snapshot import SnapshotDistillModule
from kd_lightning.modules.student_group import StudentGroupModule
from kd_lightning.modules.teacher import FrozenNetworks, FrozenTeacher

__all__ = [
    "CLILRModule",
    "ClassTargetTable",
    "ClassifierModule",
    "DMLModule",
    "DUPSModule",
    "DistillModule",
    "FrozenNetworks",
    "FrozenTeacher",
    "GenerationModule",
    "KDStudentModule",
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
