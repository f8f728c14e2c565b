from __future__ import annotations

import sys

import pytest
import torch
from torchvision.transforms import v2

from kd_lightning.data import DigitsDataModule
from kd_lightning.data.digits import DIGITS_MEAN, DIGITS_STD


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def test_sizes_shapes_and_classes(digits):
    assert (len(digits.train_set), len(digits.val_set), len(digits.test_set)) == (1297, 250, 250)
    assert (digits.num_classes, digits.input_shape, digits.superclass_map, digits.num_superclasses) == (
        10,
        (3, 32, 32),
        None,
        None,
    )
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels


def test_values_are_scaled_and_normalised(digits):
    x = torch.stack([digits.test_set[i][0] for i in range(len(digits.test_set))])
    pixels = x * DIGITS_STD[0] + DIGITS_MEAN[0]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_splits_are_stratified_and_seeded(digits):
    test_labels = torch.tensor([digits.test_set[i][1] for i in range(250)])
    assert torch.bincount(test_labels, minlength=10).min() >= 24
    other = DigitsDataModule(split_seed=1)
    other.setup()
    same_test = all(torch.equal(other.test_set[i][0], digits.test_set[i][0]) for i in range(250))
    assert same_test  # the test set does not move with split_seed ...
    assert other.val_set.indices != digits.val_set.indices  # ... the validation split does
    moved = DigitsDataModule(test_split_seed=1)
    moved.setup("test")
    assert not all(torch.equal(moved.test_set[i][0], digits.test_set[i][0]) for i in range(250))


def test_training_augmentation_translates_without_flipping(digits):
    kinds = [type(t) for t in digits._train_transform().transforms]
    assert v2.RandomCrop in kinds and v2.RandomHorizontalFlip not in kinds
    dm = DigitsDataModule(augment_on_device=True)
    assert dm.batch_augment.padding == 4 and not dm.batch_augment.flip
    still = DigitsDataModule(padding=0)
    still.setup("fit")
    raw = still.train_set.dataset[still.train_set.indices[0]][0]
    assert torch.equal(still.train_set[0][0], still._eval_transform()(raw))  # padding=0: no augmentation left


def test_two_views_and_augment_on_device():
    dm = DigitsDataModule(views=2, batch_size=16)
    (a, b), y = next(iter(dm.train_dataloader()))
    assert a.shape == b.shape == (16, 3, 32, 32) and not torch.equal(a, b) and y.shape == (16,)
    device = DigitsDataModule(augment_on_device=True, views=2, batch_size=16)
    x, y = next(iter(device.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32)
    (a, b), _ = device.device_transform((x, y), train=True)
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    raw, y = next(iter(device.test_dataloader()))
    expected, _ = next(iter(DigitsDataModule(batch_size=16).test_dataloader()))
    torch.testing.assert_close(device.device_transform((raw, y), train=False)[0], expected)


def test_missing_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'kd-lightning\[digits\]'"):
        DigitsDataModule()


def test_errors():
    with pytest.raises(ValueError, match="test_size must be >= 1, got 0"):
        DigitsDataModule(test_size=0)
    with pytest.raises(ValueError, match="padding must be >= 0, got -2"):
        DigitsDataModule(padding=-2)
    with pytest.raises(ValueError, match="test_size=1797 leaves no training images"):
        DigitsDataModule(test_size=1797).setup("test")


def test_worker_processes_keep_the_shuffling_order():
    orders = []
    for workers in (0, 1):
        dm = DigitsDataModule(num_workers=workers, batch_size=512, shuffle_seed=0)
        loader = dm.train_dataloader()
        assert loader.persistent_workers is (workers > 0)
        orders.append([y for _ in range(2) for _, y in loader])  # two epochs (persistent workers reused)
    assert all(torch.equal(a, b) for a, b in zip(*orders, strict=True))
