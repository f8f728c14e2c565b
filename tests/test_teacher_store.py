"""The teacher store: its files, its checks, and the recorded views the datamodules replay from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from kd_lightning.cli import main
from kd_lightning.data import FashionMNISTDataModule
from kd_lightning.data.replay import PadCropFlip, ResizedCropFlip, sample_generator
from kd_lightning.data.store_views import StoredDrawSampler
from kd_lightning.models.registry import create_backbone
from kd_lightning.targets import topk_target
from kd_lightning.teacher_store import (
    StoreLayout,
    StoreSpec,
    TeacherStore,
    TeacherStoreMismatch,
    build_store,
    weights_sha256,
)
from tests.data.image_fakes import folder_datamodule, write_imagenet
from tests.data.test_fashion_mnist import write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
C, T = 10, 3.0


def spec(rows: int = 12, topk: int = 4, params: int = 3, **changes) -> StoreSpec:
    layout = StoreLayout(rows, params, {"class": "Fake", "sha256": "abc"}, {"kind": "pad_crop_flip"})
    return StoreSpec(**{"teacher_sha256": "t", "temperature": T, "num_classes": C, "topk": topk, "draws": 2,
                        "layout": layout, **changes})  # fmt: skip


def written(path, store_spec: StoreSpec, logits: torch.Tensor, params: torch.Tensor | None = None) -> TeacherStore:
    """A finished store of ``logits`` (one row each), written in two interleaved shares as two ranks would."""
    store = TeacherStore(path)
    rows = torch.arange(len(logits))
    shares = [(logits[r::2], rows[r::2], None if params is None else params[r::2]) for r in range(2)]
    build_store(store, store_spec, shares, lambda share_logits: share_logits)
    store.open(store_spec)
    return store


# ------------------------------------------------------------------------------------------------ the files
def test_round_trip_memory_mapped(tmp_path):
    torch.manual_seed(0)
    logits, params = torch.randn(12, C) * 3, torch.randint(0, 9, (12, 3), dtype=torch.int32)
    store = written(tmp_path / "store", spec(), logits, params)
    probs = (logits / T).softmax(-1)
    rows = torch.tensor([5, 0, 11, 5])
    values, indices, rest = store.targets(rows)
    top = probs[rows].topk(4)
    torch.testing.assert_close(values, top.values, atol=1e-3, rtol=0)  # float16
    assert torch.equal(indices, top.indices) and indices.dtype == torch.long
    torch.testing.assert_close(rest, (1 - top.values.sum(-1)) / (C - 4), atol=1e-6, rtol=0)
    assert torch.equal(store.params(rows), params[rows]) and torch.equal(store.params(3), params[3])
    # memory-mapped numpy files, 2-byte values and indices
    values_file = np.load(tmp_path / "store" / "values.npy", mmap_mode="r")
    assert isinstance(values_file, np.memmap) and values_file.dtype == np.float16
    assert np.load(tmp_path / "store" / "indices.npy", mmap_mode="r").dtype == np.int16
    # fewer entries than stored: KD-topk's target of the teacher's distribution
    dense = torch.zeros(4, C).scatter(1, indices[:, :2], values[:, :2])
    values2, indices2, rest2 = store.targets(rows, k=2)
    dense += rest2[:, None] * (dense == 0)
    torch.testing.assert_close(dense, topk_target(probs[rows], 2), atol=2e-3, rtol=0)
    assert values2.shape == (4, 2) and torch.equal(indices2, indices[:, :2])


def test_k_equal_to_the_classes_is_the_whole_distribution(tmp_path):
    logits = torch.randn(6, C)
    store = written(tmp_path, spec(rows=6, topk=C, params=0), logits)
    values, indices, rest = store.targets(torch.arange(6))
    dense = torch.zeros(6, C).scatter(1, indices, values)
    torch.testing.assert_close(dense, (logits / T).softmax(-1), atol=1e-3, rtol=0)
    assert torch.equal(rest, torch.zeros(6)) and store.params(torch.arange(6)).shape == (6, 0)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"teacher_sha256": "another"}, "teacher_sha256"),
        ({"temperature": 2.0}, "temperature"),
        (
            {"layout": StoreLayout(12, 3, {"class": "Fake", "sha256": "other"}, {"kind": "pad_crop_flip"})},
            "layout.dataset",
        ),
        (
            {"layout": StoreLayout(12, 3, {"class": "Fake", "sha256": "abc"}, {"kind": "resized"})},
            "layout.augmentation",
        ),
        ({"topk": 3}, "topk"),
    ],
)
def test_a_store_refuses_another_run(tmp_path, change, named):
    written(tmp_path, spec(), torch.randn(12, C))
    with pytest.raises(TeacherStoreMismatch, match=f"was made for another run:\n  {named}.*in the store"):
        TeacherStore(tmp_path).open(spec(**change))


def test_an_unfinished_store_is_no_store(tmp_path):
    store = TeacherStore(tmp_path)
    store.create(spec())
    assert store.metadata() is None
    with pytest.raises(FileNotFoundError, match="no finished teacher store"):
        store.open(spec())
    with pytest.raises(ValueError, match="1 <= k <= num_classes=10"):
        spec(topk=11)


def test_teacher_identity_is_its_weights():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert weights_sha256(a) != weights_sha256(b)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)


# ---------------------------------------------------------------------------------------- recorded augmentation
def test_pad_crop_flip_replays_pad_crop_and_flip_per_sample_and_per_batch():
    augmentation = PadCropFlip(8, padding=2, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    params = augmentation.draw(images[0], 5, sample_generator(0, 1))
    assert params.shape == (5, 3) and params[:, :2].max() <= 4 and set(params[:, 2].tolist()) <= {0, 1}
    batch = augmentation.replay_batch(images, params)
    for image, p, view in zip(images, params, batch, strict=True):
        top, left, flip = p.tolist()
        crop = torch.nn.functional.pad(image, (2, 2, 2, 2))[:, top : top + 8, left : left + 8]
        crop = crop.flip(-1) if flip else crop
        assert torch.equal(view, (crop.float() / 255 - 0.5) / 0.25)
        assert torch.equal(augmentation.replay(image, p), view)  # the per-sample path: the same pixels
    assert torch.equal(params, augmentation.draw(images[0], 5, sample_generator(0, 1)))  # seeded


def test_resized_crop_flip_replays_torchvision_ops():
    augmentation = ResizedCropFlip(16, mean=(0.5,) * 3, std=(0.25,) * 3)
    image = v2.functional.to_pil_image(torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8))
    params = augmentation.draw(image, 20, sample_generator(0, 0))
    top, left, height, width, flip = params.T
    assert ((top + height <= 40) & (left + width <= 30) & (height > 0) & (width > 0)).all()
    assert len(set(map(tuple, params.tolist()))) > 10 and set(flip.tolist()) == {0, 1}
    top, left, height, width, flip = params[0].tolist()
    expected = v2.functional.resized_crop(image, top, left, height, width, [16, 16], antialias=True)
    expected = v2.functional.horizontal_flip(expected) if flip else expected
    expected = (v2.functional.pil_to_tensor(expected).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(augmentation.replay(image, params[0]), expected, atol=1e-6, rtol=0)


def test_sampler_draws_one_view_per_sample_seeded_by_the_epoch():
    sampler = StoredDrawSampler(50, 4, seed=3)
    epoch0 = list(sampler)
    assert sorted(row // 4 for row in epoch0) == list(range(50)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


def _linear_teacher(in_features: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, C))


def _build(datamodule, path, draws: int, teacher: torch.nn.Module) -> TeacherStore:
    """The datamodule's store of ``draws`` views, built as a module does, then served by the datamodule."""
    layout = datamodule.teacher_store_layout(draws)
    store_spec = StoreSpec(weights_sha256(teacher), T, C, C, draws, layout)
    store = TeacherStore(path)
    build_store(store, store_spec, datamodule.teacher_store_dataloader(draws, 0), lambda v: teacher(v.flatten(0, 1)))
    store.open(store_spec)
    datamodule.use_teacher_store(store, draws)
    return store


