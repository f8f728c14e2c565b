"""CIFARDataModule on small files in the real CIFAR pickle format, read by torchvision's own parser."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

from kd_lightning.data import CIFARDataModule
from kd_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD

PER_BATCH = 12  # CIFAR-10: 5 training batches of 12 images
N_TEST = 20
FINE_TO_COARSE = np.random.default_rng(0).permutation(100) // 5  # 5 fine classes per coarse class


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 3072)`` uint8 rows, channel-major (1024 red, 1024 green, 1024 blue values), as in the real files."""
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _images(rng, PER_BATCH), (np.arange(PER_BATCH) + i) % 10
        _dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "data": x, "labels": y.tolist()})
        train_x.append(x)
        train_y.append(y)
    test_x, test_y = _images(rng, N_TEST), rng.integers(0, 10, N_TEST)
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": test_x, "labels": test_y.tolist()})
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return {"train_x": np.concatenate(train_x), "train_y": np.concatenate(train_y), "test_x": test_x, "test_y": test_y}


def write_cifar100(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = np.tile(np.arange(100), 2)
    test_fine = rng.integers(0, 100, N_TEST)
    for name, x, y in (("train", _images(rng, 200), fine), ("test", _images(rng, N_TEST), test_fine)):
        entry = {"data": x, "fine_labels": y.tolist(), "coarse_labels": FINE_TO_COARSE[y].tolist(), "batch_label": name}
        _dump(folder / name, entry)
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": list("c" * 20)})
    return {"train_y": fine, "test_y": test_fine}


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision's integrity check, minus the md5 (our files are not the official ones): the file must exist."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def cifar10(tmp_path, no_md5):
    return tmp_path, write_cifar10(tmp_path)


@pytest.fixture
def cifar100(tmp_path, no_md5):
    return tmp_path, write_cifar100(tmp_path)


def make(root: Path, **kwargs) -> CIFARDataModule:
    kwargs = {"data_dir": str(root), "num_workers": 0, "val_size": 10, "batch_size": 8, **kwargs}
    return CIFARDataModule(**kwargs)


def test_cifar10_shapes_labels_and_split(cifar10):
    root, written = cifar10
    dm = make(root)
    assert (dm.num_classes, dm.input_shape, dm.superclass_map, dm.num_superclasses) == (10, (3, 32, 32), None, None)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == written["test_y"][:8].tolist()
    expected = (torch.from_numpy(written["test_x"][:8]).view(8, 3, 32, 32).float() / 255 - _stat(CIFAR10_MEAN)) / _stat(
        CIFAR10_STD
    )
    torch.testing.assert_close(x, expected)  # channel-major rows parsed and normalised
    # the validation split holds training images, untouched by augmentation, with their labels
    vx, vy = dm.val_set[0]
    index = dm.val_set.indices[0]
    assert vy == written["train_y"][index]
    raw = torch.from_numpy(written["train_x"][index]).view(3, 32, 32).float() / 255
    torch.testing.assert_close(vx, (raw - _stat(CIFAR10_MEAN)[0]) / _stat(CIFAR10_STD)[0])


def _stat(values) -> torch.Tensor:
    return torch.tensor(values).view(1, 3, 1, 1)


def test_split_is_deterministic_and_seeded(cifar10):
    root, _ = cifar10
    splits = []
    for seed in (0, 0, 1):
        dm = make(root, split_seed=seed)
        dm.setup("fit")
        splits.append(dm.val_set.indices)
    assert splits[0] == splits[1] != splits[2]
    assert sorted(splits[0] + make_train_indices(root)) == list(range(60))


def make_train_indices(root: Path) -> list[int]:
    dm = make(root)
    dm.setup("fit")
    return dm.train_set.indices


def test_val_size_zero_uses_all_training_images(cifar10):
    dm = make(cifar10[0], val_size=0)
    dm.setup("fit")
    assert len(dm.train_set) == 60 and dm.val_set is None and dm.val_dataloader() == []


def test_cifar100_superclass_map_is_the_coarse_labels(cifar100):
    root, written = cifar100
    dm = make(root, dataset="cifar100")
    assert dm.num_classes == 100 and dm.num_superclasses == 20
    assert torch.equal(dm.superclass_map, torch.from_numpy(FINE_TO_COARSE).long())
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (190, 20)
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == written["test_y"][:8].tolist() and x.shape == (8, 3, 32, 32)
    # stratified: the 10 held-out images are 10 different classes (2 images per class in the pool)
    assert len({dm.val_set[i][1] for i in range(10)}) == 10


def test_cifar100_superclass_map_needs_the_train_file(tmp_path):
    with pytest.raises(RuntimeError, match=re.escape(os.path.join(str(tmp_path), "cifar-100-python"))):
        _ = make(tmp_path, dataset="cifar100").superclass_map


def test_inconsistent_coarse_labels(cifar100):
    root, _ = cifar100
    path = root / "cifar-100-python" / "train"
    entry = pickle.loads(path.read_bytes())
    entry["coarse_labels"][-1] = (entry["coarse_labels"][-1] + 1) % 20
    _dump(path, entry)
    with pytest.raises(ValueError, match="the fine labels do not map to one coarse label each"):
        _ = make(root, dataset="cifar100").superclass_map


def test_two_views(cifar100):
    dm = make(cifar100[0], dataset="cifar100", views=2)
    (a, b), y = next(iter(dm.train_dataloader()))
    assert a.shape == b.shape == (8, 3, 32, 32) and y.shape == (8,)
    assert not torch.equal(a, b)
    x, _ = next(iter(dm.val_dataloader()))
    assert isinstance(x, torch.Tensor)


def test_augment_on_device(cifar100):
    dm = make(cifar100[0], dataset="cifar100", augment_on_device=True, views=2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long
    (a, b), _ = dm.device_transform((x, y), train=True)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    assert not torch.equal(dm.device_transform((x, y), train=True)[0][0], a)
    # evaluation: exactly the per-image CPU path
    raw, _ = next(iter(dm.test_dataloader()))
    on_device, _ = dm.device_transform((raw, y), train=False)
    cpu = make(cifar100[0], dataset="cifar100")
    expected, _ = next(iter(cpu.test_dataloader()))
    torch.testing.assert_close(on_device, expected)
    assert torch.equal(_stat(CIFAR100_MEAN).view(-1), dm.batch_augment.mean.view(-1))
    assert torch.equal(_stat(CIFAR100_STD).view(-1), dm.batch_augment.std.view(-1))


def test_missing_folder_error_says_where_and_how(tmp_path):
    dm = make(tmp_path / "nowhere", dataset="cifar100")
    folder = os.path.abspath(os.path.join(str(tmp_path), "nowhere", "cifar-100-python"))
    with pytest.raises(RuntimeError, match=re.escape(folder)) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "expected the files train, test, meta (missing: train, test, meta)" in message
    assert "download=True" in message and "cifar-100-python.tar.gz" in message
    with pytest.raises(RuntimeError, match=r"missing: data_batch_1, data_batch_2, .*test_batch, batches\.meta"):
        make(tmp_path).setup("test")


def test_corrupted_files_error(tmp_path):
    write_cifar10(tmp_path)  # not the official files: the md5 check fails
    with pytest.raises(RuntimeError, match="all present, but some fail torchvision's md5 check"):
        make(tmp_path).setup("fit")


def test_prepare_data_downloads_only_when_asked(tmp_path, no_md5, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, download_root, filename))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fake_download)
    make(tmp_path).prepare_data()
    assert calls == [] and not (tmp_path / "cifar-10-batches-py").exists()
    dm = make(tmp_path, download=True)
    dm.prepare_data()
    assert calls == [(tv_cifar.CIFAR10.url, str(tmp_path), "cifar-10-python.tar.gz")]
    dm.prepare_data()  # already there: no second download
    assert len(calls) == 1
    dm.setup()
    assert len(dm.test_set) == N_TEST


def test_unknown_dataset():
    with pytest.raises(
        ValueError, match=r"Unknown CIFAR dataset 'cifar1000'; expected one of \['cifar10', 'cifar100'\]"
    ):
        CIFARDataModule(dataset="cifar1000")  # type: ignore[arg-type]


def test_state_dict_reproduces_the_shuffling(cifar10):
    dm = make(cifar10[0], shuffle_seed=3, batch_size=50)
    loader = dm.train_dataloader()
    state = dm.state_dict()
    first = next(iter(loader))[1]
    second = next(iter(loader))[1]
    dm.load_state_dict(state)
    assert torch.equal(next(iter(loader))[1], first)
    other = make(cifar10[0], shuffle_seed=4, batch_size=50)
    other.load_state_dict(state)
    assert torch.equal(next(iter(other.train_dataloader()))[1], first)
    assert not torch.equal(first, second)
