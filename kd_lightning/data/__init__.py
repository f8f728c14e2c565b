"""Datamodules and transforms."""

from kd_lightning.data.base import ClassificationDataModule, DataProtocol
from kd_lightning.data.cifar import CIFARDataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.fashion_mnist import FashionMNISTDataModule
from kd_lightning.data.image_files import ImageFileDataModule
from kd_lightning.data.imagenet import ImageFolderDataModule
from kd_lightning.data.ptb import PTBDataModule
from kd_lightning.data.small_images import SmallImageDataModule
from kd_lightning.data.synthetic import SyntheticDataModule
from kd_lightning.data.transfer import CUB200DataModule, DTDDataModule, FGVCAircraftDataModule, Flowers102DataModule
from kd_lightning.data.transforms import BatchAugment, TwoViews

__all__ = [
    "BatchAugment",
    "CIFARDataModule",
    "CUB200DataModule",
    "ClassificationDataModule",
    "DTDDataModule",
    "DataProtocol",
    "DigitsDataModule",
    "FGVCAircraftDataModule",
    "FashionMNISTDataModule",
    "Flowers102DataModule",
    "ImageFileDataModule",
    "ImageFolderDataModule",
    "PTBDataModule",
    "SmallImageDataModule",
    "SyntheticDataModule",
    "TwoViews",
]
