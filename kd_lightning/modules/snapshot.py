"""Snapshot Distillation (Yang et al. 2019, "Snapshot Distillation: Teacher-Student Optimization in One
Generation"), the one-generation baseline of the DUPS paper (Table 1, "SD")."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from kd_lightning.losses import kd_kl_div_logits
from kd_lightning.modules.dups import StagedDistillModule
from kd_lightning.modules.teacher import FrozenTeacher

__all__ = ["SnapshotDistillModule"]


class SnapshotDistillModule(StagedDistillModule):
    """Snapshot Distillation: lambda_CE CE + lambda_KD T^2 KL(p_teacher^T || p^T), teacher = the last stage's model.

    Snapshot Distillation: the model at the end of each LR cycle is the frozen teacher of the next cycle.

    Training is split into stages (mini-generations) exactly as in :class:`~kd_lightning.modules.dups.DUPSModule`
    (see :mod:`kd_lightning.modules.dups`), each with its own cosine LR cycle (``cyclic_lr=True`` by default). At
    the first epoch of stage ``s >= 1`` the student's weights are copied into a
    :class:`~kd_lightning.modules.teacher.FrozenTeacher`; during stage ``s`` a sample gets the per-sample KD term

    .. math:: \\mathcal{L} = \\lambda_{CE}\\,\\mathrm{CE}(z, y)
        + \\lambda_{KD}\\, T^2\\, \\mathrm{KL}\\big(\\mathrm{softmax}(t / T) \\,\\|\\, \\mathrm{softmax}(z / T)\\big),

    with ``t`` the snapshot's logits of the same input (:func:`~kd_lightning.losses.kd_kl_div_logits`). Stage 0
    trains with :math:`\\lambda_{CE}\\,\\mathrm{CE}`. The defaults are DUPS's (``T = 6``, 0.8 / 0.2), so the two
    differ only in the teacher signal; SD's own refinements (its choice of temperature per teacher, a partial LR
    restart) are not reproduced. The teacher (a second copy of the backbone) is saved in checkpoints and
    ``teacher_stage`` is in the ``state_dict``, so a resumed run distills from the same snapshot. Costs one extra
    forward per step.

    Args:
        cyclic_lr: restart the cosine schedule at every stage (SD's schedule).
        **kwargs: the arguments of :class:`~kd_lightning.modules.dups.StagedDistillModule` and
            :class:`~kd_lightning.modules.classifier.ClassifierModule`.
    """

    def __init__(self, cyclic_lr: bool = True, **kwargs: Any) -> None:
        super().__init__(cyclic_lr=cyclic_lr, **kwargs)
        self.frozen.set("teacher", [FrozenTeacher(copy.deepcopy(self.backbone))], save=True)
        self.register_buffer("teacher_stage", torch.zeros((), dtype=torch.long))

    @property
    def teacher(self) -> FrozenTeacher:
        """The snapshot: the model at the start of the current stage (held in :attr:`frozen`, saved in checkpoints)."""
        return self.frozen.first("teacher")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The snapshot a resumed run distils from."""
        super().on_load_checkpoint(checkpoint)
        for state in self.frozen.saved_states(checkpoint, "teacher"):
            self.teacher.network.load_state_dict(state)

    @override
    def on_train_epoch_start(self) -> None:
        """At the first epoch of stage ``s >= 1`` (once): the current weights become the teacher."""
        stage = self.current_stage()
        if stage > 0 and int(self.teacher_stage) < stage:
            self.teacher.network.load_state_dict(self.backbone.state_dict())
            self.teacher_stage.fill_(stage)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        logits = self(x)
        losses = {"ce": self.hparams.ce_weight * self.cross_entropy(logits, y)}
        if self.current_stage() > 0:
            kd = kd_kl_div_logits(logits, self.teacher(x), self.hparams.temperature, self.hparams.t2_scaling)
            losses["kd"] = self.hparams.kd_weight * kd
        return losses
