from __future__ import annotations

import inspect
import io
import pickle
import re
import typing
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from kd_lightning.data.base import ClassificationDataModule, DataAttribute, DataProtocol, data_attribute
from kd_lightning.data.subsets import TransformedSubset, stratified_split
from kd_lightning.data.transforms import BatchAugment

NUM_CLASSES = 4
pytestmark = pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # val_size=0


class ToyDataModule(ClassificationDataModule):
    """60 training / 20 test uint8 images (1, 4, 4); pixel [0, 0, 0] is the sample's index (to track order)."""

    def __init__(self, device_augment: bool = False, noisy: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noisy = noisy
        if device_augment:
            self.batch_augment = BatchAugment((0.5,), (0.5,), padding=1, flip=True)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 4, 4)

    @staticmethod
    def _make(n: int) -> TensorDataset:
        x = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
        return TensorDataset(x, torch.arange(n) % NUM_CLASSES)

    def _load_train_pool(self):
        ds = self._make(60)
        return ds, ds.tensors[1]

    def _load_test_set(self):
        return self._make(20)

    def _train_transform(self):
        if self.batch_augment is not None:
            return None
        return (lambda x: x.float() + torch.rand(x.shape)) if self.noisy else (lambda x: x.float())

    def _eval_transform(self):
        return None if self.batch_augment is not None else (lambda x: x.float())


def sample_ids(batch_x: torch.Tensor) -> list[int]:
    return batch_x[:, 0, 0, 0].round().long().tolist()


