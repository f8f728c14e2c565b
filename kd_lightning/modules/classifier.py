"""ClassifierModule: backbone + cross-entropy + metrics + injected optimizer; the base of every method module."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from kd_lightning.checkpoints import record_module, upgrade
from kd_lightning.data.base import data_attribute
from kd_lightning.models.registry import create_backbone
from kd_lightning.modules.distributed import destroy_process_group_at_exit
from kd_lightning.modules.teacher import FrozenNetworks
from kd_lightning.optim import NesterovSGD, warmup_cosine

__all__ = ["ClassifierModule"]

EVAL_STAGES = ("val", "test")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy baseline, L = CE(z, y), label smoothing eps: (1-eps) onehot(y) + eps/C; base of every method.

    A backbone from the registry trained with cross-entropy: the plain baseline and the base of every method.

    A method module overrides only what differs:

    * :meth:`training_losses` turns a batch into named loss terms; :meth:`training_step` sums them, logs each as
      ``train/<name>`` and their sum as ``train/loss``.
    * :meth:`eval_outputs` returns named logits (the first is the model's prediction); the shared evaluation
      step logs top-1/top-5 accuracy of each as ``<stage>/acc1`` for the first and ``<stage>/<name>/acc1`` for
      the others, and the cross-entropy of the first as ``<stage>/loss``. Override :meth:`eval_output_names`
      with it.

    The loss of this baseline is :math:`\\mathcal{L} = \\mathrm{CE}(z, y)` with optional label smoothing
    :math:`\\epsilon` (Szegedy et al. 2016): the target is :math:`(1-\\epsilon)\\,\\mathrm{onehot}(y) + \\epsilon/C`.

    Args:
        backbone: name of a registered backbone (``kd-lightning backbones`` lists them).
        num_classes: number of classes; must match the datamodule's (checked at set-up).
        backbone_kwargs: extra keyword arguments of the backbone factory (e.g. ``{"dropout": 0.3}``).
        label_smoothing: :math:`\\epsilon` of the cross-entropy, in [0, 1).
        optimizer: the optimizer, called with the trainable parameters. Default: SGD, Nesterov, lr 0.1,
            momentum 0.9, weight decay 5e-4.
        lr_scheduler: an LR scheduler called with the optimizer, stepped once per epoch. Default (None): cosine
            annealing over ``schedule_epochs`` epochs after ``warmup_epochs`` of linear warm-up.
        schedule_epochs: length of the default cosine schedule; None: ``trainer.max_epochs``.
        warmup_epochs: linear warm-up epochs of the default schedule.
        channels_last: store the backbone and inputs in channels-last memory format (pays on GPUs with tensor
            cores; not on CPU).
        compile: ``torch.compile`` the backbone's ``__call__`` (pays on GPUs for long runs; 30-50 s of start-up).
    """

    #: Constructor arguments left out of ``hparams`` (not serialisable, or re-created from elsewhere).
    hparams_ignore: ClassVar[tuple[str, ...]] = ("optimizer", "lr_scheduler")
    #: Values of the datamodule's ``views`` this module can train on.
    supported_views: ClassVar[tuple[int, ...]] = (1,)

    def __init__(
        self,
        backbone: str = "resnet20",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = NesterovSGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        schedule_epochs: int | None = None,
        warmup_epochs: int = 0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        #: Frozen networks (a teacher, finished generations) held outside the module tree.
        self.frozen = FrozenNetworks()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if schedule_epochs is not None and schedule_epochs < 1:
            raise ValueError(f"schedule_epochs must be >= 1 or None, got {schedule_epochs}")
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.backbone = self.build_backbone(backbone, num_classes, backbone_kwargs or {})
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.compile()
        self.metrics = nn.ModuleDict()

    @property
    def num_classes(self) -> int:
        """``C``, the classes (``hparams.num_classes``)."""
        return self.hparams.num_classes

    @property
    def label_smoothing(self) -> float:
        """:math:`\\epsilon` of the cross-entropy (``hparams.label_smoothing``)."""
        return self.hparams.label_smoothing

    def build_backbone(self, name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
        """The network trained: the registered backbone ``name`` (a module with another kind of network, e.g. the
        language models, builds it from its own registry)."""
        return create_backbone(name, num_classes, **kwargs)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits of the backbone, ``(B, num_classes)``."""
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def _apply(self, fn: Any, recurse: bool = True) -> ClassifierModule:
        super()._apply(fn, recurse)
        self.frozen.apply(fn, recurse)  # the networks held outside the module tree move and cast with it
        return self

    # ----------------------------------------------------------------------------------------------- training
    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        """Named loss terms of one training batch; their sum is minimised. The one hook methods override."""
        x, y = self.unpack_batch(batch)
        return {"ce": self.cross_entropy(self(x), y)}

    def cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy in float32 (also under mixed precision) with the module's label smoothing."""
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self.training_losses(batch)
        total = torch.stack(list(losses.values())).sum()
        batch_size = len(batch[-1])
        if len(losses) > 1:
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, on_epoch=True, batch_size=batch_size)
        return total

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a single-view batch; a clear error for two-view batches this module cannot use."""
        x, y = batch
        if isinstance(x, (tuple, list)):
            raise ValueError(
                f"{type(self).__name__} trains on single-view batches (x, y) but got {len(x)} views; "
                "set the datamodule's views=1, or use a module that uses two views (SelfDistillModule)"
            )
        return x, y

    # --------------------------------------------------------------------------------------------- evaluation
    def eval_output_names(self) -> list[str]:
        """Names of the logits :meth:`eval_outputs` returns, the model's own prediction first."""
        return ["main"]

    def eval_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """Named logits of an evaluation input, in the order of :meth:`eval_output_names`."""
        return {"main": self(x)}

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities of the model's prediction (the first output)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return next(iter(self.eval_outputs(x).values())).float().softmax(dim=-1)

    def eval_log_prefix(self, stage: str) -> str:
        """Prefix of every evaluation metric's name: ``"<stage>/"`` (a module that must keep runs apart, e.g. the
        generations of :class:`~kd_lightning.GenerationalKD`, adds to it)."""
        return f"{stage}/"

    def eval_extra_metrics(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Scalar batch statistics of the evaluation outputs beyond accuracy (e.g. OKDDip's peer diversity, the
        generations' confidence), logged as ``<prefix><name>`` and averaged over the epoch and the ranks. None here."""
        return {}

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = self.unpack_batch(batch)
        outputs = self.eval_outputs(x)
        base = self.eval_log_prefix(stage)
        for index, (name, logits) in enumerate(outputs.items()):
            prefix = base if index == 0 else f"{base}{name}/"
            metrics = self._metrics_of(stage, name)
            metrics.update(logits, y)
            self.log_dict({prefix + k: m for k, m in metrics.items()}, batch_size=len(y), prog_bar=index == 0)
            if index == 0:
                self.log(f"{base}loss", F.cross_entropy(logits.float(), y), batch_size=len(y), sync_dist=True)
        extras = self.eval_extra_metrics(outputs, y)
        if extras:
            extras = {base + k: v.detach().float() for k, v in extras.items()}
            self.log_dict(extras, batch_size=len(y), sync_dist=True)

    def _build_metrics(self) -> None:
        for stage in EVAL_STAGES:
            for name in self.eval_output_names():
                self._metrics_of(stage, name)

    def _metrics_of(self, stage: str, name: str) -> MetricCollection:
        """Top-1 / top-5 accuracy of the output ``name`` in ``stage``, created on first use (outputs that appear
        during a run, e.g. a new generation's ensemble, get theirs then)."""
        key = f"{stage}_{name}"
        if key not in self.metrics:
            self.metrics[key] = self.build_metrics().to(self.device)
            self._metric_attributes = None  # Lightning's cache of metric names: rebuilt at the next log
        return self.metrics[key]

    def build_metrics(self) -> MetricCollection:
        """The metrics of one evaluation output, updated with ``(logits, labels)``: top-1 and top-5 accuracy."""
        top_k = min(5, self.num_classes)
        return MetricCollection(
            {
                "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                f"acc{top_k}": MulticlassAccuracy(self.num_classes, top_k=top_k, average="micro"),
            }
        )

    # ----------------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, stage: str) -> None:
        self._check_datamodule()
        self._build_metrics()
        if self._trainer is not None and self.trainer.world_size > 1:
            destroy_process_group_at_exit()

    def _check_datamodule(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = data_attribute(datamodule, "num_classes")
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the datamodule {type(datamodule).__name__} has "
                f"{data_classes} classes: set model.init_args.num_classes: {data_classes}"
            )
        views = data_attribute(datamodule, "views")  # None: plain loaders or a datamodule that does not say
        if views is not None and views not in self.supported_views:
            raise ValueError(
                f"{type(self).__name__} trains on views={list(self.supported_views)} but the datamodule yields "
                f"views={views}"
            )

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            scheduler = warmup_cosine(optimizer, self.schedule_length(), self.hparams.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def schedule_length(self) -> int:
        """Epochs of the default cosine schedule: ``schedule_epochs``, else ``trainer.max_epochs``."""
        if self.hparams.schedule_epochs is not None:
            return self.hparams.schedule_epochs
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                "the default cosine schedule needs trainer.max_epochs >= 1 (or model schedule_epochs); "
                f"got max_epochs={max_epochs}"
            )
        return max_epochs

    # ------------------------------------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The kd-lightning entry: the class (for :func:`~kd_lightning.load_module`) and the saved frozen networks."""
        record_module(checkpoint, self)
        self.frozen.save(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of an earlier version is brought to the current layout first (see
        :func:`~kd_lightning.checkpoints.upgrade`)."""
        upgrade(checkpoint)
