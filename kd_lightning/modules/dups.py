"""DUPS: one-generation distillation by utilizing peer samples ("One Generation Knowledge Distillation by Utilizing
Peer Samples", Section 3.4, Alg. 1), and the staged training it shares with Snapshot Distillation and DUPS+.

Stages, with 0-indexed epochs (the paper counts from 1). Training of ``E = trainer.max_epochs`` epochs is split into
``m`` stages of ``t = E / m`` epochs (``E`` must be a multiple of ``m``, resp. of ``t`` when ``epochs_per_stage``
is given):

* stage ``s`` (``0 <= s < m``) covers epochs ``s*t .. s*t + t - 1``;
* the statistics of stage ``s`` are collected in its last epoch, ``s*t + t - 1`` (Alg. 1, line 12), for
  ``s = 0 .. m-2`` (those of the last stage would never be used);
* they become the class targets at the start of epoch ``(s+1)*t`` and are used for the whole stage ``s+1``;
* stage 0 has no teacher: its loss is ``ce_weight * CE`` (Alg. 1 with :math:`f_T^1 = 0`).

Example: ``E = 160``, ``m = 10``: ``t = 16``; statistics in epochs 15, 31, ..., 143; targets of stage 1 from
epoch 16 on; 9 updates of the targets (the paper's "m - 1 iterations of knowledge distillation").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from kd_lightning.data.base import data_attribute
from kd_lightning.losses import KDSettings
from kd_lightning.modules.class_targets import ClassTargetTable, TopKClassTargetTable
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distributed import RankGroup, ShardPadding
from kd_lightning.optim import cyclic_cosine

__all__ = ["DUPSModule", "StageSchedule", "StagedDistillModule"]


@dataclass(frozen=True)
class StageSchedule:
    """``num_stages`` stages of ``epochs_per_stage`` epochs; stage ``s`` covers epochs ``s*t .. s*t+t-1``."""

    num_stages: int
    epochs_per_stage: int

    @classmethod
    def resolve(cls, max_epochs: int | None, num_stages: int | None, epochs_per_stage: int | None) -> StageSchedule:
        """The schedule of a run of ``max_epochs`` epochs, given either the number of stages or their length.

        Raises:
            ValueError: ``max_epochs`` is unset, or does not split into whole stages of at least one epoch.
        """
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"staged training needs trainer.max_epochs >= 1, got max_epochs={max_epochs}")
        if epochs_per_stage is None:
            assert num_stages is not None
            if num_stages > max_epochs:
                raise ValueError(
                    f"num_stages={num_stages} > trainer.max_epochs={max_epochs}: every stage needs at least one epoch"
                )
            if max_epochs % num_stages:
                raise ValueError(
                    f"trainer.max_epochs={max_epochs} is not a multiple of num_stages={num_stages}: stages must have "
                    "equal whole numbers of epochs"
                )
            return cls(num_stages, max_epochs // num_stages)
        if max_epochs % epochs_per_stage:
            raise ValueError(
                f"trainer.max_epochs={max_epochs} is not a multiple of epochs_per_stage={epochs_per_stage}: stages "
                "must have equal whole numbers of epochs"
            )
        return cls(max_epochs // epochs_per_stage, epochs_per_stage)

    def stage_of(self, epoch: int) -> int:
        """0-indexed stage of the 0-indexed ``epoch``."""
        return epoch // self.epochs_per_stage

    def is_last_epoch_of_stage(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last epoch of its stage."""
        return (epoch + 1) % self.epochs_per_stage == 0


