"""The teacher store's side of the classification datamodules: the datasets and the sampler of recorded views, and
:class:`StoreViewsMixin`, which gives :class:`~kd_lightning.data.base.ClassificationDataModule` the store members of
:class:`~kd_lightning.data.base.DataProtocol`.

:class:`DrawnViews` makes the store's build pass (a sample's ``R`` views, their store rows and parameters);
:class:`StoredViews` serves a store row's view in training, the rows chosen by :class:`StoredDrawSampler` (each epoch,
one draw per sample and a random order, both a function of the seed and the epoch, so a resumed run picks the same
draws). The views are made by the datamodule's :class:`~kd_lightning.data.replay.RecordedAugmentation`, per sample
in the loader's workers or, with on-device augmentation, per batch in ``device_transform``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kd_lightning.data.replay import RecordedAugmentation, Unaugmented, sample_generator
from kd_lightning.teacher_store import StoreLayout, TeacherStore

__all__ = ["DrawnViews", "StoreViewsMixin", "StoredDrawSampler", "StoredViews"]


class DrawnViews(Dataset):
    """The build pass of a store: item ``j`` is sample ``i = indices[j]``'s ``R`` views ``(R, ...)``, their store rows
    ``i * R + d`` ``(R,)`` and parameters ``(R, P)``, drawn with a generator of ``(seed, i)`` (the same draws in any
    worker, on any rank).

    Args:
        raw: the training samples ``(raw_x, label)``, untransformed.
        augmentation: the recorded augmentation.
        draws: ``R``.
        seed: seed of the draws.
        indices: the samples of this pass (a rank's share).
    """

    def __init__(
        self, raw: Dataset, augmentation: RecordedAugmentation, draws: int, seed: int, indices: Sequence[int]
    ) -> None:
        self.raw, self.augmentation, self.draws, self.seed, self.indices = raw, augmentation, draws, seed, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor, Tensor]:
        index = self.indices[position]
        image, _ = self.raw[index]
        params = self.augmentation.draw(image, self.draws, sample_generator(self.seed, index))
        views = torch.stack([torch.as_tensor(self.augmentation.replay(image, p)) for p in params])
        return views, index * self.draws + torch.arange(self.draws), params


class StoredViews(Dataset):
    """Training from a store: item ``row`` is ``(view, label, row)``, the view of sample ``row // R`` made from the
    parameters recorded for ``row`` (``replay`` None: the raw sample, replayed later on the device).

    Args:
        raw: the training samples ``(raw_x, label)``, untransformed.
        draws: ``R``.
        params: the recorded parameters of a row (the store's :meth:`~kd_lightning.teacher_store.TeacherStore.params`).
        replay: makes the view from a raw sample and parameters; None: none here.
    """

    def __init__(
        self,
        raw: Dataset,
        draws: int,
        params: Callable[[int], Tensor],
        replay: Callable[[Any, Tensor], Any] | None,
    ) -> None:
        self.raw, self.draws, self.params, self.replay = raw, draws, params, replay

    def __len__(self) -> int:
        return len(self.raw) * self.draws  # type: ignore[arg-type]

    def __getitem__(self, row: int) -> tuple[Any, Any, int]:
        image, label = self.raw[row // self.draws]
        view = image if self.replay is None else self.replay(image, self.params(row))
        return view, label, row


class StoredDrawSampler(Sampler[int]):
    """The rows of an epoch from a store: every sample once, in a random order, each with one of its ``R`` draws.

    Order and draws are a function of ``(seed, epoch)`` (Lightning calls :meth:`set_epoch`, also through its
    distributed wrapper), so every rank holds the same list, which Lightning's ``DistributedSamplerWrapper`` deals
    out, and a resumed run picks the same draws.

    Args:
        num_samples: ``N``.
        draws: ``R``.
        seed: the seed (the datamodule's ``shuffle_seed``).
    """

    def __init__(self, num_samples: int, draws: int, seed: int) -> None:
        self.num_samples, self.draws, self.seed, self.epoch = num_samples, draws, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = sample_generator(self.seed, self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        draw = torch.randint(0, self.draws, (self.num_samples,), generator=generator)
        return iter((order * self.draws + draw[order]).tolist())


class StoreViewsMixin:
    """The teacher-store members of :class:`~kd_lightning.data.base.DataProtocol` for a datamodule of samples
    (:class:`~kd_lightning.data.base.ClassificationDataModule`, which sets up ``raw_train_set`` and
    ``train_set_sha256`` with its ``train_set`` and builds its training loader from :meth:`stored_views` and
    :meth:`stored_views_sampler` while a store is in use).

    A subclass that can record its training augmentation says how with :attr:`recorded_augmentation`.
    """

    #: The teacher store whose recorded views the training loader serves (None: the ordinary augmentation).
    teacher_store: TeacherStore | None = None
    #: Its draws per sample.
    store_draws: int = 1

    @property
    def recorded_augmentation(self) -> RecordedAugmentation | None:
        """The training augmentation as a teacher store records it, or None when it cannot be recorded. Here: no
        augmentation (:class:`~kd_lightning.data.replay.Unaugmented`) when there is no training transform."""
        return Unaugmented() if self._train_transform() is None and self.batch_augment is None else None

    def teacher_store_layout(self, draws: int) -> StoreLayout:
        """The store of ``draws`` recorded views per training sample (:class:`DataProtocol`).

        Raises:
            ValueError: two views per sample, or a training augmentation that cannot be recorded.
        """
        if self.train_set is None:
            self.setup("fit")
        augmentation = self.recorded_augmentation
        if self.views != 1:
            raise ValueError(f"a teacher store records one view per sample: set {type(self).__name__}'s views=1")
        if augmentation is None:
            raise ValueError(
                f"{type(self).__name__}'s training augmentation cannot be recorded in a teacher store (it records the "
                "CIFAR recipe of pad + crop + flip, RandomResizedCrop + flip, or no augmentation)"
            )
        samples = len(self.raw_train_set)
        dataset = {"class": type(self).__qualname__, "samples": samples, "sha256": self.train_set_sha256}
        return StoreLayout(samples * draws, augmentation.num_params, dataset, augmentation.describe())

    def teacher_store_dataloader(self, draws: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The build pass of a store (:class:`DataProtocol`): batches ``(views (b, R, ...), rows (b, R), params (b,
        R, P))`` of the samples ``rank, rank + world_size, ...``."""
        self.teacher_store_layout(draws)  # the checks
        indices = range(rank, len(self.raw_train_set), world_size)
        drawn = DrawnViews(self.raw_train_set, self.recorded_augmentation, draws, seed, indices)
        return DataLoader(
            drawn, batch_size=self.eval_batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def use_teacher_store(self, store: TeacherStore | None, draws: int = 1) -> None:
        """Serve ``store``'s recorded views from now on: training batches ``(x, y, rows)`` (:class:`DataProtocol`)."""
        self.teacher_store, self.store_draws = store, draws

    def stored_views(self) -> StoredViews:
        """The training set of :attr:`teacher_store`'s rows (views made in the workers, or raw for
        ``device_transform`` to replay)."""
        augmentation = self.recorded_augmentation
        replay = None if self.batch_augment is not None else augmentation.replay
        return StoredViews(self.raw_train_set, self.store_draws, self.teacher_store.params, replay)

    def stored_views_sampler(self) -> StoredDrawSampler:
        """The rows of each epoch: a random order and draw seeded by ``shuffle_seed`` and the epoch."""
        return StoredDrawSampler(len(self.raw_train_set), self.store_draws, self.shuffle_seed)
