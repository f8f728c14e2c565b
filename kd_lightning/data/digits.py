"""scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32 RGB so CIFAR backbones run on them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.data.base import ClassificationDataModule, stratified_split
from kd_lightning.data.transforms import BatchAugment, eval_transform, train_transform

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DigitsDataModule"]

#: Mean and standard deviation of the upsampled digits in [0, 1] (all 1,797 images; the three channels are equal).
DIGITS_MEAN: tuple[float, float, float] = (0.3052, 0.3052, 0.3052)
DIGITS_STD: tuple[float, float, float] = (0.3236, 0.3236, 0.3236)


def _load_digits() -> Callable:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "DigitsDataModule reads scikit-learn's bundled digits; install the `digits` extra: "
            "pip install 'kd-lightning[digits]'"
        ) from err
    return load_digits


class DigitsDataModule(ClassificationDataModule):
    """The 1,797 8x8 digits of scikit-learn (UCI optdigits test set), 10 classes, no download.

    Pixel values 0..16 are scaled to [0, 1], upsampled to 32x32 (bilinear), repeated to 3 channels and kept in
    memory as ``uint8`` tensors; the transforms scale them back to [0, 1] and normalise with
    :data:`DIGITS_MEAN` / :data:`DIGITS_STD`. ``test_size`` images are held out as the test set (stratified,
    seeded by ``test_split_seed``, so the test set does not move with ``split_seed``), then ``val_size`` of the
    rest for validation: 1,297 / 250 / 250 by default. Training augmentation is a random translation (zero
    padding + random crop) without flips: digits are not mirror-symmetric.

    Args:
        val_size: Images held out of the non-test ones for validation (0: no validation loop).
        test_size: Images held out as the test set.
        padding: Maximum translation in pixels of the 32x32 images (4 = one original pixel); 0 disables it.
        augment_on_device: Loaders yield ``uint8`` images, augmented on the accelerator by
            :class:`~kd_lightning.data.transforms.BatchAugment`.
        test_split_seed: Seed of the test split.
        batch_size: See :class:`~kd_lightning.data.base.ClassificationDataModule`.
        eval_batch_size: Idem.
        num_workers: Idem.
        pin_memory: Idem.
        split_seed: Idem.
        shuffle_seed: Idem.
        views: Idem.
        drop_last: Idem.
    """

    def __init__(
        self,
        val_size: int = 250,
        test_size: int = 250,
        padding: int = 4,
        augment_on_device: bool = False,
        test_split_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        views: int = 1,
        drop_last: bool = False,
    ) -> None:
        self._load_digits = _load_digits()  # fail at construction when scikit-learn is missing
        if test_size < 1:
            raise ValueError(f"test_size must be >= 1, got {test_size}.")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}.")
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            val_size=val_size,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            views=views,
            drop_last=drop_last,
        )
        self.test_size = test_size
        self.padding = padding
        self.augment_on_device = augment_on_device
        self.test_split_seed = test_split_seed
        if augment_on_device:
            self.batch_augment = BatchAugment(DIGITS_MEAN, DIGITS_STD, padding=padding, flip=False)
        self._splits: tuple[Dataset, Tensor, Dataset] | None = None

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    def _build(self) -> tuple[Dataset, Tensor, Dataset]:
        """``(pool, pool_labels, test)``, built once."""
        if self._splits is None:
            digits = self._load_digits()
            images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
            images = images.mul_(255.0).round_().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
            labels = torch.as_tensor(digits.target, dtype=torch.long)
            if self.test_size >= len(labels):
                raise ValueError(f"test_size={self.test_size} leaves no training images (there are {len(labels)}).")
            pool, test = stratified_split(labels, self.test_size, torch.Generator().manual_seed(self.test_split_seed))
            self._splits = (
                TensorDataset(images[pool], labels[pool]),
                labels[pool],
                TensorDataset(images[test], labels[test]),
            )
        return self._splits

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        pool, labels, _ = self._build()
        return pool, labels

    def _load_test_set(self) -> Dataset:
        return self._build()[2]

    def _train_transform(self) -> Callable | None:
        if self.augment_on_device:
            return None
        return train_transform(DIGITS_MEAN, DIGITS_STD, size=32, padding=self.padding, flip=False)

    def _eval_transform(self) -> Callable | None:
        return None if self.augment_on_device else eval_transform(DIGITS_MEAN, DIGITS_STD)