class Recorder(pl.LightningModule):
    """Tiny model that records what its steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, NUM_CLASSES)
        self.train_batches: list = []
        self.val_batches: list = []
        self.epoch_ids: dict[int, list[int]] = {}

    def forward(self, x):
        return self.layer(x.float().flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_batches.append((x, y))
        first = x[0] if isinstance(x, tuple) else x
        if first.dtype != torch.uint8 and first.min() >= 0:  # un-normalised toy batches carry the sample index
            self.epoch_ids.setdefault(self.current_epoch, []).extend(sample_ids(first))
        return nn.functional.cross_entropy(self(first), y)

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    return pl.Trainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------- split
def test_stratified_split_partitions_and_keeps_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rest, held = stratified_split(labels, 10, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([rest, held]).sort().values, torch.arange(100))
    assert torch.bincount(labels[held]).tolist() == [5, 3, 2]
    assert torch.equal(held, held.sort().values) and torch.equal(rest, rest.sort().values)


def test_stratified_split_gives_remainders_to_the_largest_fractions():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)  # quotas for 5: 3, 1.5, 0.5
    for seed in range(5):
        _, held = stratified_split(labels, 5, torch.Generator().manual_seed(seed))
        counts = torch.bincount(labels[held], minlength=3).tolist()
        assert counts[0] == 3 and sorted(counts[1:]) in ([1, 1], [0, 2]) and sum(counts) == 5


def test_stratified_split_is_seeded():
    labels = torch.arange(200) % 7
    a = stratified_split(labels, 30, torch.Generator().manual_seed(1))[1]
    b = stratified_split(labels, 30, torch.Generator().manual_seed(1))[1]
    c = stratified_split(labels, 30, torch.Generator().manual_seed(2))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(stratified_split(labels, 0, torch.Generator())[1]) == 0


def test_stratified_split_errors():
    with pytest.raises(ValueError, match="Cannot hold out 11 of 10 samples"):
        stratified_split(torch.zeros(10, dtype=torch.long), 11, torch.Generator())


def test_transformed_subset():
    ds = TensorDataset(torch.arange(5), torch.arange(5))
    subset = TransformedSubset(ds, torch.tensor([3, 1]), lambda x: x * 10)
    assert len(subset) == 2 and subset[0] == (30, 3)
    assert len(TransformedSubset(ds)) == 5


# ----------------------------------------------------------------------------------------------- datamodule
def test_constructor_errors():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        ToyDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"eval_batch_size must be >= 1 \(or None for batch_size\), got 0"):
        ToyDataModule(eval_batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        ToyDataModule(num_workers=-1)
    with pytest.raises(ValueError, match=r"val_size must be >= 0 \(0: no validation split\), got -1"):
        ToyDataModule(val_size=-1)
    with pytest.raises(ValueError, match="views must be 1 or 2, got 3"):
        ToyDataModule(views=3)


def test_val_size_too_large():
    with pytest.raises(ValueError, match="val_size=60 leaves no training samples: the training pool has 60"):
        ToyDataModule(val_size=60).setup("fit")


def test_split_sizes_and_seeds():
    dm = ToyDataModule(val_size=12, split_seed=3)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (48, 12, 20)
    same, other = ToyDataModule(val_size=12, split_seed=3), ToyDataModule(val_size=12, split_seed=4)
    same.setup("fit")
    other.setup("fit")
    assert dm.val_set.indices == same.val_set.indices != other.val_set.indices
    # the split ignores the global RNG and the shuffle seed
    torch.manual_seed(99)
    assert ToyDataModule(val_size=12, split_seed=3, shuffle_seed=5).train_dataloader().dataset.indices == (
        dm.train_set.indices
    )


def test_validation_uses_the_eval_transform():
    dm = ToyDataModule(val_size=8, noisy=True)
    dm.setup("fit")
    x, _ = dm.val_set[0]
    assert torch.equal(x, x.round())  # eval transform: no noise
    x, _ = dm.train_set[0]
    assert not torch.equal(x, x.round())


def test_loader_options():
    dm = ToyDataModule(batch_size=8, eval_batch_size=32, val_size=4, drop_last=True, pin_memory=False)
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert (train.batch_size, val.batch_size, test.batch_size) == (8, 32, 32)
    assert train.drop_last and not test.drop_last
    assert len(train) == 56 // 8 and not train.pin_memory
    assert train.sampler.generator is dm.shuffle_generator and train.generator is dm.worker_seed_generator
    assert val.generator is not None and val.generator is not test.generator
    assert len(dm.predict_dataloader().dataset) == 20
    assert ToyDataModule().pin_memory is torch.cuda.is_available()
    workers = ToyDataModule(num_workers=2)
    assert workers.train_dataloader().persistent_workers and workers.test_dataloader().num_workers == 2
    assert not ToyDataModule().train_dataloader().persistent_workers


def test_default_properties():
    dm = ToyDataModule()
    assert dm.superclass_map is None and dm.num_superclasses is None
    base = ClassificationDataModule()
    for name in ("num_classes", "input_shape"):
        with pytest.raises(NotImplementedError):
            getattr(base, name)


def test_creating_iterators_never_touches_the_global_rng():
    dm = ToyDataModule(val_size=8)
    state = torch.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        iter(loader)
    list(dm.val_dataloader())
    list(dm.test_dataloader())
    assert torch.equal(state, torch.get_rng_state())


def test_shuffle_seed_defaults_to_the_initial_seed():
    torch.manual_seed(1234)
    assert ToyDataModule().shuffle_seed == 1234
    orders = []
    for _ in range(2):
        pl.seed_everything(7)
        torch.rand(3)  # what happens to the global RNG after construction does not matter
        orders.append([sample_ids(x) for x, _ in ToyDataModule(batch_size=60).train_dataloader()])
        torch.rand(5)
    assert orders[0] == orders[1]
    assert ToyDataModule(shuffle_seed=1).shuffle_seed == 1


def test_state_dict_reproduces_the_shuffling_order():
    dm = ToyDataModule(batch_size=60, shuffle_seed=0)
    loader = dm.train_dataloader()
    first_epoch = sample_ids(next(iter(loader))[0])
    state = dm.state_dict()
    second_epoch = sample_ids(next(iter(loader))[0])
    assert first_epoch != second_epoch
    dm.load_state_dict(state)  # in place: the loader built before sees it
    assert sample_ids(next(iter(loader))[0]) == second_epoch
    fresh = ToyDataModule(batch_size=60, shuffle_seed=123)
    fresh.load_state_dict(state)
    assert sample_ids(next(iter(fresh.train_dataloader()))[0]) == second_epoch


class GeneratorRefusingPickler(pickle.Pickler):
    """A pickler that fails on a ``torch.Generator`` (pickled by torch as a state tensor made on the fly, which
    ``ddp_spawn``'s shared-memory transfer frees before the child process starts)."""

    def reducer_override(self, obj: object) -> object:
        assert not isinstance(obj, torch.Generator), "a torch.Generator was pickled as such"
        return NotImplemented


def test_pickled_copy_continues_the_shuffling_order():
    dm = ToyDataModule(batch_size=60, shuffle_seed=0)
    torch.randperm(60, generator=dm.shuffle_generator)  # as one epoch would
    buffer = io.BytesIO()
    GeneratorRefusingPickler(buffer).dump(dm)
    copied = pickle.loads(buffer.getvalue())
    assert copied.shuffle_generator is not dm.shuffle_generator
    assert sample_ids(next(iter(copied.train_dataloader()))[0]) == sample_ids(next(iter(dm.train_dataloader()))[0])
    for name, state in dm.state_dict().items():
        assert torch.equal(copied.state_dict()[name], state)


def test_views_two_gives_two_views_and_one_label():
    dm = ToyDataModule(views=2, noisy=True, val_size=8, batch_size=16)
    (a, b), y = next(iter(dm.train_dataloader()))
    assert a.shape == b.shape == (16, 1, 4, 4) and y.shape == (16,)
    assert not torch.equal(a, b) and torch.equal(a.floor(), b.floor())  # same images, independent noise
    x, y = next(iter(dm.val_dataloader()))
    assert isinstance(x, torch.Tensor) and x.shape == (8, 1, 4, 4)


# ---------------------------------------------------------------------------------------------- with Trainer
def test_val_size_zero_skips_validation(tmp_path):
    dm = ToyDataModule(val_size=0, batch_size=20)
    assert dm.val_dataloader() == []
    model = Recorder()
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(model, datamodule=dm)
    assert len(model.train_batches) == 6  # 60 samples, 3 batches, 2 epochs
    assert model.val_batches == []
    assert fit.num_val_batches == [0]  # Lightning reads [] as one empty loader and skips the loop (sanity check too)
    assert len(dm.train_set) == 60


def test_validation_runs_with_a_split(tmp_path):
    dm = ToyDataModule(val_size=10, batch_size=20)
    model = Recorder()
    trainer(tmp_path, num_sanity_val_steps=0).fit(model, datamodule=dm)
    assert len(model.val_batches) == 1 and len(model.val_batches[0][1]) == 10


class StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_checkpoint_resume_restores_the_shuffling_order(tmp_path):
    def run(seed: int, callbacks: list, ckpt_path=None) -> Recorder:
        pl.seed_everything(seed)
        model = Recorder()
        fit = trainer(tmp_path, max_epochs=3, enable_checkpointing=bool(callbacks), callbacks=callbacks)
        fit.fit(model, datamodule=ToyDataModule(batch_size=15), ckpt_path=ckpt_path)
        return model

    full = run(0, [])

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)

    run(0, [checkpoint(), StopAfter(1)])
    resumed = run(1, [checkpoint()], ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # another seed: the checkpoint restores
    assert set(resumed.epoch_ids) == {1, 2}
    assert resumed.epoch_ids[1] == full.epoch_ids[1] and resumed.epoch_ids[2] == full.epoch_ids[2]
    assert full.epoch_ids[1] != full.epoch_ids[2]


# ------------------------------------------------------------------------------------------ on-device hook
def test_device_transform():
    dm = ToyDataModule(device_augment=True, views=2, batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (16, 1, 4, 4)
    (a, b), y2 = dm.device_transform((x, y), train=True)
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b) and y2 is y
    evaluated, _ = dm.device_transform((x, y), train=False)
    torch.testing.assert_close(evaluated, (x.float() / 255 - 0.5) / 0.5)
    # no trainer attached: evaluation behaviour
    torch.testing.assert_close(dm.on_after_batch_transfer((x, y), 0)[0], evaluated)
    assert ToyDataModule().device_transform((x, y), train=True)[0] is x


def test_device_augmentation_under_trainer(tmp_path):
    dm = ToyDataModule(device_augment=True, views=2, val_size=10, batch_size=25)
    model = Recorder()
    trainer(tmp_path, num_sanity_val_steps=0).fit(model, datamodule=dm)
    (a, b), y = model.train_batches[0]
    assert y.shape == (25,)
    assert a.dtype == torch.float32 and a.shape == (25, 1, 4, 4) and not torch.equal(a, b)
    x, _ = model.val_batches[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    raw = torch.stack([dm.val_set[i][0] for i in range(10)])
    torch.testing.assert_close(x, (raw.float() / 255 - 0.5) / 0.5)


def test_largest_initial_seed_is_accepted():
    dm = ToyDataModule(shuffle_seed=2**64 - 1)
    assert dm.worker_seed_generator.initial_seed() == 0


# ------------------------------------------------------------------------------------------------- protocol
PROTOCOL = set(typing.get_args(DataAttribute))
PACKAGE = Path(__file__).resolve().parents[2] / "kd_lightning"


def test_protocol_members_are_the_data_attribute_names():
    members = {name for name in vars(DataProtocol) if not name.startswith("_")}
    assert (
        members
        == PROTOCOL
        == {
            "num_classes",
            "views",
            "superclass_map",
            "device_transform",
            "train_shard_dataloader",
            "teacher_store_layout",
            "teacher_store_dataloader",
            "use_teacher_store",
        }
    )


def _indices(loader) -> list[int]:
    return [int(i) for x, _ in loader for i in x[:, 0, 0, 0]]


def test_train_shard_dataloader_shards_one_seeded_order_of_the_training_set():
    dm = ToyDataModule(batch_size=7, val_size=12, drop_last=True)
    dm.setup("fit")
    training = sorted(_indices(dm._loader(dm.train_set, train=False)))
    shards = [_indices(dm.train_shard_dataloader(5, rank, 3)) for rank in range(3)]
    whole = _indices(dm.train_shard_dataloader(5))
    assert len(whole) == 48 and sorted(whole) == training  # every sample once, no batch dropped
    assert [whole[rank::3] for rank in range(3)] == shards  # shard r: every 3rd sample of the order from r
    assert whole == _indices(dm.train_shard_dataloader(5)) != _indices(dm.train_shard_dataloader(6))
    assert whole != training


def test_classification_datamodules_implement_the_protocol():
    from kd_lightning.data import DigitsDataModule, SyntheticDataModule

    for dm in (
        ToyDataModule(),
        ToyDataModule(views=2),
        SyntheticDataModule(num_train=8, num_val=0),
        DigitsDataModule(),
    ):
        for name in PROTOCOL:
            inspect.getattr_static(dm, name)  # defined, without running a property that may read files
        assert dm.views in (1, 2) and isinstance(dm.num_classes, int)
        superclass_map = dm.superclass_map
        assert superclass_map is None or superclass_map.shape == (dm.num_classes,)
        x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
        assert dm.device_transform((x, torch.zeros(2)), train=False)[0].shape[0] == 2


def test_data_attribute_reads_what_is_there():
    dm = ToyDataModule(views=2)
    assert data_attribute(dm, "num_classes") == NUM_CLASSES and data_attribute(dm, "views") == 2
    assert data_attribute(dm, "superclass_map") is None
    assert data_attribute(None, "num_classes") is None  # a trainer given loaders has no datamodule
    assert data_attribute(pl.LightningDataModule(), "views") is None  # a datamodule that does not say
    with pytest.raises(ValueError, match=r"'classes' is not part of DataProtocol: one of \["):
        data_attribute(dm, "classes")  # type: ignore[arg-type]


def test_methods_and_callbacks_read_only_the_protocol_from_datamodules():
    """Every ``getattr(<datamodule>, "name")`` and ``<datamodule>.name`` in the modules and callbacks is a protocol
    member or LightningDataModule API (a new read belongs in DataProtocol first)."""
    allowed = PROTOCOL | {name for name in dir(pl.LightningDataModule) if not name.startswith("_")}
    reads = set()
    for path in [*(PACKAGE / "modules").rglob("*.py"), *(PACKAGE / "callbacks").rglob("*.py")]:
        source = path.read_text()
        reads |= set(re.findall(r"getattr\([^,()]*datamodule[^,()]*,\s*[\"'](\w+)[\"']", source))
        reads |= set(re.findall(r"\bdatamodule\.(\w+)", source))
        reads |= set(re.findall(r"data_attribute\([^,()]*,\s*[\"'](\w+)[\"']", source))
    assert reads and reads <= allowed, f"read from datamodules outside DataProtocol: {sorted(reads - allowed)}"
