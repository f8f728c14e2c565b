"""ImageNet (ILSVRC-2012) in its train/val folder layout, and any image dataset stored as class sub-folders.

The images are decoded, augmented and guarded against unreadable files by the image-files base
(:mod:`kd_lightning.data.image_files`) with the ImageNet recipe of :mod:`kd_lightning.data.transforms`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from kd_lightning.data.image_files import ImageFileDataModule, ImageFiles, scan_class_folders
from kd_lightning.data.subsets import stratified_split

__all__ = ["ImageFolderDataModule"]

#: Names this module defined before the image-files base moved out (kd-lightning 0.1), and their new modules.
_MOVED = {
    **dict.fromkeys(
        ("IMAGENET_MEAN", "IMAGENET_STD", "Augmentation", "imagenet_eval_transform", "imagenet_train_transform"),
        "kd_lightning.data.transforms",
    ),
    **dict.fromkeys(
        (
            "ImageFileDataModule",
            "ImageFiles",
            "MAX_CONSECUTIVE_UNREADABLE",
            "SkipUnreadable",
            "UnreadableImageError",
            "default_num_workers",
            "load_rgb",
            "scan_class_folders",
        ),
        "kd_lightning.data.image_files",
    ),
}


def __getattr__(name: str) -> Any:
    """The names that moved to :mod:`~kd_lightning.data.image_files` and :mod:`~kd_lightning.data.transforms`,
    with a FutureWarning (deprecated aliases, removed in the next release)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} moved to {_MOVED[name]}.{name}; the old import path is deprecated and will be removed "
        "in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)


