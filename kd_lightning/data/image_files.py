"""The image-files base: decoding, datasets of image files and the datamodule base of the datasets stored as files.

:class:`ImageFileDataModule` is what :mod:`kd_lightning.data.imagenet` (ImageNet and any folder of class
sub-folders) and :mod:`kd_lightning.data.transfer` (the transfer-learning datasets) build on: images decoded with
PIL and augmented per sample in the DataLoader workers with the ImageNet recipe of
:mod:`kd_lightning.data.transforms` (:func:`~kd_lightning.data.transforms.imagenet_train_transform`,
:func:`~kd_lightning.data.transforms.imagenet_eval_transform`).

**Unreadable files.** A file that PIL cannot decode (truncated or corrupt JPEG, a non-image with an image
extension, a vanished file) raises :class:`UnreadableImageError`, which names the file. With ``strict=False``
(default) the datamodule's datasets are wrapped in :class:`SkipUnreadable`: such a sample is replaced by the next
readable sample of the same split (so a batch keeps its size and every image keeps its own label), a warning names
the file once per process, and the file is not decoded again. ``strict=True`` lets the error end the run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from typing_extensions import override

from kd_lightning.data.base import ClassificationDataModule
from kd_lightning.data.replay import ResizedCropFlip
from kd_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    imagenet_eval_transform,
    imagenet_train_transform,
)

__all__ = [
    "ImageFileDataModule",
    "ImageFiles",
    "SkipUnreadable",
    "UnreadableImageError",
    "default_num_workers",
    "load_rgb",
    "scan_class_folders",
]

#: How many consecutive unreadable samples :class:`SkipUnreadable` tolerates before it gives up.
MAX_CONSECUTIVE_UNREADABLE = 64


class UnreadableImageError(OSError):
    """An image file that cannot be decoded; the message names the file and says why, ``path`` is the file.

    Constructible from the message alone, so a DataLoader worker's error is re-raised in the main process with its
    own type.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an RGB PIL image (grey, CMYK, palette and alpha images are converted).

    Raises:
        UnreadableImageError: the file is missing, truncated, corrupt or not an image (the message names it).
    """
    try:
        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert("RGB")  # forces the full decode while the file is open
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {type(err).__name__}: {err}", os.fspath(path)) from err


def default_num_workers() -> int:
    """DataLoader workers per process when none are given: the usable CPU cores shared among the visible GPUs (one
    DDP process each), between 1 and 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, torch.cuda.device_count())))


class ImageFiles(Dataset):
    """Image files with labels: ``dataset[i] = (load_rgb(root / paths[i]), labels[i])``, untransformed.

    Paths are kept relative to ``root`` in one NumPy byte-string array and labels in a NumPy array, not as Python
    lists: DataLoader workers only read them, so the pages are not copied by reference counting (with ImageNet's
    1.28M files, a list of ``str`` would be duplicated in every worker).

    Args:
        root: Folder the paths are relative to.
        paths: Relative file paths.
        labels: One integer class label per path.
        loader: Decodes one file (default :func:`load_rgb`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        loader: Callable[[str], Any] = load_rgb,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        self.root = os.fspath(root)
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        """Full path of sample ``index``."""
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.loader(self.path(index)), int(self.labels[index])

    def label_tensor(self) -> Tensor:
        """``(N,)`` long tensor of the labels."""
        return torch.from_numpy(self.labels.copy())

    def subset(self, indices: Tensor | Sequence[int]) -> ImageFiles:
        """The samples ``indices``, as a new :class:`ImageFiles`."""
        index = np.asarray(indices, dtype=np.int64)
        chosen = ImageFiles(self.root, [], [], self.loader)
        chosen.paths, chosen.labels = self.paths[index], self.labels[index]
        return chosen


class SkipUnreadable(Dataset):
    """A dataset whose unreadable samples are replaced by the next readable one (see the module docstring).

    Sample ``i`` that raises :class:`UnreadableImageError` is replaced by sample ``i+1`` (wrapping around; with
    files sorted by class, usually an image of the same class), with its own label. The first failure of a sample
    warns, naming the file and the count of unreadable samples this process has met; the sample is remembered in
    :attr:`unreadable` and not decoded again (each DataLoader worker keeps its own record).

    Args:
        dataset: Any map-style dataset whose loading may raise :class:`UnreadableImageError`.

    Raises:
        RuntimeError: (on access) :data:`MAX_CONSECUTIVE_UNREADABLE` consecutive samples are unreadable.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        #: Indices found unreadable in this process.
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for offset in range(min(n, MAX_CONSECUTIVE_UNREADABLE)):
            i = (index + offset) % n
            if i in self.unreadable:
                continue
            try:
                return self.dataset[i]
            except UnreadableImageError as err:
                self.unreadable.add(i)
                warnings.warn(
                    f"{err}; skipped: sample {i} is replaced by the next readable sample of the same split "
                    f"({len(self.unreadable)} unreadable sample(s) met by this process; strict=True makes this an "
                    "error)",
                    stacklevel=2,
                )
        raise RuntimeError(
            f"{min(n, MAX_CONSECUTIVE_UNREADABLE)} consecutive samples from index {index} are unreadable: check the "
            "dataset's files (the warnings above name them)"
        )