class StagedDistillModule(ClassifierModule):
    """Training in stages with a teacher signal from the previous stage: what DUPS, DUPS+ and SD share.

    The loss of a sample is :math:`\\lambda_{CE}\\,\\mathrm{CE} + \\lambda_{KD}\\,\\mathcal{L}_{KD}` (Eq. 1-2), with
    no KD term in stage 0. A subclass gives :meth:`training_losses` and refreshes its teacher at stage starts.
    The stage arithmetic is in the docstring of :mod:`kd_lightning.modules.dups`.

    Args:
        num_stages: ``m``, the number of stages (None when ``epochs_per_stage`` is given).
        epochs_per_stage: ``t``, the length of a stage in epochs (the paper's "update interval"), instead of
            ``num_stages``. Exactly one of the two is set.
        temperature: ``T`` of the softened distributions.
        ce_weight: :math:`\\lambda_{CE}`.
        kd_weight: :math:`\\lambda_{KD}`.
        t2_scaling: multiply the KD term by :math:`T^2` (Hinton et al.'s convention, which keeps the gradient
            magnitude independent of ``T``; the paper does not say).
        cyclic_lr: restart the default cosine schedule at every stage (:func:`~kd_lightning.optim.cyclic_cosine`
            with a cycle of ``t`` epochs: DUPS+ and SD); otherwise one cosine over the run.
        **kwargs: the arguments of :class:`ClassifierModule`.

    Raises:
        ValueError: both or neither of ``num_stages`` and ``epochs_per_stage``, a count below 1, ``temperature <= 0``,
            a negative weight, or ``cyclic_lr`` with ``lr_scheduler`` or ``warmup_epochs``; at the start of ``fit``,
            ``trainer.max_epochs`` that does not split into the stages (see :meth:`StageSchedule.resolve`).
    """

    def __init__(
        self,
        num_stages: int | None = 10,
        epochs_per_stage: int | None = None,
        temperature: float = 6.0,
        ce_weight: float = 0.8,
        kd_weight: float = 0.2,
        t2_scaling: bool = True,
        cyclic_lr: bool = False,
        **kwargs: Any,
    ) -> None:
        if (num_stages is None) == (epochs_per_stage is None):
            raise ValueError(
                f"set exactly one of num_stages and epochs_per_stage, got num_stages={num_stages}, "
                f"epochs_per_stage={epochs_per_stage}"
            )
        for name, count in (("num_stages", num_stages), ("epochs_per_stage", epochs_per_stage)):
            if count is not None and count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        super().__init__(**kwargs)
        #: The loss's settings, from the hyperparameters (checked here).
        self.loss_settings = KDSettings(temperature, t2_scaling, self.label_smoothing, ce_weight, kd_weight)
        if cyclic_lr and (self.lr_scheduler_factory is not None or self.hparams.warmup_epochs > 0):
            raise ValueError(
                "cyclic_lr builds its own schedule (a cosine per stage): leave lr_scheduler and warmup_epochs unset"
            )
        #: The stages of the current ``fit``, resolved from ``trainer.max_epochs`` in :meth:`setup`.
        self.stage_schedule: StageSchedule | None = None

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.stage_schedule = StageSchedule.resolve(
                self.trainer.max_epochs, self.hparams.num_stages, self.hparams.epochs_per_stage
            )

    def current_stage(self) -> int:
        """0-indexed stage of the current epoch (0 outside ``fit``)."""
        return 0 if self.stage_schedule is None else self.stage_schedule.stage_of(self.current_epoch)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        if not self.hparams.cyclic_lr:
            return super().configure_optimizers()
        assert self.stage_schedule is not None
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        scheduler = cyclic_cosine(optimizer, self.stage_schedule.epochs_per_stage)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class DUPSModule(StagedDistillModule):
    """DUPS (Alg. 1, Eq. 2): lambda_CE CE(z, y) + lambda_KD T^2 KL(f_T(y) || softmax(z/T)), f_T(y): mean of y's peers.

    Distillation by Utilizing Peer Samples: each sample learns from the mean prediction of its class.

    In stage ``s >= 1`` a sample of class ``y`` gets

    .. math:: \\mathcal{L} = \\lambda_{CE}\\,\\mathrm{CE}(z, y)
        + \\lambda_{KD}\\, T^2\\, \\mathrm{KL}\\big(f_T(y) \\,\\|\\, \\mathrm{softmax}(z / T)\\big)

    (Eq. 2 with Eq. 4; both terms from one chunked pass, :func:`~kd_lightning.fused.cross_entropy_and_kd`, with
    the module's ``label_smoothing``; :math:`T^2` unless ``t2_scaling=False``), where
    :math:`f_T(y)` is row ``y`` of the :class:`~kd_lightning.modules.class_targets.ClassTargetTable`: the average
    softened prediction of up to ``peers_per_class`` samples of class ``y``, taken in the last epoch of the previous
    stage (Eq. 5). Stage 0 trains with :math:`\\lambda_{CE}\\,\\mathrm{CE}` only. Stages: see
    :mod:`kd_lightning.modules.dups`. The paper's defaults: :math:`\\lambda_{CE} = 0.8`, :math:`\\lambda_{KD} = 0.2`,
    ``T = 6``, 10 stages (5 for transfer learning and language models), cosine LR; DUPS+ is ``cyclic_lr=True``.

    Two readings of Alg. 1, line 12 (``statistics``):

    * ``"online"`` (default, near-zero cost): the targets are averaged from the forward passes training already
      does in the last epoch of the stage (train mode, augmented inputs, the model moving during the epoch).
    * ``"recompute"``: at the end of the stage, one pass in eval mode with the stage-end model over the training
      set (training augmentation, a random order fixed by the seed and the stage, sharded over ranks), stopping
      once every class has its ``peers_per_class``; costs up to one inference epoch per stage. The datamodule gives
      the pass's loader (``train_shard_dataloader`` of :class:`~kd_lightning.data.base.DataProtocol`).

    The table is a registered buffer (checkpointed; a run resumed mid-stage uses the same targets), and
    ``targets_stage`` records the stage its targets were made for, so a stage start is handled once even across a
    resume. Under DDP the per-class sums and counts are summed over ranks before dividing (identical targets on
    every rank; DDP does not broadcast the table's buffers); with ``peers_per_class``, see
    :meth:`ClassTargetTable.peers_per_rank`. The online statistics leave out the samples the distributed sampler
    repeats to even out the shards (:class:`~kd_lightning.modules.distributed.ShardPadding`), so every training sample
    counts once, on one rank, and ``N`` processes get the one-process table. Logs ``dups/classes_covered`` (classes
    with at least one peer) at each update.

    Args:
        peers_per_class: ``n``, peers per class (None: every sample of the class, Alg. 1 line 8; the paper's Fig. 2
            sweeps 1..all).
        num_peers: deprecated name of ``peers_per_class`` (a FutureWarning; removed in the next release).
        statistics: ``"online"`` or ``"recompute"`` (above).
        average: ``"probs"`` (mean of softmax(z/T), default) or ``"logits"`` (softmax of the mean logit / T).
        table_topk: keep only each class's ``k`` largest target entries, the rest of the mass uniform
            (:class:`~kd_lightning.modules.class_targets.TopKClassTargetTable`: memory ``O(C k)`` instead of
            ``O(C^2)``, for language models' word-by-word tables); None: the dense table.
        table_dtype: the dtype the table's targets are kept in: ``"float16"`` or ``"bfloat16"`` halve the table's
            memory and checkpoints (10k words, dense: 200 MB instead of 400 MB); its statistics are accumulated in
            float32 and rounded once, when the targets are built.
        **kwargs: the arguments of :class:`StagedDistillModule` and :class:`ClassifierModule`.

    Raises:
        ValueError: an unknown ``statistics`` or ``table_dtype``, ``table_topk`` with ``average="logits"``, both
            ``peers_per_class`` and ``num_peers``, and the errors of :class:`StagedDistillModule` and the table; at
            the start of ``fit``, ``"recompute"`` with a datamodule that cannot give the pass's loader.
    """

    def __init__(
        self,
        peers_per_class: int | None = None,
        statistics: Literal["online", "recompute"] = "online",
        average: Literal["probs", "logits"] = "probs",
        table_topk: int | None = None,
        table_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        num_peers: int | None = None,
        **kwargs: Any,
    ) -> None:
        if statistics not in ("online", "recompute"):
            raise ValueError(f"statistics must be 'online' or 'recompute', got {statistics!r}")
        if table_topk is not None and average != "probs":
            raise ValueError(f"table_topk keeps a mean of probabilities: it needs average='probs', got {average!r}")
        if table_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"table_dtype must be 'float32', 'float16' or 'bfloat16', got {table_dtype!r}")
        peers_per_class = _renamed_num_peers(peers_per_class, num_peers)
        super().__init__(**kwargs)
        self.hparams.pop("num_peers", None)
        self.hparams["peers_per_class"] = peers_per_class
        classes, settings, dtype = self.num_classes, self.loss_settings, getattr(torch, table_dtype)
        self.class_targets: ClassTargetTable | TopKClassTargetTable = (
            ClassTargetTable(classes, settings, peers_per_class, average, dtype)
            if table_topk is None
            else TopKClassTargetTable(classes, settings, table_topk, peers_per_class, dtype)
        )
        self.class_targets.exclude_from_ddp_broadcast(self)
        self.register_buffer("targets_stage", torch.zeros((), dtype=torch.long))
        # the order of the recompute pass: seed_everything's seed (same on every rank), no draw from the RNG
        self.register_buffer("peer_seed", torch.tensor(torch.initial_seed() % 2**62))
        #: The distributed sampler's padding in the current statistics epoch (none outside one).
        self.shard_padding = ShardPadding()

    def collects_statistics(self) -> bool:
        """Whether the current epoch feeds the online statistics: the last epoch of a stage other than the last."""
        schedule = self.stage_schedule
        if schedule is None or self.hparams.statistics != "online":
            return False
        epoch = self.current_epoch
        return schedule.is_last_epoch_of_stage(epoch) and schedule.stage_of(epoch) < schedule.num_stages - 1

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        logits = self(x)
        if self.collects_statistics():
            self.class_targets.update(logits, y, self._own_samples(len(x), y))
        if self.current_stage() == 0:
            return {"ce": self.loss_settings.ce_weight * self.cross_entropy(logits, y)}
        ce, kd = self.class_targets.ce_and_kd_loss(logits, y)
        return {"ce": ce, "kd": kd}

    def _own_samples(self, num_samples: int, labels: Tensor) -> Tensor | None:
        """``labels``-shaped bool mask of the batch's samples that are this rank's own (None: all of them), a
        sample's mask repeated over its labels (a language model's window has one per token)."""
        mask = self.shard_padding.next_mask(num_samples, labels.device)
        return None if mask is None else mask.repeat_interleave(labels.numel() // num_samples)

    @override
    def setup(self, stage: str) -> None:
        """Also give the table the trainer's ranks; for ``"recompute"``, check that the datamodule gives the pass's
        loader."""
        super().setup(stage)
        self.class_targets.ranks = RankGroup.of_trainer(self.trainer)
        loader = data_attribute(self.trainer.datamodule, "train_shard_dataloader")
        if stage == "fit" and self.hparams.statistics == "recompute" and loader is None:
            raise ValueError(
                "statistics='recompute' runs its pass over the training set through the datamodule's "
                "train_shard_dataloader (kd_lightning.data.base.DataProtocol): fit with a kd_lightning datamodule, "
                "give yours that method, or use statistics='online'"
            )

    @override
    def teardown(self, stage: str) -> None:
        """Give the table back its one-process ranks (they hold the trainer's strategy)."""
        super().teardown(stage)
        self.class_targets.ranks = RankGroup()

    @override
    def on_train_epoch_start(self) -> None:
        """At the first epoch of stage ``s >= 1`` (once): turn the statistics of stage ``s - 1`` into the targets.

        In a statistics epoch, also locate the distributed sampler's padding
        (:class:`~kd_lightning.modules.distributed.ShardPadding`), so that every training sample is counted once, by
        one rank.
        """
        collects = self.collects_statistics()
        self.shard_padding = ShardPadding.of_loader(self.trainer.train_dataloader) if collects else ShardPadding()
        stage = self.current_stage()
        if stage == 0 or int(self.targets_stage) >= stage:
            return
        if self.hparams.statistics == "recompute":
            self._collect_in_eval_mode(stage)
        counts = self.class_targets.finalize()
        self.targets_stage.fill_(stage)
        self.log("dups/classes_covered", (counts > 0).sum().float())

    @torch.no_grad()
    def _collect_in_eval_mode(self, stage: int) -> None:
        """The ``"recompute"`` statistics: the stage-end model, in eval mode, over the training set in an order
        fixed by the seed and the stage, this rank's share of it (every ``world_size``-th sample)."""
        table, datamodule = self.class_targets, self.trainer.datamodule
        peers = datamodule.train_shard_dataloader(int(self.peer_seed) + stage, table.ranks.rank, table.ranks.world_size)
        quota, transform = table.own_quota(), data_attribute(datamodule, "device_transform")
        was_training = self.backbone.training
        self.backbone.eval()
        for batch in peers:
            batch = self.trainer.strategy.batch_to_device(batch)
            if transform is not None:
                batch = transform(batch, train=True)
            x, y = self.unpack_batch(batch)
            table.update(self(x), y)
            if quota is not None and bool((table.counts >= quota).all()):
                break
        self.backbone.train(was_training)


def _renamed_num_peers(peers_per_class: int | None, num_peers: int | None) -> int | None:
    """``peers_per_class``, or the deprecated ``num_peers`` (with a FutureWarning).

    Raises:
        ValueError: both are set.
    """
    if num_peers is None:
        return peers_per_class
    if peers_per_class is not None:
        raise ValueError("set peers_per_class only (num_peers is its deprecated name), not both")
    warnings.warn(
        "DUPSModule's num_peers is deprecated: use peers_per_class (the same option); num_peers will be removed in "
        "the next release",
        FutureWarning,
        stacklevel=3,
    )
    return num_peers
