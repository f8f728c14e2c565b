"""ImageFolderDataModule on tiny generated JPEG folders (ImageNet's train/val layout and a plain class-folder one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.data import ImageFolderDataModule
from kd_lightning.modules import ClassifierModule
from tests.data.image_fakes import (
    WNIDS,
    all_batches,
    labels_from_pixels,
    write_class_folders,
    write_image,
    write_imagenet,
)
from tests.data.image_fakes import folder_datamodule as make
from tests.helpers import fast_trainer

CLASSES = WNIDS
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 2


@pytest.fixture
def imagenet(tmp_path) -> Path:
    """``train/<wnid>/`` with 6 images per class and ``val/<wnid>/`` with 2, as ImageNet after valprep.sh."""
    return write_imagenet(tmp_path, TRAIN_PER_CLASS, VAL_PER_CLASS)


@pytest.fixture
def custom(tmp_path) -> Path:
    """A custom dataset: class folders directly under the root, 6 images each."""
    write_class_folders(tmp_path, ["cat", "dog", "fox"], TRAIN_PER_CLASS)
    return tmp_path


def test_imagenet_layout_shapes_labels_and_sizes(imagenet):
    dm = make(imagenet)
    dm.setup()
    assert (dm.classes, dm.num_classes, dm.input_shape) == (CLASSES, 3, (3, 32, 32))
    assert (len(dm.train_set), dm.val_set, len(dm.test_set)) == (18, None, 6)
    assert dm.val_dataloader() == []  # val_size=0: no validation loop
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    x, y = all_batches(dm.train_dataloader())
    assert torch.equal(labels_from_pixels(x), y)  # every crop shows its own class's colour
    assert torch.bincount(y).tolist() == [TRAIN_PER_CLASS] * 3
    x, y = all_batches(dm.test_dataloader())
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(labels_from_pixels(x), y)
    assert torch.equal(all_batches(dm.test_dataloader())[0], x)  # evaluation is deterministic


def test_test_folder_may_lack_classes_and_keeps_training_indices(tmp_path):
    write_class_folders(tmp_path / "train", CLASSES, 2)
    write_image(tmp_path / "val" / CLASSES[2] / "only.jpg", 2)
    dm = make(tmp_path)
    dm.setup("test")
    assert [dm.test_set[i][1] for i in range(len(dm.test_set))] == [2]


@pytest.mark.parametrize("augmentation", ["inception", "caffe"])
def test_both_augmentations_give_crops_of_their_class(imagenet, augmentation):
    dm = make(imagenet, augmentation=augmentation, resize_size=40)
    x, y = all_batches(dm.train_dataloader())
    assert x.shape == (18, 3, 32, 32) and torch.equal(labels_from_pixels(x), y)


def test_custom_folder_seeded_stratified_splits(custom):
    dm = make(custom, test_size=3, val_size=3)
    dm.setup()
    assert dm.classes == ["cat", "dog", "fox"] and dm.test_folder is None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 3, 3)
    test_labels = [dm.test_set[i][1] for i in range(3)]
    val_labels = [dm.val_set[i][1] for i in range(3)]
    assert sorted(test_labels) == [0, 1, 2] and sorted(val_labels) == [0, 1, 2]  # stratified
    pool = dm._scan()[1]
    test_files = set(dm._scan()[2].paths.tolist())
    assert len(pool) == 15 and not test_files & set(pool.paths.tolist())  # the test images left the pool

    def files(dm: ImageFolderDataModule) -> tuple[set, set]:
        dm.setup()
        pool = dm._scan()[1]
        val = {pool.paths[i] for i in dm.val_set.dataset.indices}
        return set(dm._scan()[2].paths.tolist()), val

    test_a, val_a = files(make(custom, test_size=3, val_size=3))
    test_b, val_b = files(make(custom, test_size=3, val_size=3, split_seed=1))
    test_c, _ = files(make(custom, test_size=3, val_size=3, test_split_seed=1))
    assert test_a == test_b and val_a != val_b  # the test set does not move with split_seed ...
    assert test_a != test_c  # ... but with test_split_seed
    assert (test_a, val_a) == files(make(custom, test_size=3, val_size=3))  # same seeds, same splits


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_batches_are_reproducible(imagenet, num_workers):
    def first_two(shuffle_seed: int) -> list:
        torch.manual_seed(123)  # the per-sample augmentation draws from the (worker's) global RNG
        loader = make(imagenet, num_workers=num_workers, shuffle_seed=shuffle_seed).train_dataloader()
        batches = iter(loader)
        return [next(batches), next(batches)]

    a, b, other = first_two(0), first_two(0), first_two(1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], other[0][1]) or not torch.equal(a[0][0], other[0][0])


def test_two_views(imagenet):
    dm = make(imagenet, views=2)
    (xa, xb), y = next(iter(dm.train_dataloader()))
    assert xa.shape == xb.shape == (4, 3, 32, 32) and y.shape == (4,)
    assert not torch.equal(xa, xb)  # independent crops and flips
    assert torch.equal(labels_from_pixels(xa), y) and torch.equal(labels_from_pixels(xb), y)
    x, _ = next(iter(dm.test_dataloader()))
    assert isinstance(x, torch.Tensor)  # evaluation stays single-view


def test_validate_on_test_set_and_fit(imagenet, tmp_path):
    dm = make(imagenet, validate_on_test_set=True)
    assert len(dm.val_dataloader().dataset) == 6
    model = ClassifierModule(backbone="resnet20", num_classes=3)
    trainer = fast_trainer(tmp_path / "run", max_epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished and "val/acc1" in trainer.callback_metrics


@pytest.mark.parametrize("train_dir", ["", "train"])
def test_single_class_is_an_error(tmp_path, train_dir):
    write_class_folders(tmp_path / train_dir, ["cat"], 2)
    match = r"folder .* has a single class folder, 'cat': classification needs at least 2 classes"
    with pytest.raises(ValueError, match=match):
        make(tmp_path).setup()
    with pytest.raises(ValueError, match=match):
        make(tmp_path).num_classes  # noqa: B018 (what the model's num_classes check reads)


def test_test_folder_without_train_folder(tmp_path):
    write_class_folders(tmp_path / "val", CLASSES, 1)
    with pytest.raises(ValueError, match=r"has a 'val' folder but no 'train' folder: put the training images in"):
        make(tmp_path).setup()


def test_test_folder_errors(imagenet):
    write_image(imagenet / "val" / "n99999999" / "x.jpg", 0)
    with pytest.raises(ValueError, match=r"test folder .*val has 1 class folder\(s\) .* lacks: n99999999"):
        make(imagenet).setup("test")


def test_missing_test_set_error(custom):
    dm = make(custom)
    dm.setup("fit")  # training needs no test set
    with pytest.raises(
        ValueError, match=r"has no test images: there is no .*val folder and test_size=0; pass test_size"
    ):
        dm.setup("test")
    with pytest.raises(ValueError, match=r"test_size=18 leaves no training images \(there are 18\)"):
        make(custom, test_size=18).setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop_size": 0}, "crop_size must be >= 1, got 0"),
        ({"resize_size": 16}, "resize_size must be >= crop_size=32 .or None., got 16"),
        ({"augmentation": "autoaugment"}, "augmentation must be 'inception' or 'caffe', got 'autoaugment'"),
        ({"mean": (0.5, 0.5)}, "mean and std need one value per RGB channel, got 2 and 3"),
        ({"test_size": -1}, "test_size must be >= 0, got -1"),
        (
            {"validate_on_test_set": True, "val_size": 5},
            "validate_on_test_set=True validates on the test set: it needs",
        ),
    ],
)
def test_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, **kwargs)


def test_default_workers_are_bounded():
    dm = ImageFolderDataModule()
    assert 1 <= dm.num_workers <= 8 and dm.pin_memory == torch.cuda.is_available()


def test_custom_test_dir(tmp_path):
    write_class_folders(tmp_path / "train", CLASSES, 2)
    write_class_folders(tmp_path / "held_out", CLASSES, 1)
    dm = make(tmp_path, test_dir="held_out")
    dm.setup("test")
    assert dm.test_folder == str(tmp_path / "held_out") and len(dm.test_set) == 3


def test_val_dir_is_a_deprecated_alias_of_test_dir(tmp_path):
    write_class_folders(tmp_path / "train", CLASSES, 2)
    write_class_folders(tmp_path / "held_out", CLASSES, 1)
    with pytest.warns(FutureWarning, match="val_dir is deprecated .*: use test_dir"):
        dm = make(tmp_path, val_dir="held_out")
    assert dm.test_dir == "held_out"
    with pytest.warns(FutureWarning, match="val_folder is deprecated .*: use test_folder"):
        assert dm.val_folder == dm.test_folder == str(tmp_path / "held_out")
    with pytest.warns(FutureWarning, match="val_dir is deprecated .*: use test_dir"):
        assert dm.val_dir == "held_out"
    with (
        pytest.warns(FutureWarning),
        pytest.raises(ValueError, match="val_dir='a' is the old name of test_dir='b': give only test_dir"),
    ):
        make(tmp_path, val_dir="a", test_dir="b")


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_val_dir_in_a_config_still_runs(imagenet, tmp_path):
    """A config saved before the rename (``val_dir: val``) still runs, with the warning naming test_dir."""
    from kd_lightning.cli import main

    config = tmp_path / "old.yaml"
    data = f"{{root: {imagenet}, val_dir: val, crop_size: 32, batch_size: 4, num_workers: 0}}"
    config.write_text(
        "model: {class_path: kd_lightning.ClassifierModule, init_args: {backbone: resnet8_w8, num_classes: 3}}\n"
        f"data: {{class_path: kd_lightning.ImageFolderDataModule, init_args: {data}}}\n"
    )
    run = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_test_batches=1"]
    with pytest.warns(FutureWarning, match="val_dir is deprecated .*: use test_dir"):
        cli = main(
            ["fit", "--config", str(config), *run, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
        )
    assert cli.datamodule.test_dir == "val" and cli.trainer.state.finished


def test_names_moved_to_image_files_and_transforms_still_import_with_a_warning():
    import kd_lightning.data.image_files as image_files
    import kd_lightning.data.imagenet as imagenet
    import kd_lightning.data.transforms as transforms

    with pytest.warns(FutureWarning, match=r"imagenet\.load_rgb moved to kd_lightning\.data\.image_files\.load_rgb"):
        assert imagenet.load_rgb is image_files.load_rgb
    with pytest.warns(FutureWarning, match="moved to kd_lightning.data.transforms.IMAGENET_MEAN"):
        from kd_lightning.data.imagenet import IMAGENET_MEAN
    assert IMAGENET_MEAN is transforms.IMAGENET_MEAN
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        imagenet.nothing  # noqa: B018