class ImageFolderDataModule(ImageFileDataModule):
    """ImageNet (ILSVRC-2012) in its train/val folder layout, or any image dataset as folders of class sub-folders.

    Two layouts are read:

    * ``root/<train_dir>/<class>/<image>`` and, optionally, ``root/<test_dir>/<class>/<image>`` (ImageNet:
      ``train/n01440764/n01440764_10026.JPEG`` ... and ``val/n01440764/ILSVRC2012_val_00000293.JPEG`` ...,
      the validation images sorted into class folders: ImageNet's validation folder is the test set);
    * ``root/<class>/<image>`` when ``root/<train_dir>`` does not exist (a custom dataset).

    Classes are the sorted class-folder names of the training folder (:attr:`classes`); a ``test_dir`` class must be
    one of them. The splits:

    * **test** (Lightning's ``test`` loop, what the papers report): the ``test_dir`` folder (ImageNet's 50,000
      validation images); without one, ``test_size`` images held out of the training images (stratified, seeded
      by ``test_split_seed``, so the test set does not move with ``split_seed``);
    * **validation**: ``val_size`` images held out of the remaining training images (stratified, seeded by
      ``split_seed``); or, with ``validate_on_test_set=True``, the test set itself, the ImageNet habit of watching
      the validation folder's accuracy every epoch (fine for curves, not for choosing a checkpoint);
    * **training**: the rest.

    Args:
        root: The dataset folder.
        train_dir: Sub-folder of the training images (ignored when it does not exist: ``root`` is the training
            pool).
        test_dir: Sub-folder of the held-out images used as the test set, when it exists (ImageNet: ``val``).
        test_size: Images held out of the training images as the test set when there is no ``test_dir`` folder
            (0: no test set; ``test`` then raises).
        test_split_seed: Seed of that test split.
        validate_on_test_set: Run the validation loop on the test set (requires ``val_size=0``).
        val_dir: Deprecated name of ``test_dir`` (a FutureWarning; removed in the next release).
        **kwargs: The options of :class:`~kd_lightning.data.image_files.ImageFileDataModule` (crops,
            normalisation, ``strict``, workers) and :class:`~kd_lightning.data.base.ClassificationDataModule`
            (batch sizes, ``val_size``, seeds, ``views``).

    Raises:
        ValueError: ``test_size < 0``, ``validate_on_test_set`` with ``val_size > 0``, or ``val_dir`` and
            ``test_dir`` naming different folders; at set-up, the errors of
            :func:`~kd_lightning.data.image_files.scan_class_folders`, a training folder with a single class, a
            ``test_dir`` class the training folder lacks, a ``test_dir`` folder without a ``train_dir`` one, a
            ``test_size`` that leaves no training images, or no test images for ``test``.
        FileNotFoundError: (at set-up) ``root`` does not exist.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        train_dir: str = "train",
        test_dir: str = "val",
        test_size: int = 0,
        test_split_seed: int = 0,
        validate_on_test_set: bool = False,
        *,
        val_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {test_size}.")
        super().__init__(**kwargs)
        if validate_on_test_set and self.val_size > 0:
            raise ValueError(
                "validate_on_test_set=True validates on the test set: it needs val_size=0, got "
                f"val_size={self.val_size}."
            )
        if val_dir is not None:
            _warn_renamed("val_dir", "test_dir", "the folder holds the test set")
            if test_dir not in ("val", val_dir):
                raise ValueError(f"val_dir={val_dir!r} is the old name of test_dir={test_dir!r}: give only test_dir.")
            test_dir = val_dir
        self.root = str(root)
        self.train_dir = train_dir
        self.test_dir = test_dir
        self.test_size = test_size
        self.test_split_seed = test_split_seed
        self.validate_on_test_set = validate_on_test_set
        self._scanned: tuple[list[str], ImageFiles, ImageFiles | None] | None = None

    @property
    def train_folder(self) -> str:
        """The folder of the training images: ``root/<train_dir>`` if it exists, else ``root``."""
        nested = os.path.join(self.root, self.train_dir)
        return nested if os.path.isdir(nested) else self.root

    @property
    def test_folder(self) -> str | None:
        """The folder of the test images, ``root/<test_dir>``, or None when it does not exist."""
        if self.train_folder == self.root:
            return None
        folder = os.path.join(self.root, self.test_dir)
        return folder if os.path.isdir(folder) else None

    @property
    def val_dir(self) -> str:
        """Deprecated name of :attr:`test_dir`."""
        _warn_renamed("val_dir", "test_dir", "the folder holds the test set")
        return self.test_dir

    @property
    def val_folder(self) -> str | None:
        """Deprecated name of :attr:`test_folder`."""
        _warn_renamed("val_folder", "test_folder", "the folder holds the test set")
        return self.test_folder

    def _scan(self) -> tuple[list[str], ImageFiles, ImageFiles | None]:
        """``(classes, training pool, test set or None)``, scanned once."""
        if self._scanned is None:
            classes, pool = self._scan_training_folder()
            test: ImageFiles | None = None
            if self.test_folder is not None:
                test = self._scan_test_folder(self.test_folder, classes)
            elif self.test_size > 0:
                if self.test_size >= len(pool):
                    raise ValueError(f"test_size={self.test_size} leaves no training images (there are {len(pool)}).")
                rest, held = stratified_split(
                    pool.label_tensor(), self.test_size, torch.Generator().manual_seed(self.test_split_seed)
                )
                pool, test = pool.subset(rest), pool.subset(held)
            self._scanned = (classes, pool, test)
        return self._scanned

    def _scan_training_folder(self) -> tuple[list[str], ImageFiles]:
        """``(classes, training pool)`` of the training folder (see :func:`scan_class_folders`)."""
        train_folder = self.train_folder
        if train_folder == self.root and os.path.isdir(os.path.join(self.root, self.test_dir)):
            raise ValueError(
                f"{self.root} has a {self.test_dir!r} folder but no {self.train_dir!r} folder: put the training "
                f"images in {os.path.join(self.root, self.train_dir)}/<class>/ (or set train_dir)"
            )
        what = "training folder" if train_folder != self.root else "dataset folder"
        classes, paths, labels = scan_class_folders(train_folder, what)
        if len(classes) < 2:
            raise ValueError(
                f"{what} {train_folder} has a single class folder, {classes[0]!r}: classification needs at least 2 "
                f"classes, one sub-folder of images per class ({train_folder}/<class>/<image>)"
            )
        return classes, ImageFiles(train_folder, paths, labels)

    def _scan_test_folder(self, folder: str, classes: list[str]) -> ImageFiles:
        """The test images of ``folder``, labelled by the training folder's ``classes``."""
        test_classes, paths, labels = scan_class_folders(folder, "test folder")
        index = {name: i for i, name in enumerate(classes)}
        unknown = [name for name in test_classes if name not in index]
        if unknown:
            raise ValueError(
                f"test folder {folder} has {len(unknown)} class folder(s) that the training folder "
                f"{self.train_folder} lacks: {', '.join(unknown[:5])}"
            )
        return ImageFiles(folder, paths, [index[test_classes[label]] for label in labels])

    @property
    def classes(self) -> list[str]:
        """Class names (the sorted class-folder names); class ``i`` is ``classes[i]``."""
        return self._scan()[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        pool = self._scan()[1]
        return pool, pool.label_tensor()

    def _load_test_set(self) -> Dataset:
        test = self._scan()[2]
        if test is None:
            raise ValueError(
                f"{self.root} has no test images: there is no {os.path.join(self.root, self.test_dir)} folder and "
                "test_size=0; pass test_size=N to hold out N training images as the test set"
            )
        return test

    @override
    def val_dataloader(self) -> Any:
        """The validation loader: the held-out split, the test set (``validate_on_test_set``), or ``[]``."""
        if self.validate_on_test_set:
            return self.test_dataloader()
        return super().val_dataloader()


def _warn_renamed(old: str, new: str, why: str) -> None:
    warnings.warn(
        f"ImageFolderDataModule's {old} is deprecated ({why}): use {new}; {old} will be removed in the next release",
        FutureWarning,
        stacklevel=3,
    )
