"""The protocol between data and methods, and the shared machinery of the classification datamodules.

:class:`DataProtocol` is what methods and callbacks read from ``trainer.datamodule`` (with :func:`data_attribute`).

:class:`ClassificationDataModule` implements it, and the machinery. A dataset-specific subclass only says what the
data is: it loads the raw training pool and the raw test set (samples ``(raw_x, label)`` without any transform),
gives the per-sample training and evaluation transforms, and, for on-device augmentation, a
:class:`~kd_lightning.data.transforms.BatchAugment`. Everything else is here (with ``ddp_spawn`` pickling):

* **Split.** ``val_size`` samples of the training pool are held out for validation, stratified by class and drawn with a
  generator seeded by ``split_seed`` (independent of the training seed). They get the evaluation transform even though
  they come from the training files. ``val_size=0`` trains on the whole pool with no validation loop (the papers'
  protocol: train on everything, report test): :meth:`~ClassificationDataModule.val_dataloader` then returns ``[]``,
  which Lightning 2.6 reads as one empty loader: zero validation batches, so the validation loop and the sanity check
  are skipped (Lightning warns "Total length of `list` across ranks is zero").
* **Views.** ``views=2`` gives training batches ``((x_a, x_b), y)``: two independently augmented views of the
  same images and one label tensor (evaluation batches stay ``(x, y)``).
* **Exact resume.** Every DataLoader gets its own ``torch.Generator``, so creating an iterator never draws from the
  global RNG (a DataLoader draws its workers' base seed, and ``RandomSampler`` its permutation, from
  ``loader.generator`` or, without one, from the global RNG). The training loader's two generators belong to the
  datamodule: :attr:`~ClassificationDataModule.shuffle_generator` (its ``RandomSampler``'s: one permutation per epoch)
  and the loader's own (the workers' base seed, drawn per iterator, i.e. once per run with persistent workers). Keeping
  them apart makes the order of epoch ``k`` independent of ``num_workers``. Both are seeded from ``shuffle_seed`` (or,
  when None, ``torch.initial_seed()`` at construction, so ``seed_everything`` governs them), and their states are what
  :meth:`~ClassificationDataModule.state_dict` returns: Lightning stores it in checkpoints and calls
  :meth:`~ClassificationDataModule.load_state_dict` before the loaders are built, so a run resumed from an epoch-end
  checkpoint shuffles the following epochs exactly as the uninterrupted run. (Under a distributed strategy Lightning
  replaces the sampler with a ``DistributedSampler``, which shuffles with its own epoch-based seed.) Evaluation loaders
  get a fresh fixed-seed generator each time.
* **On-device augmentation.** When a subclass sets :attr:`~ClassificationDataModule.batch_augment`, its loaders yield
  ``uint8`` images and :meth:`~ClassificationDataModule.on_after_batch_transfer` augments them on the accelerator
  (``trainer.training``: random crop/flip and normalise, each view independently; otherwise normalise only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Literal, Protocol, get_args

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from typing_extensions import override

from kd_lightning.data.store_views import StoreViewsMixin
from kd_lightning.data.subsets import TransformedSubset, collate_pairs, stratified_split
from kd_lightning.data.transforms import BatchAugment, TwoViews
from kd_lightning.teacher_store import StoreLayout, TeacherStore

__all__ = [
    "ClassificationDataModule",
    "DataAttribute",
    "DataProtocol",
    "data_attribute",
]

#: Seed of the generator every evaluation loader gets (it only draws the workers' base seed).
EVAL_LOADER_SEED = 0
#: The datamodule's own generators (training loader): checkpointed, and pickled as their states.
_GENERATORS = ("shuffle_generator", "worker_seed_generator")


class DataProtocol(Protocol):
    """What kd-lightning's methods and callbacks read from a datamodule: the one interface between data and methods.

    Every member is optional: a method trains on any ``LightningDataModule`` whose batches are ``(x, y)``, and a reader
    skips what a datamodule does not define (:func:`data_attribute` gives None). :class:`ClassificationDataModule`
    defines all of them. Members, and who reads them:

    * ``num_classes``: the number of classes ``C`` (labels ``0..C-1``); every method checks ``model.num_classes``
      against it at set-up;
    * ``views``: 1 for training batches ``(x, y)``, 2 for ``((x_a, x_b), y)`` (two augmented views of the same
      images); checked at set-up against the views the module trains on (``SelfDistillModule``: 2, others: 1);
    * ``superclass_map``: ``(C,)`` long tensor, the super-class of every class, or None; read by ``DistillModule``
      (``rel`` targets) and ``DistillDiagnostics`` (heat-map order, super-class contrast);
    * ``device_transform(batch, train)``: a loader's batch, on the device, to the model's batch (on-device
      augmentation or normalisation; identity without); ``DistillDiagnostics`` and DUPS's ``"recompute"`` pass call
      it on the batches they run themselves, outside Lightning's ``on_after_batch_transfer``;
    * ``train_shard_dataloader(seed, rank, world_size)``: the training set with its training transform, in the
      random order that ``seed`` fixes, shard ``rank`` of ``world_size`` (every ``world_size``-th sample of that
      order from ``rank``), not shuffled further, no batch dropped; DUPS's ``statistics="recompute"`` pass reads it
      (only the module knows the ranks, only the datamodule its dataset);
    * ``teacher_store_layout(draws)``, ``teacher_store_dataloader(draws, seed, rank, world_size)``,
      ``use_teacher_store(store, draws)``: a teacher store's layout, its build pass (batches ``(inputs, rows,
      params)`` of this rank's share) and, once in use, training batches ``(x, y, rows)`` of the recorded views (see
      :class:`~kd_lightning.data.store_views.StoreViewsMixin`); read by the modules with a ``teacher_store``.
    """

    @property
    def num_classes(self) -> int: ...

    @property
    def views(self) -> int: ...

    @property
    def superclass_map(self) -> Tensor | None: ...

    def device_transform(self, batch: Any, train: bool) -> Any: ...

    def train_shard_dataloader(self, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader: ...

    def teacher_store_layout(self, draws: int) -> StoreLayout: ...

    def teacher_store_dataloader(self, draws: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader: ...

    def use_teacher_store(self, store: TeacherStore | None, draws: int = 1) -> None: ...


#: The members of :class:`DataProtocol`.
DataAttribute = Literal[
    "num_classes",
    "views",
    "superclass_map",
    "device_transform",
    "train_shard_dataloader",
    "teacher_store_layout",
    "teacher_store_dataloader",
    "use_teacher_store",
]


def data_attribute(datamodule: object | None, name: DataAttribute) -> Any:
    """Member ``name`` of :class:`DataProtocol` of ``datamodule``: None when there is no datamodule or it lacks it.

    Args:
        datamodule: ``trainer.datamodule`` (None when the trainer was given loaders).
        name: One of :data:`DataAttribute`.

    Raises:
        ValueError: ``name`` is not a member of the protocol.
    """
    if name not in get_args(DataAttribute):
        raise ValueError(f"{name!r} is not part of DataProtocol: one of {list(get_args(DataAttribute))}")
    return getattr(datamodule, name, None)


class ClassificationDataModule(StoreViewsMixin, LightningDataModule):
    """Shared loaders, seeded split, shuffling generator, views option (see the module docstring).

    Subclasses implement :attr:`num_classes`, :attr:`input_shape`, :meth:`_load_train_pool` and
    :meth:`_load_test_set`, and optionally :meth:`_train_transform`, :meth:`_eval_transform`,
    :meth:`_training_indices`, :attr:`superclass_map`, :attr:`batch_augment` and :attr:`recorded_augmentation` (a
    random training augmentation a teacher store can record).

    Args:
        batch_size: Training batch size.
        eval_batch_size: Validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes (``> 0`` also sets ``persistent_workers=True``).
        pin_memory: Pin host memory (None: True iff CUDA is available).
        val_size: Samples held out of the training pool for validation (0: no validation loop).
        split_seed: Seed of the validation split (kept apart from the training seed).
        shuffle_seed: Seed of the training loader's shuffling generator (None: ``torch.initial_seed()`` at
            construction, so ``seed_everything`` governs it).
        views: 1, or 2 for two independently augmented views per training image.
        drop_last: Drop the last incomplete training batch.
    """

    #: On-device augmentation applied in :meth:`on_after_batch_transfer` (None: loaders yield ready tensors).
    batch_augment: BatchAugment | None = None

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        val_size: int = 0,
        split_seed: int = 0,
        shuffle_seed: int | None = None,
        views: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 (or None for batch_size), got {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0 (0: no validation split), got {val_size}.")
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.val_size = val_size
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed if shuffle_seed is not None else torch.initial_seed()
        self.views = views
        self.drop_last = drop_last
        #: Generator of the training sampler's permutations.
        self.shuffle_generator = torch.Generator().manual_seed(self.shuffle_seed)
        #: Generator of the training loader's worker base seeds (another stream of the same seed).
        self.worker_seed_generator = torch.Generator().manual_seed((self.shuffle_seed + 1) % 2**64)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        #: The training samples untransformed, and the sha256 of their pool indices and labels.
        self.raw_train_set: Dataset | None = None
        self.train_set_sha256: str | None = None

    # ----------------------------------------------------------------------------------------- what a subclass says
    @property
    def num_classes(self) -> int:
        """Number of classes."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one (transformed) input sample, without the batch dimension, e.g. ``(3, 32, 32)``."""
        raise NotImplementedError

    @property
    def superclass_map(self) -> Tensor | None:
        """``(num_classes,)`` long tensor mapping each class to its super-class, or None when there is none."""
        return None

    @property
    def num_superclasses(self) -> int | None:
        """Number of super-classes, or None when there is no super-class map."""
        mapping = self.superclass_map
        return None if mapping is None else int(mapping.max()) + 1

    def _load_train_pool(self) -> tuple[Dataset, Tensor]:
        """The raw training pool (``(raw_x, label)`` samples, no transform) and its ``(N,)`` long labels."""
        raise NotImplementedError

    def _load_test_set(self) -> Dataset:
        """The raw test set (``(raw_x, label)`` samples, no transform)."""
        raise NotImplementedError

    def _training_indices(self, train_idx: Tensor, labels: Tensor) -> Tensor:
        """The training samples among ``train_idx`` (sorted indices of the pool left by the validation split, whose
        ``(N,)`` labels are ``labels``): all of them, unless a subclass trains on a subset."""
        return train_idx

    def _train_transform(self) -> Callable | None:
        """Per-sample training transform of a raw sample (None: identity)."""
        return None

    def _eval_transform(self) -> Callable | None:
        """Per-sample evaluation transform of a raw sample (None: identity)."""
        return None

    def evaluation_transform(self) -> Callable | None:
        """The per-sample evaluation transform of a raw sample (None: identity): what the validation and test sets go
        through, what ``kd-lightning export`` records and ``kd-lightning predict`` applies to an image file."""
        return self._eval_transform()

    # ------------------------------------------------------------------------------------------------ datasets
    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (all of them for None); already built ones are kept."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            pool, labels = self._load_train_pool()
            if self.val_size >= len(labels):
                raise ValueError(
                    f"val_size={self.val_size} leaves no training samples: the training pool has {len(labels)}."
                )
            generator = torch.Generator().manual_seed(self.split_seed)
            train_idx, val_idx = stratified_split(labels, self.val_size, generator)
            train_idx = self._training_indices(train_idx, labels)
            transform = self._train_transform()
            if self.views == 2 and self.batch_augment is None:
                transform = TwoViews(transform if transform is not None else _identity)
            self.train_set = TransformedSubset(pool, train_idx, transform)
            self.raw_train_set = TransformedSubset(pool, train_idx)
            identity = torch.cat([train_idx, labels[train_idx]]).numpy().tobytes()
            self.train_set_sha256 = hashlib.sha256(identity).hexdigest()
            self.val_set = TransformedSubset(pool, val_idx, self._eval_transform()) if self.val_size > 0 else None
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TransformedSubset(self._load_test_set(), None, self._eval_transform())

    # ------------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, train: bool, sampler: Any = None) -> DataLoader:
        if train:
            sampler = RandomSampler(dataset, generator=self.shuffle_generator) if sampler is None else sampler
            generator = self.worker_seed_generator
        else:
            sampler, generator = SequentialSampler(dataset), torch.Generator().manual_seed(EVAL_LOADER_SEED)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=self.drop_last and train,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_pairs,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        if self.teacher_store is not None:
            return self._loader(self.stored_views(), train=True, sampler=self.stored_views_sampler())
        return self._loader(self.train_set, train=True)

    def train_shard_dataloader(self, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The training set in the random order of ``seed``, shard ``rank`` of ``world_size``, training transform and
        batch size, not shuffled further, no batch dropped (:class:`DataProtocol`); ``seed`` also seeds the workers."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.train_set), generator=generator)[rank::world_size]
        return DataLoader(
            TransformedSubset(self.train_set, order),
            batch_size=self.batch_size,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_pairs,
        )

    @override
    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, or ``[]`` when ``val_size=0`` (Lightning then skips validation)."""
        if self.val_size == 0:
            return []
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return self._loader(self.val_set, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None
        return self._loader(self.test_set, train=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test set, as ``(x, y)`` batches."""
        return self.test_dataloader()

    # --------------------------------------------------------------------------------------- on-device hook
    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply :attr:`batch_augment` on the device (training: augment each view; otherwise normalise only)."""
        if self.batch_augment is None:
            return batch
        trainer = self.trainer
        return self.device_transform(batch, train=trainer is not None and trainer.training)

    def device_transform(self, batch: tuple[Tensor, Tensor], train: bool) -> tuple[Any, Tensor]:
        """Turn a ``uint8`` batch ``(x, y)`` into a model batch with :attr:`batch_augment`.

        Args:
            batch: ``(x, y)`` with ``x`` a ``uint8`` ``(B, C, H, W)`` tensor on any device.
            train: Augment (and produce ``views`` views); otherwise only normalise.

        Returns:
            ``(x, y)``, or ``((x_a, x_b), y)`` for ``train`` with ``views=2``; a teacher store's batch ``(x, y, rows)``
            gives ``(views, y, rows)``, the views replayed from the parameters recorded for the rows.
        """
        augment = self.batch_augment
        if augment is None:
            return batch
        x, y, *rows = batch
        augment.train(train)
        if rows and self.teacher_store is not None:  # the views a teacher store recorded
            return self.recorded_augmentation.replay_batch(x, self.teacher_store.params(rows[0])), y, rows[0]
        if train and self.views == 2:
            return (augment(x), augment(x)), y
        return augment(x), y

    # ----------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The states of the training loader's generators (saved in Lightning checkpoints)."""
        return {name: getattr(self, name).get_state() for name in _GENERATORS}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generators in place (loaders already built keep using them)."""
        for name in _GENERATORS:
            getattr(self, name).set_state(state_dict[name].to("cpu", torch.uint8))

    # --------------------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """The attributes, with each generator replaced by its state as ``bytes`` (see :meth:`__setstate__`).

        torch pickles a ``Generator`` as a state tensor made on the fly. A process started by ``ddp_spawn`` receives
        tensors through file descriptors of shared memory, and that temporary tensor is freed, closing its
        descriptor, before the child starts: the launch fails with "bad value(s) in fds_to_keep" (or the child would
        read a stale descriptor). Bytes travel by value.
        """
        state = self.__dict__.copy()
        for name in _GENERATORS:
            state[name] = state[name].get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the attributes, rebuilding each generator from the state :meth:`__getstate__` gave."""
        state = dict(state)
        for name in _GENERATORS:
            state[name] = torch.Generator().set_state(torch.frombuffer(bytearray(state[name]), dtype=torch.uint8))
        self.__dict__.update(state)


def _identity(x: Any) -> Any:
    return x
