"""A method's teacher outputs read from a teacher store (:mod:`kd_lightning.teacher_store`) instead of computed at
every step: what :class:`~kd_lightning.DistillModule`, OKDDip+KD and
:class:`~kd_lightning.LanguageModelDistillModule` share.

:class:`StoredTeacher` is a callback the module hands to the trainer (``configure_callbacks``). The store is written
once, as the first phase of ``fit`` (:meth:`StoredTeacher.prepare`, from ``on_fit_start``, when the teacher is on its
device and the ranks are up): if the folder holds no finished store, every rank runs the
teacher over its share of the training set's recorded views and writes their rows; otherwise the store is checked
against the run and refused if it was made for another one. Later runs (other seeds, a resume) read it as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from kd_lightning.data.base import data_attribute
from kd_lightning.fused import SparseTargets
from kd_lightning.teacher_store import StoreSpec, TeacherStore, build_store, weights_sha256

__all__ = ["StoredTeacher", "split_stored_batch"]

#: Seed of the recorded draws (with the sample index): a store's views depend on its dataset only.
DRAW_SEED = 0


def split_stored_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(x, y, rows)`` -> ``((x, y), rows)``; an ``(x, y)`` batch -> ``((x, y), None)``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return tuple(batch[:2]), batch[2]
    return batch, None


class StoredTeacher(Callback):
    """A teacher store in use by a module: attached to the datamodule at set-up, built or checked at fit start (the
    module gives it to the trainer from ``configure_callbacks``), read at every training step (:meth:`targets`).

    Args:
        path: the store's folder.
        draws: ``R`` recorded augmentation draws per training sample (1 for language models).
        topk: ``k`` probabilities stored per row (``k = C``: the whole distribution).
        temperature: ``T`` of the stored probabilities (the module's).
        num_classes: ``C``.
        teacher_logits: makes the function from a build batch's inputs to the teacher's ``(n, C)`` logits, one per
            store row (called once per build: a language model's carries its state); None, or a function that
            returns None: the teacher's output of the ``(b * R, ...)`` views of ``(b, R, ...)`` inputs.

    Raises:
        ValueError: ``draws < 1`` or ``topk < 1``.
    """

    def __init__(
        self,
        path: str,
        draws: int,
        topk: int,
        temperature: float,
        num_classes: int,
        teacher_logits: Callable[[], Callable[[Any], Tensor] | None] | None = None,
    ) -> None:
        if draws < 1 or topk < 1:
            raise ValueError(f"a teacher store needs store_draws >= 1 and store_topk >= 1, got {draws} and {topk}")
        self.store = TeacherStore(path)
        self.draws, self.topk = draws, min(topk, num_classes)
        self.temperature, self.num_classes = float(temperature), num_classes
        self.teacher_logits = teacher_logits

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Make the datamodule serve the store's views (``fit`` only, before any training loader is built).

        Raises:
            ValueError: the datamodule cannot serve a store (not a :class:`~kd_lightning.data.base.DataProtocol`
                datamodule with its teacher-store members).
        """
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        use = data_attribute(datamodule, "use_teacher_store")
        if use is None:
            raise ValueError(
                f"teacher_store needs a datamodule that serves the store's views (the teacher-store members of "
                f"kd_lightning.data.base.DataProtocol), but got {type(datamodule).__name__}: fit with a kd_lightning "
                "datamodule, or without teacher_store"
            )
        use(self.store, self.draws)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """:meth:`prepare` the store with the module's ``teacher``."""
        self.prepare(trainer, pl_module.teacher)

    def prepare(self, trainer: pl.Trainer, teacher: nn.Module | None) -> None:
        """Build the store if the folder holds none, then open it for this run.

        Args:
            trainer: the trainer (its datamodule, ranks and device).
            teacher: the teacher (frozen, on the module's device; its weights identify the store).

        Raises:
            ValueError: no teacher.
            TeacherStoreMismatch: a store made for another run.
        """
        if teacher is None:
            raise ValueError(
                "teacher_store needs the teacher (teacher_backbone + teacher_checkpoint): it builds the store and "
                "identifies the store it reads"
            )
        datamodule, strategy = trainer.datamodule, trainer.strategy
        layout = datamodule.teacher_store_layout(self.draws)
        spec = StoreSpec(weights_sha256(teacher), self.temperature, self.num_classes, self.topk, self.draws, layout)
        strategy.barrier()
        if self.store.metadata() is None:
            rank, world_size = trainer.global_rank, trainer.world_size
            loader = datamodule.teacher_store_dataloader(self.draws, DRAW_SEED, rank, world_size)
            device = strategy.root_device  # not batch_to_device: the datamodule's batch hooks are for training batches
            batches = ((move_data_to_device(x, device), rows, params) for x, rows, params in loader)
            logits = (self.teacher_logits and self.teacher_logits()) or (lambda views: teacher(views.flatten(0, 1)))
            build_store(self.store, spec, batches, logits, rank, strategy.barrier)
        self.store.open(spec)

    def targets(self, rows: Tensor, k: int | None = None) -> SparseTargets:
        """The stored sparse targets of ``rows`` (flattened) on their device, truncated to ``k`` entries."""
        return self.store.targets(rows, k, rows.device)
