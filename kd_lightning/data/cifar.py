"""CIFAR-10 / CIFAR-100 datamodule on torchvision's datasets (their pickle parsing is the loading code)."""

from __future__ import annotations

import os
import pickle
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import CIFAR10, CIFAR100
from typing_extensions import override

from kd_lightning.data.small_images import SmallImageDataModule
from kd_lightning.data.transforms import cifar_stats

__all__ = ["CIFARDataModule"]

_DATASETS: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class CIFARDataModule(SmallImageDataModule):
    """CIFAR-10 or CIFAR-100 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 colour images.

    The official python-version archives are read by torchvision's :class:`~torchvision.datasets.CIFAR10` /
    :class:`~torchvision.datasets.CIFAR100` from ``<data_dir>/cifar-10-batches-py`` or
    ``<data_dir>/cifar-100-python``. Training augmentation is the standard 4-pixel zero padding, random 32x32 crop
    and horizontal flip, then per-channel normalisation (:class:`~kd_lightning.data.small_images.SmallImageDataModule`,
    ``augment_on_device`` included); evaluation only normalises. For CIFAR-100, :attr:`superclass_map` maps the 100
    fine classes to the 20 coarse ones (``coarse_labels`` of the ``train`` file, which torchvision does not read).

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Folder that holds (or receives) the extracted archive.
        download: Let :meth:`prepare_data` download the archive if it is missing (nothing is ever downloaded
            otherwise).
        val_size: Training images held out for validation (0: train on all 50,000, no validation loop).
        num_workers: DataLoader worker processes.
        **kwargs: ``augment_on_device`` and the options of :class:`~kd_lightning.data.base.ClassificationDataModule`
            (``views=2`` for two augmented views per training image).
    """

    def __init__(
        self,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str = "data",
        download: bool = False,
        val_size: int = 5000,
        *,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        if dataset not in _DATASETS:
            raise ValueError(f"Unknown CIFAR dataset {dataset!r}; expected one of {sorted(_DATASETS)}.")
        mean, std = cifar_stats(dataset)
        super().__init__(mean=mean, std=std, padding=4, flip=True, val_size=val_size, num_workers=num_workers, **kwargs)
        self.dataset = dataset
        self.data_dir = str(data_dir)
        self.download = download
        self._superclass_map: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return _NUM_CLASSES[self.dataset]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def folder(self) -> str:
        """The folder the dataset files are read from, e.g. ``<data_dir>/cifar-100-python``."""
        return os.path.join(self.data_dir, _DATASETS[self.dataset].base_folder)

    @property
    def superclass_map(self) -> Tensor | None:
        """CIFAR-100: ``(100,)`` fine class -> coarse class (20 super-classes), from the ``train`` file; else None."""
        if self.dataset != "cifar100":
            return None
        if self._superclass_map is None:
            path = os.path.join(self.folder, "train")
            if not os.path.isfile(path):
                raise self._not_found_error()
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            fine = torch.as_tensor(entry["fine_labels"], dtype=torch.long)
            coarse = torch.as_tensor(entry["coarse_labels"], dtype=torch.long)
            mapping = torch.full((100,), -1, dtype=torch.long).scatter_(0, fine, coarse)
            if (mapping < 0).any() or not torch.equal(mapping[fine], coarse):
                raise ValueError(f"{path}: the fine labels do not map to one coarse label each.")
            self._superclass_map = mapping
        return self._superclass_map

    @override
    def prepare_data(self) -> None:
        """Download and extract the archive into ``data_dir`` when ``download=True`` (and it is missing)."""
        if self.download:
            _DATASETS[self.dataset](self.data_dir, train=False, download=True)

    def _open(self, train: bool) -> CIFAR10:
        try:
            return _DATASETS[self.dataset](self.data_dir, train=train, download=False)
        except RuntimeError as err:
            raise self._not_found_error() from err

    def _not_found_error(self) -> RuntimeError:
        cls = _DATASETS[self.dataset]
        expected = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in expected if not os.path.isfile(os.path.join(self.folder, name))]
        state = f"missing: {', '.join(missing)}" if missing else "all present, but some fail torchvision's md5 check"
        return RuntimeError(
            f"{self.dataset.upper()} not found or corrupted in {os.path.abspath(self.folder)}: expected the files "
            f"{', '.join(expected)} ({state}). Pass download=True to download {cls.filename} ({cls.url}), or "
            f"unpack that official archive into {os.path.abspath(self.data_dir)} (it creates {cls.base_folder}/)."
        )

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        ds = self._open(train=True)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        if self.augment_on_device:
            return TensorDataset(_uint8_images(ds), labels), labels
        return ds, labels

    def _load_test_set(self) -> Dataset:
        ds = self._open(train=False)
        if self.augment_on_device:
            return TensorDataset(_uint8_images(ds), torch.as_tensor(ds.targets, dtype=torch.long))
        return ds


def _uint8_images(ds: CIFAR10) -> Tensor:
    """The dataset's ``(N, 32, 32, 3)`` uint8 array as an ``(N, 3, 32, 32)`` tensor."""
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
