"""Transfer-learning datamodules on tiny fake datasets in their real on-disk layouts (read by torchvision's classes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision.datasets.dtd as tv_dtd
import torchvision.datasets.flowers102 as tv_flowers

import kd_lightning.data.transfer as transfer
from kd_lightning.data import CUB200DataModule, DTDDataModule, FGVCAircraftDataModule, Flowers102DataModule
from kd_lightning.data.image_files import SkipUnreadable
from kd_lightning.models.torchvision_models import resolve_weights
from tests.data.image_fakes import (
    AIRCRAFT,
    CUB_CLASSES,
    DTD_CLASSES,
    labels_from_pixels,
    write_cub,
    write_dtd,
    write_fgvc_aircraft,
    write_flowers102,
    write_truncated_jpeg,
)

FLOWER_SPLITS = {"train": [0, 1, 2, 0], "val": [1, 2, 0], "test": [2, 1, 0, 0, 1]}


@pytest.fixture
def no_md5(monkeypatch):
    """Flowers102's integrity check minus the md5 (our .mat files are not the official ones): the file must exist."""
    monkeypatch.setattr(tv_flowers, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def make(cls: type, root: Path, **kwargs):
    return cls(**{"data_dir": str(root), "crop_size": 32, "batch_size": 4, "num_workers": 0, **kwargs})


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def check_loads(dm, train_labels: list[int], test_labels: list[int]) -> None:
    """Splits of the expected sizes and labels; every batch of ImageNet-style crops shows its own class."""
    dm.setup()
    assert dm.input_shape == (3, 32, 32) and len(dm.train_set) == len(train_labels)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    x, y = all_batches(dm.train_dataloader())
    assert sorted(y.tolist()) == sorted(train_labels) and torch.equal(labels_from_pixels(x), y)
    x, y = all_batches(dm.test_dataloader())
    assert y.tolist() == test_labels and torch.equal(labels_from_pixels(x), y)
    assert int(y.max()) < dm.num_classes


@pytest.mark.parametrize("train_split", ["trainval", "train"])
def test_flowers102(tmp_path, no_md5, train_split):
    write_flowers102(tmp_path, FLOWER_SPLITS)
    dm = make(Flowers102DataModule, tmp_path, train_split=train_split)
    pool = FLOWER_SPLITS["train"] + (FLOWER_SPLITS["val"] if train_split == "trainval" else [])
    check_loads(dm, pool, FLOWER_SPLITS["test"])
    assert dm.num_classes == 102


@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
def test_fgvc_aircraft(tmp_path, level):
    variants = write_fgvc_aircraft(tmp_path, {"train": 2, "val": 1, "test": 1})
    dm = make(FGVCAircraftDataModule, tmp_path, annotation_level=level)
    names = {
        "variant": list(AIRCRAFT),
        "family": sorted({f for f, _ in AIRCRAFT.values()}),
        "manufacturer": sorted({m for _, m in AIRCRAFT.values()}),
    }[level]
    column = {"variant": None, "family": 0, "manufacturer": 1}[level]

    def labels(split: str) -> list[int]:
        return [names.index(v if column is None else AIRCRAFT[v][column]) for v in variants[split]]

    dm.setup()
    _, y = all_batches(dm.test_dataloader())
    assert y.tolist() == labels("test") and len(dm.train_set) == len(variants["trainval"])
    assert dm.num_classes == {"variant": 100, "family": 70, "manufacturer": 30}[level]
    if level == "variant":  # colours are per variant: check the images too
        check_loads(make(FGVCAircraftDataModule, tmp_path), labels("trainval"), labels("test"))
        train_only = make(FGVCAircraftDataModule, tmp_path, train_split="train")
        train_only.setup("fit")
        assert len(train_only.train_set) == len(variants["train"])


def test_fgvc_aircraft_superclass_map(tmp_path):
    write_fgvc_aircraft(tmp_path, {"train": 1, "val": 1, "test": 1})
    families = sorted({f for f, _ in AIRCRAFT.values()})
    makers = sorted({m for _, m in AIRCRAFT.values()})
    variant_map = make(FGVCAircraftDataModule, tmp_path).superclass_map
    assert variant_map.tolist() == [families.index(f) for f, _ in AIRCRAFT.values()]
    family_map = make(FGVCAircraftDataModule, tmp_path, annotation_level="family").superclass_map
    family_of = {f: m for f, m in AIRCRAFT.values()}
    assert family_map.tolist() == [makers.index(family_of[f]) for f in families]
    assert make(FGVCAircraftDataModule, tmp_path, annotation_level="manufacturer").superclass_map is None


def test_fgvc_aircraft_inconsistent_hierarchy(tmp_path):
    write_fgvc_aircraft(tmp_path, {"train": 1, "val": 1, "test": 1})
    path = tmp_path / "fgvc-aircraft-2013b" / "data" / "images_family_test.txt"
    first, *rest = path.read_text().splitlines(keepends=True)
    path.write_text(first.split(" ", 1)[0] + " A300\n" + "".join(rest))  # a 707-320 image filed under A300
    with pytest.raises(
        ValueError, match=r"variant '707-320' belongs to two family classes \('Boeing 707' and 'A300'\)"
    ):
        make(FGVCAircraftDataModule, tmp_path).superclass_map  # noqa: B018


def test_dtd(tmp_path):
    write_dtd(tmp_path, {"train": 2, "val": 1, "test": 1}, partition=3)
    dm = make(DTDDataModule, tmp_path, partition=3)
    check_loads(dm, [0, 0, 1, 1, 2, 2, 0, 1, 2], [0, 1, 2])
    assert dm.num_classes == 47 and len(DTD_CLASSES) == 3


def test_dtd_splits_must_agree(tmp_path):
    write_dtd(tmp_path, {"train": 1, "val": 1, "test": 1})
    labels = tmp_path / "dtd" / "dtd" / "labels" / "val1.txt"
    labels.write_text("".join(line for line in labels.read_text().splitlines(True) if not line.startswith("dotted")))
    with pytest.raises(ValueError, match=r"DTD's val1\.txt and test1\.txt in .* list different classes \(2 and 3\)"):
        make(DTDDataModule, tmp_path).setup("fit")


def test_cub200(tmp_path):
    write_cub(tmp_path, train_per_class=3, test_per_class=2)
    dm = make(CUB200DataModule, tmp_path)
    check_loads(dm, [0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 2, 2])
    assert dm.classes == CUB_CLASSES and dm.num_classes == 200


def test_cub200_files_must_agree(tmp_path):
    write_cub(tmp_path, train_per_class=1, test_per_class=1)
    split = tmp_path / "CUB_200_2011" / "train_test_split.txt"
    split.write_text("".join(split.read_text().splitlines(True)[:-1]))
    with pytest.raises(ValueError, match=r"train_test_split\.txt and images\.txt list different image ids \(5 and 6"):
        make(CUB200DataModule, tmp_path).setup()
    write_cub(tmp_path / "bad", train_per_class=1, test_per_class=1)
    labels = tmp_path / "bad" / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("6 3\n", "6 201\n"))
    with pytest.raises(ValueError, match=r"class ids outside 1\.\.3 \(classes\.txt\): \[201\]"):
        make(CUB200DataModule, tmp_path / "bad").setup()


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (Flowers102DataModule, r"Flowers102 not found or incomplete in .*flowers-102 .*expected flowers-102/jpg/"),
        (FGVCAircraftDataModule, r"FGVCAircraft not found or incomplete in .*fgvc-aircraft-2013b .*expected fgvc"),
        (DTDDataModule, r"DTD not found or incomplete in .*dtd/dtd .*expected dtd/dtd/images/<class>/"),
        (CUB200DataModule, r"CUB-200-2011 not found or incomplete in .*CUB_200_2011 \(missing: images\.txt, image_c"),
    ],
)
def test_missing_data_says_where_and_how(tmp_path, cls, match):
    dm = make(cls, tmp_path)
    dm.prepare_data()  # download=False: nothing happens
    with pytest.raises(RuntimeError, match=match) as info:
        dm.setup("fit")
    assert "Pass download=True" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created


