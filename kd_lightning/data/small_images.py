"""The datamodule base of small in-memory images augmented the CIFAR way (CIFAR, digits, Fashion-MNIST)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kd_lightning.data.base import ClassificationDataModule
from kd_lightning.data.replay import PadCropFlip
from kd_lightning.data.transforms import BatchAugment, eval_transform, train_transform

__all__ = ["SmallImageDataModule"]


class SmallImageDataModule(ClassificationDataModule):
    """Base of the datamodules of small images whose augmentation is zero padding, a random crop and a flip.

    Training: zero-pad by ``padding``, crop back to the image size at a random offset, flip horizontally with
    probability 1/2 when ``flip``, scale to [0, 1] and normalise with ``mean``/``std``; evaluation only normalises.
    Per sample in the DataLoader workers (:func:`~kd_lightning.data.transforms.train_transform`), or, with
    ``augment_on_device=True``, per batch on the accelerator (:class:`~kd_lightning.data.transforms.BatchAugment`):
    the loaders then yield ``uint8`` images and a subclass's raw samples must be ``uint8`` ``(C, H, W)`` tensors.

    A subclass passes ``mean``, ``std``, ``padding`` and ``flip`` (what its data need, not user options unless it
    exposes them) and gives :attr:`input_shape` (the crop is the image side) and the raw datasets.

    Args:
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
        padding: Maximum translation in pixels (zero padding before the random crop); 0 disables it.
        flip: Random horizontal flips (not for digits, which are not mirror-symmetric).
        augment_on_device: Loaders yield ``uint8`` images and the augmentation runs on the accelerator, batch-wise
            (:class:`~kd_lightning.data.transforms.BatchAugment`), instead of per image in the workers.
        **kwargs: The options of :class:`~kd_lightning.data.base.ClassificationDataModule`.

    Raises:
        ValueError: ``padding < 0``.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
        flip: bool,
        augment_on_device: bool = False,
        **kwargs: Any,
    ) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}.")
        super().__init__(**kwargs)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.padding = padding
        self.flip = flip
        self.augment_on_device = augment_on_device
        if augment_on_device:
            self.batch_augment = BatchAugment(self.mean, self.std, padding=padding, flip=flip)

    def _train_transform(self) -> Callable | None:
        if self.augment_on_device:
            return None
        return train_transform(self.mean, self.std, size=self.input_shape[-1], padding=self.padding, flip=self.flip)

    def _eval_transform(self) -> Callable | None:
        return None if self.augment_on_device else eval_transform(self.mean, self.std)

    @property
    def recorded_augmentation(self) -> PadCropFlip:
        """The padding, crop and flip as a teacher store records them (per sample, or per batch on the device)."""
        return PadCropFlip(self.input_shape[-1], self.padding, self.flip, self.mean, self.std)
