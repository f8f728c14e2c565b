"""Image-file datamodules: ImageNet's train/val folders and any folder of class sub-folders.

Images are decoded with PIL and augmented per sample in the DataLoader workers, the way of the PyTorch ImageNet
example that the papers follow (DUPS Sec. 4.2: "the same way as the Pytorch official examples"):

* training, ``augmentation="inception"`` (default): ``RandomResizedCrop(crop_size)`` (scale 0.08-1, aspect 3/4-4/3)
  and a horizontal flip; ``augmentation="caffe"``: the image squashed to ``resize_size x resize_size``, a random
  ``crop_size`` crop and a flip (the Caffe ImageNet preprocessing of Xu & Liu's self-distillation, Sec. "Extension
  to large-scale classification task");
* evaluation: the shorter side resized to ``resize_size`` and the central ``crop_size`` crop (``"caffe"``: the
  squashed ``resize_size`` square, then the central crop);
* then scaling to [0, 1] and normalisation with the ImageNet channel statistics (:data:`IMAGENET_MEAN`,
  :data:`IMAGENET_STD`).

``resize_size`` defaults to ``round(crop_size * 256 / 224)`` (256 for 224), so small crops (the tests run at 32 px)
keep the ratio.

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
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from typing_extensions import override

from kd_lightning.data.base import ClassificationDataModule, stratified_split

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFileDataModule",
    "ImageFiles",
    "ImageFolderDataModule",
    "SkipUnreadable",
    "UnreadableImageError",
    "default_num_workers",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_rgb",
    "scan_class_folders",
]

#: Per-channel mean and standard deviation of the ImageNet training images in [0, 1] (torchvision's values).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: How many consecutive unreadable samples :class:`SkipUnreadable` tolerates before it gives up.
MAX_CONSECUTIVE_UNREADABLE = 64

Augmentation = Literal["inception", "caffe"]


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


def imagenet_train_transform(
    crop_size: int = 224,
    resize_size: int | None = None,
    augmentation: Augmentation = "inception",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Per-sample training augmentation of a PIL image (see the module docstring), to a normalised float32 tensor.

    Args:
        crop_size: Side of the square crop the network sees.
        resize_size: Side the image is squashed to before the random crop (``"caffe"`` only); None:
            ``round(crop_size * 256 / 224)``.
        augmentation: ``"inception"`` (RandomResizedCrop + flip) or ``"caffe"`` (squash, random crop + flip).
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
    """
    if augmentation == "inception":
        geometry: list[torch.nn.Module] = [v2.RandomResizedCrop(crop_size, antialias=True)]
    else:
        geometry = [v2.Resize((_resize(crop_size, resize_size),) * 2, antialias=True), v2.RandomCrop(crop_size)]
    return v2.Compose([*geometry, v2.RandomHorizontalFlip(), *_to_normalised_tensor(mean, std)])


