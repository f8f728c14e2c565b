"""The image-files base: decoding, unreadable files and class-folder scanning (through ImageFolderDataModule)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from kd_lightning.data.image_files import SkipUnreadable, UnreadableImageError, load_rgb
from tests.data.image_fakes import WNIDS as CLASSES
from tests.data.image_fakes import (
    all_batches,
    labels_from_pixels,
    write_class_folders,
    write_image,
    write_imagenet,
    write_truncated_jpeg,
)
from tests.data.image_fakes import folder_datamodule as make


@pytest.fixture
def imagenet(tmp_path) -> Path:
    return write_imagenet(tmp_path)


def test_load_rgb_converts_every_mode(tmp_path):
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")):
        path = tmp_path / f"img_{mode}.{fmt.lower()}"
        Image.new(mode, (9, 7)).save(path, fmt)
        img = load_rgb(path)
        assert (img.mode, img.size) == ("RGB", (9, 7))


def write_broken_files(root: Path) -> tuple[Path, Path]:
    """A truncated JPEG and a text file named .jpg, in the first training class."""
    truncated = write_truncated_jpeg(root / "train" / CLASSES[0] / "img_100_truncated.jpg")
    text = root / "train" / CLASSES[0] / "img_101_notes.jpg"
    text.write_text("not an image")
    return truncated, text


def test_unreadable_images_are_skipped_with_a_warning(imagenet):
    truncated, text = write_broken_files(imagenet)
    dm = make(imagenet)
    dm.setup("fit")
    assert isinstance(dm.train_set, SkipUnreadable) and len(dm.train_set) == 20
    with pytest.warns(
        UserWarning, match=r"cannot read image .*img_10[01]_.*\.jpg.*replaced by the next readable"
    ) as rec:
        x, y = all_batches(dm.train_dataloader())
    assert x.shape == (20, 3, 32, 32) and torch.equal(labels_from_pixels(x), y)  # full batches, true labels
    named = " ".join(str(w.message) for w in rec)
    assert str(truncated) in named and str(text) in named
    assert len(dm.train_set.unreadable) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad samples are not decoded (nor warned about) again
        all_batches(dm.train_dataloader())


def test_everything_unreadable_is_an_error(tmp_path):
    for k, name in enumerate(["a", "a", "b"]):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{k}.jpg").write_bytes(b"\xff\xd8 junk")
    dm = make(tmp_path)
    dm.setup("fit")
    with (
        pytest.warns(UserWarning),
        pytest.raises(RuntimeError, match="3 consecutive samples from index 0 are unreadable"),
    ):
        dm.train_set[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_raises_naming_the_file(imagenet, num_workers):
    truncated = write_truncated_jpeg(imagenet / "train" / CLASSES[1] / "img_100_truncated.jpg")
    dm = make(imagenet, strict=True, num_workers=num_workers, batch_size=32)
    with pytest.raises(UnreadableImageError, match=re.escape(str(truncated)) + ": OSError: .*[Tt]runcated"):
        all_batches(dm.train_dataloader())


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*nowhere does not exist"):
        make(tmp_path / "nowhere").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"dataset folder .*empty is empty: expected one sub-folder of images per"):
        make(tmp_path / "empty").setup()
    for k in range(3):
        write_image(tmp_path / "flat" / f"ILSVRC2012_val_{k:08d}.JPEG", 0)
    with pytest.raises(ValueError, match=r"holds 3 images but no class sub-folders: .*valprep\.sh"):
        make(tmp_path / "flat").setup()
    write_class_folders(tmp_path / "holes" / "train", ["a", "b"], 1)
    (tmp_path / "holes" / "train" / "c").mkdir()
    (tmp_path / "holes" / "train" / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of training folder .*train hold no image: .*train/c "):
        make(tmp_path / "holes").setup()
