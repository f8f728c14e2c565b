"""scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32 RGB so CIFAR backbones run on them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from kd_lightning.data.small_images import SmallImageDataModule
from kd_lightning.data.subsets import stratified_split

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DigitsDataModule", "write_digits_images"]

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


class DigitsDataModule(SmallImageDataModule):
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
        test_split_seed: Seed of the test split.
        **kwargs: ``augment_on_device`` (see :class:`~kd_lightning.data.small_images.SmallImageDataModule`) and
            the options of :class:`~kd_lightning.data.base.ClassificationDataModule`.
    """

    def __init__(
        self,
        val_size: int = 250,
        test_size: int = 250,
        padding: int = 4,
        *,
        test_split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self._load_digits = _load_digits()  # fail at construction when scikit-learn is missing
        if test_size < 1:
            raise ValueError(f"test_size must be >= 1, got {test_size}.")
        super().__init__(mean=DIGITS_MEAN, std=DIGITS_STD, padding=padding, flip=False, val_size=val_size, **kwargs)
        self.test_size = test_size
        self.test_split_seed = test_split_seed
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


def write_digits_images(root: str | Path, test_size: int = 250, test_split_seed: int = 0) -> Path:
    """Write the digits as 32x32 RGB PNG files, the layout of
    :class:`~kd_lightning.data.imagenet.ImageFolderDataModule`: ``root/train/<digit>/<k>.png`` and the test images
    (the test split of :class:`DigitsDataModule` with the same ``test_size`` and ``test_split_seed``)
    ``root/val/<digit>/<k>.png``. The pixels are those the datamodule trains on (PNG is lossless). Returns ``root``.
    """
    root = Path(root)
    pool, _, test = DigitsDataModule(val_size=0, test_size=test_size, test_split_seed=test_split_seed)._build()
    for split, dataset in (("train", pool), ("val", test)):
        images, labels = dataset.tensors
        for k, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            path = root / split / str(label) / f"{k:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return root
