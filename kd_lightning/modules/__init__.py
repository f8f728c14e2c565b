"""Method modules: one LightningModule per method, all built on :class:`ClassifierModule`."""

from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.components import ClassTargetTable, FrozenTeacher
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.dups import DUPSModule, StagedDistillModule
from kd_lightning.modules.generations import GenerationModule, eta_from_confidence
from kd_lightning.modules.snapshot import SnapshotDistillModule

__all__ = [
    "ClassTargetTable",
    "ClassifierModule",
    "DUPSModule",
    "DistillModule",
    "FrozenTeacher",
    "GenerationModule",
    "SnapshotDistillModule",
    "StagedDistillModule",
    "eta_from_confidence",
]
