"""Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey images of 10 kinds of clothing, read from its four IDX files.

The files are those Zalando distributes (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), plain or gzipped (``.gz``, as distributed), in either
``<data_dir>/FashionMNIST/raw/`` (torchvision's layout, where ``download=True`` puts them) or ``<data_dir>`` itself
(e.g. Debian's ``dataset-fashion-mnist`` package: ``data_dir=/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from kd_lightning.data.small_images import SmallImageDataModule
from kd_lightning.data.subsets import stratified_split

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_SUPERCLASSES",
    "FashionMNISTDataModule",
    "read_idx",
]

#: Class names in label order.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Super-class names, and the super-class of each class (``FashionMNISTDataModule.superclass_map``).
FASHION_MNIST_SUPERCLASSES = ("tops", "footwear", "others")
_SUPERCLASS_OF = (0, 2, 0, 2, 0, 1, 0, 1, 2, 1)
#: Mean and standard deviation of the 60,000 training images (28x28) scaled to [0, 1]; the 3 channels are equal.
FASHION_MNIST_MEAN: tuple[float, float, float] = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD: tuple[float, float, float] = (0.3530, 0.3530, 0.3530)

#: ``(images, labels)`` file names of each split.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: IDX magic number of unsigned-byte data: 0x0800 + the number of dimensions (2049 labels, 2051 images).
_IDX_UBYTE = 0x0800


def read_idx(path: str, ndim: int) -> Tensor:
    """The ``uint8`` array of an IDX file of unsigned bytes (plain, or gzipped when ``path`` ends with ``.gz``).

    IDX: a big-endian 32-bit magic number ``0x0800 + ndim`` (2049 for labels, 2051 for images), ``ndim`` big-endian
    32-bit sizes, then the bytes in row-major order.

    Args:
        path: The file.
        ndim: The number of dimensions it must have (1 for labels, 3 for images).

    Raises:
        ValueError: the file is not an IDX file of ``ndim``-dimensional unsigned bytes, or is truncated.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    header = 4 * (ndim + 1)
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != _IDX_UBYTE + ndim:
        raise ValueError(
            f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes: magic number {magic}, expected "
            f"{_IDX_UBYTE + ndim}"
        )
    shape = [int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim)]
    size = len(data) - header
    if size != torch.Size(shape).numel():
        raise ValueError(
            f"{path} is truncated or too long: shape {shape} needs {torch.Size(shape).numel()} bytes, it has {size}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(shape)


class FashionMNISTDataModule(SmallImageDataModule):
    """Fashion-MNIST: the standard 60,000 training / 10,000 test images, 10 classes, 3 super-classes.

    The grey images are kept in memory as ``uint8`` tensors, repeated to 3 channels (the registry's CIFAR-style
    backbones have a 3-channel stem) and, with ``pad_to_32``, zero-padded to 32x32 (2 pixels per side, the CIFAR
    geometry). Training augmentation is the CIFAR one (``padding``-pixel zero padding, random crop, horizontal flip:
    clothes are mirror-symmetric), then normalisation with :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`
    (the dataset's statistics, also used with ``pad_to_32``); evaluation only normalises.

    Splits: the test set is the 10,000 ``t10k`` images. ``val_size`` of the 60,000 training images are held out for
    validation (stratified, seeded by ``split_seed``). ``train_subset=N`` then trains on ``N`` of the remaining
    images only (stratified, seeded by ``subset_seed``), the same ``N`` images for every run with the same seeds, and
    a validation set that does not depend on ``N``.

    :attr:`superclass_map` (for ``rel`` targets): tops {T-shirt/top, pullover, coat, shirt} -> 0, footwear {sandal,
    sneaker, ankle boot} -> 1, others {trouser, dress, bag} -> 2 (:data:`FASHION_MNIST_SUPERCLASSES`).

    Args:
        data_dir: Folder of the four files, or of ``FashionMNIST/raw/`` with them (see the module docstring).
        download: Let :meth:`prepare_data` download the files with torchvision into ``<data_dir>/FashionMNIST/raw``
            when they are missing (nothing is downloaded otherwise).
        val_size: Training images held out for validation (0: no validation loop).
        train_subset: Train on this many of the training images left by the validation split (None: all of them).
        subset_seed: Seed of the ``train_subset`` draw.
        pad_to_32: Zero-pad the 28x28 images to 32x32.
        padding: Maximum translation in pixels of the training augmentation; 0 disables it.
        **kwargs: ``augment_on_device`` (see :class:`~kd_lightning.data.small_images.SmallImageDataModule`) and the
            options of :class:`~kd_lightning.data.base.ClassificationDataModule` (``views=2`` for two augmented
            views per training image).

    Raises:
        ValueError: ``train_subset < 1``; at set-up, a ``train_subset`` larger than the training images left, or a
            malformed file (:func:`read_idx`, or image and label files of different lengths).
        FileNotFoundError: (at set-up) a file is missing; the message names the folders searched and how to get them.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        val_size: int = 5000,
        train_subset: int | None = None,
        subset_seed: int = 0,
        pad_to_32: bool = False,
        padding: int = 4,
        **kwargs: Any,
    ) -> None:
        if train_subset is not None and train_subset < 1:
            raise ValueError(f"train_subset must be >= 1 (or None for all training images), got {train_subset}.")
        super().__init__(
            mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, padding=padding, flip=True, val_size=val_size, **kwargs
        )
        self.data_dir = str(data_dir)
        self.download = download
        self.train_subset = train_subset
        self.subset_seed = subset_seed
        self.pad_to_32 = pad_to_32
        self._splits: dict[str, TensorDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(FASHION_MNIST_CLASSES)

    @property
    def classes(self) -> list[str]:
        """Class names; class ``i`` is ``classes[i]``."""
        return list(FASHION_MNIST_CLASSES)

    @property
    def input_shape(self) -> tuple[int, ...]:
        side = 32 if self.pad_to_32 else 28
        return (3, side, side)

    @property
    def superclass_map(self) -> Tensor:
        """``(10,)``: tops 0, footwear 1, others 2 (see the class docstring)."""
        return torch.tensor(_SUPERCLASS_OF)

    @property
    def folders(self) -> list[str]:
        """The folders searched for the files, in order: ``<data_dir>/FashionMNIST/raw`` then ``<data_dir>``."""
        return [os.path.join(self.data_dir, "FashionMNIST", "raw"), self.data_dir]

    @override
    def prepare_data(self) -> None:
        """Download the four files with torchvision when ``download=True`` and some are missing."""
        if self.download and any(self._find(name) is None for pair in FILES.values() for name in pair):
            from torchvision.datasets import FashionMNIST

            FashionMNIST(self.data_dir, train=True, download=True)

    def _find(self, name: str) -> str | None:
        """The first of ``<folder>/<name>`` and ``<folder>/<name>.gz`` that exists, over :attr:`folders`."""
        for folder in self.folders:
            for candidate in (name, f"{name}.gz"):
                path = os.path.join(folder, candidate)
                if os.path.isfile(path):
                    return path
        return None

    def _read(self, split: str) -> TensorDataset:
        """The images and labels of ``split`` (``"train"`` or ``"test"``), read once."""
        if split not in self._splits:
            paths = [self._find(name) for name in FILES[split]]
            if None in paths:
                raise self._not_found_error()
            images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1).long()
            if len(images) != len(labels):
                raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
            images = images.unsqueeze(1)
            if self.pad_to_32:
                images = F.pad(images, (2, 2, 2, 2))
            self._splits[split] = TensorDataset(images.expand(-1, 3, -1, -1), labels)
        return self._splits[split]

    def _not_found_error(self) -> FileNotFoundError:
        names = [name for pair in FILES.values() for name in pair]
        missing = [name for name in names if self._find(name) is None]
        return FileNotFoundError(
            f"Fashion-MNIST not found: {', '.join(missing)} (plain or .gz) missing from "
            f"{' and '.join(os.path.abspath(folder) for folder in self.folders)}. Get the files with "
            "`apt-get install dataset-fashion-mnist` (Debian; then data_dir=/usr/share/datasets/fashion-mnist), "
            "pass download=True to download them with torchvision, or put the four files of "
            "https://github.com/zalandoresearch/fashion-mnist into data_dir."
        )

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        pool = self._read("train")
        return pool, pool.tensors[1]

    def _load_test_set(self) -> Dataset:
        return self._read("test")

    def _training_indices(self, train_idx: Tensor, labels: Tensor) -> Tensor:
        """``train_subset`` of ``train_idx``, stratified and seeded by ``subset_seed`` (all of them for None)."""
        if self.train_subset is None:
            return train_idx
        if self.train_subset > len(train_idx):
            raise ValueError(
                f"train_subset={self.train_subset} exceeds the {len(train_idx)} training images left by "
                f"val_size={self.val_size}."
            )
        generator = torch.Generator().manual_seed(self.subset_seed)
        _, chosen = stratified_split(labels[train_idx], self.train_subset, generator)
        return train_idx[chosen]
