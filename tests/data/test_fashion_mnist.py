"""FashionMNISTDataModule on small IDX files written in the real format (and on the real files when installed)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
import torchvision

from kd_lightning.cli import main
from kd_lightning.data import FashionMNISTDataModule
from kd_lightning.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FILES, read_idx

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "fashion_mnist" / "ce_resnet20.yaml"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
TRAIN_PER_CLASS, TEST_PER_CLASS = 20, 5


def write_idx(path: Path, array: torch.Tensor, gz: bool = False, magic: int | None = None) -> Path:
    """``array`` (uint8) as an IDX file: big-endian magic ``0x0800 + ndim`` (2049, 2051), sizes, then the bytes."""
    header = (magic if magic is not None else 0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    data = header + array.contiguous().numpy().tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fake_split(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 28, 28)`` uint8 images whose pixel [0, 0] is the label, and their ``(N,)`` labels (classes interleaved)."""
    labels = torch.arange(10 * per_class, dtype=torch.uint8) % 10
    images = torch.randint(
        0, 256, (len(labels), 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    images[:, 0, 0] = labels
    return images, labels


def write_fashion_mnist(folder: Path, gz: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The four files in ``folder`` (gzipped as distributed, or plain), with the fake splits they hold."""
    splits = {"train": fake_split(TRAIN_PER_CLASS, 0), "test": fake_split(TEST_PER_CLASS, 1)}
    for split, (images, labels) in splits.items():
        write_idx(folder / FILES[split][0], images, gz)
        write_idx(folder / FILES[split][1], labels, gz)
    return splits


@pytest.fixture
def flat_gz(tmp_path) -> Path:
    """The four ``.gz`` files directly in a folder, as Debian's ``dataset-fashion-mnist`` installs them."""
    write_fashion_mnist(tmp_path, gz=True)
    return tmp_path


def make(data_dir: Path, **kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(**{"data_dir": str(data_dir), "val_size": 20, "batch_size": 16, **kwargs})


def test_shapes_splits_and_labels(flat_gz):
    dm = make(flat_gz)
    dm.setup()
    assert (dm.num_classes, dm.input_shape, dm.classes[9]) == (10, (3, 28, 28), "Ankle boot")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (180, 20, 50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels
    x, y = next(iter(dm.test_dataloader()))
    first_pixel = (x[:, 0, 0, 0] * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]) * 255
    assert torch.equal(first_pixel.round().long(), y)  # evaluation only normalises: pixel [0, 0] is the label
    assert torch.bincount(torch.tensor([dm.val_set[i][1] for i in range(20)])).tolist() == [2] * 10  # stratified


@pytest.mark.parametrize("gz", [False, True])
def test_torchvision_layout_reads_what_torchvision_reads(tmp_path, gz):
    splits = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gz)
    pool = make(tmp_path)._load_train_pool()[0]
    assert torch.equal(pool.tensors[0][:, 0], splits["train"][0]) and torch.equal(
        pool.tensors[1], splits["train"][1].long()
    )
    if not gz:  # torchvision reads the plain files only
        reference = torchvision.datasets.FashionMNIST(str(tmp_path), train=False)
        test = make(tmp_path)._load_test_set()
        assert torch.equal(test.tensors[0][:, 0], reference.data) and torch.equal(test.tensors[1], reference.targets)


def test_validation_split_is_seeded(flat_gz):
    def val_indices(**kwargs) -> list[int]:
        dm = make(flat_gz, **kwargs)
        dm.setup("fit")
        return dm.val_set.indices

    assert val_indices() == val_indices() and val_indices() != val_indices(split_seed=1)


def test_train_subset_is_stratified_seeded_and_leaves_validation_alone(flat_gz):
    def splits(**kwargs) -> tuple[list[int], list[int], torch.Tensor]:
        dm = make(flat_gz, **kwargs)
        dm.setup("fit")
        labels = dm._read("train").tensors[1]
        return dm.train_set.indices, dm.val_set.indices, labels[dm.train_set.indices]

    full_train, full_val, _ = splits()
    train, val, labels = splits(train_subset=50)
    assert len(train) == 50 and set(train) <= set(full_train) and val == full_val
    assert torch.bincount(labels, minlength=10).tolist() == [5] * 10
    assert splits(train_subset=50)[0] == train and splits(train_subset=50, subset_seed=1)[0] != train
    with pytest.raises(ValueError, match="train_subset=181 exceeds the 180 training images left by val_size=20"):
        make(flat_gz, train_subset=181).setup("fit")
    with pytest.raises(ValueError, match=r"train_subset must be >= 1 \(or None for all training images\), got 0"):
        make(flat_gz, train_subset=0)


def test_pad_to_32(flat_gz):
    dm = make(flat_gz, pad_to_32=True)
    x, _ = next(iter(dm.test_dataloader()))
    assert dm.input_shape == (3, 32, 32) and x.shape == (16, 3, 32, 32)
    background = (0.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten(), x[..., -2:].flatten()])
    assert torch.allclose(border, torch.full_like(border, background))
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)


def test_superclass_map():
    expected = {"tops": [0, 2, 4, 6], "footwear": [5, 7, 9], "others": [1, 3, 8]}
    mapping = FashionMNISTDataModule().superclass_map
    assert mapping.dtype == torch.long and FashionMNISTDataModule().num_superclasses == 3
    for superclass, classes in enumerate(expected.values()):
        assert (mapping == superclass).nonzero().flatten().tolist() == classes


def test_two_views_and_augment_on_device(flat_gz):
    (xa, xb), y = next(iter(make(flat_gz, views=2).train_dataloader()))
    assert xa.shape == xb.shape == (16, 3, 28, 28) and y.shape == (16,) and not torch.equal(xa, xb)
    dm = make(flat_gz, views=2, augment_on_device=True, pad_to_32=True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32)
    (xa, xb), _ = dm.device_transform((x, y), train=True)
    assert xa.dtype == torch.float32 and xa.shape == (16, 3, 32, 32) and not torch.equal(xa, xb)


def test_missing_files_error_names_the_folders_and_how_to_get_them(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=rf"Fashion-MNIST not found: train-images-idx3-ubyte, .* missing from {tmp_path}/FashionMNIST/raw and "
        rf"{tmp_path}\. Get the files with `apt-get install dataset-fashion-mnist` .*download=True",
    ):
        make(tmp_path).setup("fit")


def test_malformed_files_are_errors(tmp_path):
    _, labels = fake_split(1, 0)
    path = write_idx(tmp_path / "labels", labels)
    with pytest.raises(
        ValueError, match=r"labels is not an IDX file of 3-dimensional unsigned bytes: magic number 2049, "
    ):
        read_idx(str(path), 3)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"labels is truncated or too long: shape \[10\] needs 10 bytes, it has 9"):
        read_idx(str(path), 1)
    write_fashion_mnist(tmp_path, gz=False)
    write_idx(tmp_path / FILES["test"][1], labels)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte has 50 images but .*t10k-labels-idx1-ubyte has 10"):
        make(tmp_path).setup("test")


def test_download_only_when_asked_and_missing(flat_gz, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    make(flat_gz, download=True).prepare_data()  # the files are there
    make(flat_gz.parent / "nowhere").prepare_data()  # download=False
    with pytest.raises(AssertionError, match="downloaded"):
        make(flat_gz.parent / "nowhere", download=True).prepare_data()


def test_config_parses_and_fits_on_the_fake_files(flat_gz, tmp_path, capsys):
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--data.init_args.data_dir={flat_gz}",
            "--data.init_args.val_size=20",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ]
    )
    assert cli.trainer.state.finished and cli.datamodule.input_shape == (3, 32, 32)
    assert "test/acc1" in capsys.readouterr().out


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_files():
    dm = FashionMNISTDataModule(data_dir=str(DEBIAN))
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55_000, 5_000, 10_000)
    images = dm._read("train").tensors[0][:, 0].float() / 255
    assert images.mean().item() == pytest.approx(FASHION_MNIST_MEAN[0], abs=1e-4)
    assert images.std().item() == pytest.approx(FASHION_MNIST_STD[0], abs=1e-4)
    assert torch.bincount(dm._read("test").tensors[1]).tolist() == [1000] * 10