def test_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, *args, **kwargs):
        calls.append(url)
        write_dtd(Path(download_root).parent, {"train": 1, "val": 1, "test": 1})  # the archive unpacks to dtd/dtd

    monkeypatch.setattr(tv_dtd, "download_and_extract_archive", fake_download)
    make(DTDDataModule, tmp_path).prepare_data()
    assert calls == []
    dm = make(DTDDataModule, tmp_path, download=True)
    dm.prepare_data()
    dm.prepare_data()  # already there: no second download
    assert calls == [tv_dtd.DTD._URL]
    dm.setup()
    assert len(dm.train_set) == 6


def test_cub200_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append((url, download_root, filename, md5))
        write_cub(Path(download_root), 1, 1)

    monkeypatch.setattr(transfer, "download_and_extract_archive", fake_download)
    make(CUB200DataModule, tmp_path).prepare_data()
    assert calls == []
    dm = make(CUB200DataModule, tmp_path, download=True)
    dm.prepare_data()
    dm.prepare_data()
    assert calls == [(transfer.CUB_URL, str(tmp_path), "CUB_200_2011.tgz", transfer.CUB_MD5)]


def test_unreadable_image_is_skipped(tmp_path):
    write_cub(tmp_path, train_per_class=2, test_per_class=1)
    broken = tmp_path / "CUB_200_2011" / "images" / CUB_CLASSES[1] / "Laysan_Albatross_0000_4.jpg"
    write_truncated_jpeg(broken)
    dm = make(CUB200DataModule, tmp_path)
    dm.setup("fit")
    assert isinstance(dm.train_set, SkipUnreadable)
    with pytest.warns(UserWarning, match="cannot read image .*Laysan_Albatross_0000_4.jpg"):
        x, y = all_batches(dm.train_dataloader())
    assert x.shape == (6, 3, 32, 32) and torch.equal(labels_from_pixels(x), y)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (Flowers102DataModule, {"train_split": "all"}, "train_split must be 'train' or 'trainval', got 'all'"),
        (DTDDataModule, {"partition": 11}, r"partition must be in 1\.\.10 \(DTD's official partitions\), got 11"),
        (FGVCAircraftDataModule, {"annotation_level": "model"}, "annotation_level must be one of .*, got 'model'"),
    ],
)
def test_argument_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_configs_pretrained_weights_resolve_without_download():
    """The transfer configs' ImageNet weights name exists for resnet101 (resolving it downloads nothing)."""
    assert resolve_weights("resnet101", "IMAGENET1K_V1").url.endswith(".pth")
