"""A user's own LightningDataModule: scikit-learn's bundled 8x8 digits as 1x8x8 tensors (no download).

Not a kd-lightning class: any ``LightningDataModule`` whose batches are ``(x, y)`` (``y`` a ``(B,)`` long tensor of
class indices) trains every kd-lightning method. The ``num_classes`` attribute is optional; with it, the module
checks ``model.num_classes`` against the data at start-up.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


class Digits8x8DataModule(pl.LightningDataModule):
    """The 1,797 digits at their native 8x8 resolution, standardised, split at random into train / val / test.

    Args:
        batch_size: samples per training batch (evaluation uses the same).
        val_size: images held out for validation.
        test_size: images held out for the test.
        seed: seed of the split and of the training order.
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, val_size: int = 250, test_size: int = 250, seed: int = 0) -> None:
        super().__init__()
        if val_size < 1 or test_size < 1:
            raise ValueError(f"val_size and test_size must be >= 1, got {val_size} and {test_size}")
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        x = (x - x.mean()) / x.std()
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        test, val, train = order.split([self.test_size, self.val_size, len(y) - self.test_size - self.val_size])
        self.splits = {
            name: TensorDataset(x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))
        }

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)