def _assert_views_are_the_recorded_ones(store, teacher, batches) -> None:
    """Each training view gives the teacher's stored output for its row: the student sees what the teacher saw."""
    seen = 0
    for x, _, rows in batches:
        values, indices, _ = store.targets(rows)
        stored = torch.zeros(len(rows), C).scatter(1, indices, values)
        torch.testing.assert_close(stored, (teacher(x) / T).softmax(-1), atol=1e-3, rtol=0)
        seen += len(rows)
    assert seen > 0


@pytest.mark.parametrize("on_device", [False, True])
def test_small_images_serve_the_recorded_views(tmp_path, on_device):
    write_fashion_mnist(tmp_path, gz=True)
    datamodule = FashionMNISTDataModule(
        data_dir=str(tmp_path), val_size=0, batch_size=32, augment_on_device=on_device, pad_to_32=True
    )
    teacher = _linear_teacher(3 * 32 * 32)
    store = _build(datamodule, tmp_path / "store", 3, teacher)
    assert store.spec.layout.rows == 200 * 3 and store.spec.layout.augmentation["kind"] == "pad_crop_flip"
    loader = datamodule.train_dataloader()
    batches = [datamodule.device_transform(batch, train=True) for batch in loader]
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) for x, _, _ in batches)
    with torch.no_grad():
        _assert_views_are_the_recorded_ones(store, teacher, batches)
    rows = torch.cat([rows for _, _, rows in batches])
    assert sorted((rows // 3).tolist()) == list(range(200))  # each sample once, one of its draws
    if on_device:  # the per-sample replay of the same rows: the same pixels
        raw, _, rows = next(iter(loader))
        replay = datamodule.recorded_augmentation.replay
        per_sample = [replay(image, store.params(int(r))) for image, r in zip(raw, rows, strict=True)]
        assert torch.equal(torch.stack(per_sample), datamodule.device_transform((raw, None, rows), train=True)[0])


def test_image_folders_serve_the_recorded_random_resized_crops(tmp_path):
    datamodule = folder_datamodule(write_imagenet(tmp_path / "imagenet"), val_size=0)
    teacher = _linear_teacher(3 * 32 * 32)
    store = _build(datamodule, tmp_path / "store", 2, teacher)
    assert store.spec.layout.augmentation["kind"] == "resized_crop_flip" and store.spec.layout.params == 5
    with torch.no_grad():
        _assert_views_are_the_recorded_ones(store, teacher, datamodule.train_dataloader())


def test_what_a_store_cannot_record_is_refused(tmp_path):
    caffe = folder_datamodule(write_imagenet(tmp_path / "imagenet"), val_size=0, augmentation="caffe")
    with pytest.raises(ValueError, match="ImageFolderDataModule's training augmentation cannot be recorded"):
        caffe.teacher_store_layout(2)
    write_fashion_mnist(tmp_path, gz=True)
    two_views = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=0, views=2)
    with pytest.raises(ValueError, match="one view per sample: set FashionMNISTDataModule's views=1"):
        two_views.teacher_store_layout(1)


def test_the_fashion_mnist_kd_config_builds_and_reads_a_store(tmp_path):
    """The grid's student as a user runs it: the first fit builds the store (views replayed on the device), a second
    run with another seed reads it."""
    write_fashion_mnist(tmp_path / "data", gz=True)
    torch.save(create_backbone("resnet8_w8", 10).state_dict(), tmp_path / "teacher.pt")
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "fashion_mnist" / "kd_resnet20_from_resnet56.yaml"),
        "--model.init_args.backbone=resnet8_w8",
        "--model.init_args.teacher_backbone=resnet8_w8",
        f"--model.init_args.teacher_checkpoint={tmp_path / 'teacher.pt'}",
        f"--model.init_args.teacher_store={tmp_path / 'store'}",
        "--model.init_args.store_draws=2",
        f"--data.init_args.data_dir={tmp_path / 'data'}",
        "--data.init_args.val_size=20",
        "--data.init_args.train_subset=null",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        "--test_after_fit=false",
    ]
    main([*args, f"--trainer.default_root_dir={tmp_path / 'first'}"])
    meta = TeacherStore(tmp_path / "store").metadata()
    assert meta["spec"]["layout"]["rows"] == 180 * 2 and meta["spec"]["layout"]["augmentation"]["padding"] == 4
    cli = main([*args, "--seed_everything=1", f"--trainer.default_root_dir={tmp_path / 'second'}"])
    assert cli.trainer.state.finished and cli.model.stored_teacher.store.spec.draws == 2