def imagenet_eval_transform(
    crop_size: int = 224,
    resize_size: int | None = None,
    augmentation: Augmentation = "inception",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Per-sample evaluation transform: ``Resize(resize_size)`` (shorter side; ``"caffe"``: a square) + central crop.

    Args:
        crop_size: Side of the central crop.
        resize_size: Shorter side (``"caffe"``: side of the square) before cropping; None:
            ``round(crop_size * 256 / 224)``.
        augmentation: The training augmentation this evaluation goes with (``"inception"`` or ``"caffe"``).
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
    """
    side = _resize(crop_size, resize_size)
    resize = v2.Resize(side if augmentation == "inception" else (side, side), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(crop_size), *_to_normalised_tensor(mean, std)])


def _resize(crop_size: int, resize_size: int | None) -> int:
    return round(crop_size * 256 / 224) if resize_size is None else resize_size


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[torch.nn.Module]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


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


class ImageFileDataModule(ClassificationDataModule):
    """Base of the datamodules over image files: ImageNet-style transforms, unreadable files, worker defaults.

    A subclass gives :attr:`num_classes`, :meth:`_load_train_pool` and :meth:`_load_test_set` (raw PIL samples, e.g.
    :class:`ImageFiles`). The transforms are those of the module docstring; with ``views=2`` the training
    transform runs twice per image (two independent crops and flips).

    Args:
        crop_size: Side of the square crops the network sees (224 for ImageNet).
        resize_size: Evaluation resize (and ``"caffe"`` training squash); None: ``round(crop_size * 256 / 224)``.
        augmentation: ``"inception"`` or ``"caffe"`` (see :func:`imagenet_train_transform`).
        mean: Per-channel normalisation mean (ImageNet's by default; keep it when fine-tuning ImageNet weights).
        std: Per-channel normalisation standard deviation.
        strict: Raise on the first unreadable image instead of replacing it (see :class:`SkipUnreadable`).
        num_workers: DataLoader workers per process; None: :func:`default_num_workers`. Persistent when > 0.
        batch_size: See :class:`~kd_lightning.data.base.ClassificationDataModule` (per process under DDP).
        eval_batch_size: Idem.
        pin_memory: Idem (None: pinned iff CUDA is available).
        val_size: Idem.
        split_seed: Idem.
        shuffle_seed: Idem.
        views: Idem.
        drop_last: Idem.
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
        eval_batch_size: int | None = None,
        pin_memory: bool | None = None,
        val_size: int = 0,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        views: int = 1,
        drop_last: bool = False,
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
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=default_num_workers() if num_workers is None else num_workers,
            pin_memory=pin_memory,
            val_size=val_size,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            views=views,
            drop_last=drop_last,
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

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage``; unless ``strict``, wrap them in :class:`SkipUnreadable`."""
        super().setup(stage)
        if not self.strict:
            for name in ("train_set", "val_set", "test_set"):
                dataset = getattr(self, name)
                if dataset is not None and not isinstance(dataset, SkipUnreadable):
                    setattr(self, name, SkipUnreadable(dataset))


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


class ImageFolderDataModule(ImageFileDataModule):
    """ImageNet (ILSVRC-2012) in its train/val folder layout, or any image dataset as folders of class sub-folders.

    Two layouts are read:

    * ``root/<train_dir>/<class>/<image>`` and, optionally, ``root/<val_dir>/<class>/<image>`` (ImageNet:
      ``train/n01440764/n01440764_10026.JPEG`` ... and ``val/n01440764/ILSVRC2012_val_00000293.JPEG`` ...,
      the validation images sorted into class folders);
    * ``root/<class>/<image>`` when ``root/<train_dir>`` does not exist (a custom dataset).

    Classes are the sorted class-folder names of the training folder (:attr:`classes`); a ``val_dir`` class must be
    one of them. The splits:

    * **test** (Lightning's ``test`` loop, what the papers report): the ``val_dir`` folder (ImageNet's 50,000
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
        val_dir: Sub-folder of the held-out images used as the test set (when it exists).
        test_size: Images held out of the training images as the test set when there is no ``val_dir`` folder
            (0: no test set; ``test`` then raises).
        test_split_seed: Seed of that test split.
        validate_on_test_set: Run the validation loop on the test set (requires ``val_size=0``).
        crop_size: See :class:`ImageFileDataModule`.
        resize_size: Idem.
        augmentation: Idem.
        mean: Idem.
        std: Idem.
        strict: Idem.
        num_workers: Idem.
        batch_size: Idem.
        eval_batch_size: Idem.
        pin_memory: Idem.
        val_size: Idem.
        split_seed: Idem.
        shuffle_seed: Idem.
        views: Idem.
        drop_last: Idem.

    Raises:
        ValueError: ``test_size < 0``, or ``validate_on_test_set`` with ``val_size > 0``; at set-up, the errors of
            :func:`scan_class_folders`, a training folder with a single class, a ``val_dir`` class the training folder
            lacks, a ``val_dir`` folder without a ``train_dir`` one, a ``test_size`` that leaves no training images,
            or no test images for ``test``.
        FileNotFoundError: (at set-up) ``root`` does not exist.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        test_size: int = 0,
        test_split_seed: int = 0,
        validate_on_test_set: bool = False,
        crop_size: int = 224,
        resize_size: int | None = None,
        augmentation: Augmentation = "inception",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        strict: bool = False,
        num_workers: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        pin_memory: bool | None = None,
        val_size: int = 0,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        views: int = 1,
        drop_last: bool = False,
    ) -> None:
        if test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {test_size}.")
        if validate_on_test_set and val_size > 0:
            raise ValueError(
                f"validate_on_test_set=True validates on the test set: it needs val_size=0, got val_size={val_size}."
            )
        super().__init__(
            crop_size=crop_size,
            resize_size=resize_size,
            augmentation=augmentation,
            mean=mean,
            std=std,
            strict=strict,
            num_workers=num_workers,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            pin_memory=pin_memory,
            val_size=val_size,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            views=views,
            drop_last=drop_last,
        )
        self.root = str(root)
        self.train_dir = train_dir
        self.val_dir = val_dir
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
    def val_folder(self) -> str | None:
        """The folder of the test images, ``root/<val_dir>``, or None when it does not exist."""
        if self.train_folder == self.root:
            return None
        folder = os.path.join(self.root, self.val_dir)
        return folder if os.path.isdir(folder) else None

    def _scan(self) -> tuple[list[str], ImageFiles, ImageFiles | None]:
        """``(classes, training pool, test set or None)``, scanned once."""
        if self._scanned is None:
            train_folder, val_folder = self.train_folder, self.val_folder
            if train_folder == self.root and os.path.isdir(os.path.join(self.root, self.val_dir)):
                raise ValueError(
                    f"{self.root} has a {self.val_dir!r} folder but no {self.train_dir!r} folder: put the training "
                    f"images in {os.path.join(self.root, self.train_dir)}/<class>/ (or set train_dir)"
                )
            what = "training folder" if train_folder != self.root else "dataset folder"
            classes, paths, labels = scan_class_folders(train_folder, what)
            if len(classes) < 2:
                raise ValueError(
                    f"{what} {train_folder} has a single class folder, {classes[0]!r}: classification needs at least 2 "
                    f"classes, one sub-folder of images per class ({train_folder}/<class>/<image>)"
                )
            pool = ImageFiles(train_folder, paths, labels)
            test: ImageFiles | None = None
            if val_folder is not None:
                val_classes, val_paths, val_labels = scan_class_folders(val_folder, "validation folder")
                index = {name: i for i, name in enumerate(classes)}
                unknown = [name for name in val_classes if name not in index]
                if unknown:
                    raise ValueError(
                        f"validation folder {val_folder} has {len(unknown)} class folder(s) that the training folder "
                        f"{train_folder} lacks: {', '.join(unknown[:5])}"
                    )
                test = ImageFiles(val_folder, val_paths, [index[val_classes[label]] for label in val_labels])
            elif self.test_size > 0:
                if self.test_size >= len(pool):
                    raise ValueError(f"test_size={self.test_size} leaves no training images (there are {len(pool)}).")
                rest, held = stratified_split(
                    pool.label_tensor(), self.test_size, torch.Generator().manual_seed(self.test_split_seed)
                )
                pool, test = pool.subset(rest), pool.subset(held)
            self._scanned = (classes, pool, test)
        return self._scanned

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
                f"{self.root} has no test images: there is no {os.path.join(self.root, self.val_dir)} folder and "
                "test_size=0; pass test_size=N to hold out N training images as the test set"
            )
        return test

    @override
    def val_dataloader(self) -> Any:
        """The validation loader: the held-out split, the test set (``validate_on_test_set``), or ``[]``."""
        if self.validate_on_test_set:
            return self.test_dataloader()
        return super().val_dataloader()
