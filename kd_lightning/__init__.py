"""kd-lightning: knowledge-distillation methods as PyTorch Lightning modules.

The public API: method modules, callbacks, datamodules, the backbone registry, :func:`load_module`, and the export
and prediction of a trained method's network.
"""

from kd_lightning.callbacks import NTASGD, DistillDiagnostics, GenerationalKD, RNGStateCheckpoint
from kd_lightning.checkpoints import load_module
from kd_lightning.data import (
    CIFARDataModule,
    ClassificationDataModule,
    CUB200DataModule,
    DigitsDataModule,
    DTDDataModule,
    FashionMNISTDataModule,
    FGVCAircraftDataModule,
    Flowers102DataModule,
    ImageFolderDataModule,
    PTBDataModule,
    SyntheticDataModule,
    TwoViews,
)
from kd_lightning.export import export_checkpoint, inference_network
from kd_lightning.models import Backbone, create_backbone, list_backbones, register_backbone
from kd_lightning.modules import (
    ClassifierModule,
    ClassTargetTable,
    CLILRModule,
    DistillModule,
    DMLModule,
    DUPSModule,
    FrozenNetworks,
    FrozenTeacher,
    GenerationModule,
    KDStudentModule,
    LanguageModelDistillModule,
    LanguageModelDUPSModule,
    LanguageModelModule,
    OKDDipModule,
    ONEModule,
    SelfDistillModule,
    SnapshotDistillModule,
    StudentGroupModule,
    TopKClassTargetTable,
)
from kd_lightning.optim import DelayedExponentialLR, LanguageModelSGD, NesterovSGD, cyclic_cosine, warmup_cosine
from kd_lightning.predict import predict_images

__version__ = "0.1.0"

__all__ = [
    "NTASGD",
    "Backbone",
    "CIFARDataModule",
    "CLILRModule",
    "CUB200DataModule",
    "ClassTargetTable",
    "ClassificationDataModule",
    "ClassifierModule",
    "DMLModule",
    "DTDDataModule",
    "DUPSModule",
    "DelayedExponentialLR",
    "DigitsDataModule",
    "DistillDiagnostics",
    "DistillModule",
    "FGVCAircraftDataModule",
    "FashionMNISTDataModule",
    "Flowers102DataModule",
    "FrozenNetworks",
    "FrozenTeacher",
    "GenerationModule",
    "GenerationalKD",
    "ImageFolderDataModule",
    "KDStudentModule",
    "LanguageModelDUPSModule",
    "LanguageModelDistillModule",
    "LanguageModelModule",
    "LanguageModelSGD",
    "NesterovSGD",
    "OKDDipModule",
    "ONEModule",
    "PTBDataModule",
    "RNGStateCheckpoint",
    "SelfDistillModule",
    "SnapshotDistillModule",
    "StudentGroupModule",
    "SyntheticDataModule",
    "TopKClassTargetTable",
    "TwoViews",
    "create_backbone",
    "cyclic_cosine",
    "export_checkpoint",
    "inference_network",
    "list_backbones",
    "load_module",
    "predict_images",
    "register_backbone",
    "warmup_cosine",
]