def scan_class_folders(
    folder: str | os.PathLike, what: str = "dataset folder"
) -> tuple[list[str], list[str], list[int]]:
    """The images of a folder of class sub-folders: ``(classes, relative paths, labels)``.

    Classes are the sorted names of the sub-folders (hidden ones, starting with ``.``, are ignored); the images of a
    class are the files with an image extension (``torchvision.datasets.folder.IMG_EXTENSIONS``, any case) anywhere
    below its folder, in sorted order (the rules of torchvision's ``ImageFolder``).

    Args:
        folder: The folder to scan.
        what: How error messages call the folder.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: ``folder`` has no class sub-folders (it is empty, or holds images directly), or a class folder
            holds no image (the message names such folders).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {root} does not exist (or is not a directory)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(1 for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if loose:
            raise ValueError(
                f"{what} {root} holds {loose} images but no class sub-folders: put the images of each class in their "
                f"own sub-folder, {root}/<class>/<image> (ImageNet's flat validation folder is sorted into class "
                "folders by its devkit's valprep.sh, or by torchvision.datasets.ImageNet)"
            )
        raise ValueError(f"{what} {root} is empty: expected one sub-folder of images per class, {root}/<class>/<image>")
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            found += [os.path.join(rel, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if empty:
        shown = ", ".join(str(root / name) for name in empty[:5]) + (
            f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        )
        raise ValueError(
            f"{len(empty)} class folder(s) of {what} {root} hold no image: {shown} (image extensions: "
            f"{', '.join(IMG_EXTENSIONS)}); remove them or add their images"
        )
    return classes, paths, labels


class ImageFileDataModule(ClassificationDataModule):
    """Base of the datamodules over image files: ImageNet-style transforms, unreadable files, worker defaults.

    A subclass gives :attr:`num_classes`, :meth:`_load_train_pool` and :meth:`_load_test_set` (raw PIL samples, e.g.
    :class:`ImageFiles`). The transforms are those of the module docstring; with ``views=2`` the training
    transform runs twice per image (two independent crops and flips).

    Args:
        crop_size: Side of the square crops the network sees (224 for ImageNet).
        resize_size: Evaluation resize (and ``"caffe"`` training squash); None: ``round(crop_size * 256 / 224)``.
        augmentation: ``"inception"`` or ``"caffe"`` (see
            :func:`~kd_lightning.data.transforms.imagenet_train_transform`).
        mean: Per-channel normalisation mean (ImageNet's by default; keep it when fine-tuning ImageNet weights).
        std: Per-channel normalisation standard deviation.
        strict: Raise on the first unreadable image instead of replacing it (see :class:`SkipUnreadable`).
        num_workers: DataLoader workers per process; None: :func:`default_num_workers`. Persistent when > 0.
        batch_size: Training batch size (per process under DDP).
        **kwargs: The other options of :class:`~kd_lightning.data.base.ClassificationDataModule`.
    """

    def __init__(
        self,
        crop_size: int = 224,
        resize_size: int | None = None,
        augmentation: Augmentation = "inception",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        strict: bool = False,
        num_workers: int | None = None,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}.")
        if resize_size is not None and resize_size < crop_size:
            raise ValueError(f"resize_size must be >= crop_size={crop_size} (or None), got {resize_size}.")
        if augmentation not in ("inception", "caffe"):
            raise ValueError(f"augmentation must be 'inception' or 'caffe', got {augmentation!r}.")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {len(mean)} and {len(std)}.")
        super().__init__(
            num_workers=default_num_workers() if num_workers is None else num_workers, batch_size=batch_size, **kwargs
        )
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.augmentation = augmentation
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.strict = strict

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.crop_size, self.crop_size)

    def _train_transform(self) -> Callable | None:
        return imagenet_train_transform(self.crop_size, self.resize_size, self.augmentation, self.mean, self.std)

    def _eval_transform(self) -> Callable | None:
        return imagenet_eval_transform(self.crop_size, self.resize_size, self.augmentation, self.mean, self.std)

    @property
    def recorded_augmentation(self) -> ResizedCropFlip | None:
        """``"inception"``'s RandomResizedCrop and flip as a teacher store records them; None for ``"caffe"`` (not
        recorded: its squash comes before the crop)."""
        if self.augmentation != "inception":
            return None
        return ResizedCropFlip(self.crop_size, self.mean, self.std)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage``; unless ``strict``, wrap them in :class:`SkipUnreadable`."""
        super().setup(stage)
        if not self.strict:
            for name in ("train_set", "raw_train_set", "val_set", "test_set"):
                dataset = getattr(self, name)
                if dataset is not None and not isinstance(dataset, SkipUnreadable):
                    setattr(self, name, SkipUnreadable(dataset))
