"""A group of students trained together, and what the online-distillation methods built on it share.

:class:`StudentGroupModule` trains ``m`` students of one backbone side by side, branch-based (a shared trunk) or
network-based (see :class:`~kd_lightning.models.branches.StudentGroup`), each with cross-entropy alone: the "Ind"
baseline of OKDDip. The group methods differ only in what each student also learns from:
:class:`~kd_lightning.modules.group_baselines.DMLModule`, :class:`~kd_lightning.modules.group_baselines.ONEModule`,
:class:`~kd_lightning.modules.group_baselines.CLILRModule` and :class:`~kd_lightning.modules.okddip.OKDDipModule`,
all :class:`DistillationGroupModule` subclasses.

Evaluation logs, for every student, its top-1/top-5 (``<stage>/<name>/acc1``; the inference student's as
``<stage>/acc1``), the ensemble of the peers (mean of their probabilities, ``<stage>/ensemble/acc1``), the peers'
mean top-1 (``<stage>/mean_acc1``) and their diversity (``<stage>/diversity``, OKDDip's Fig. 4).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kd_lightning.checkpoints import write_module_checkpoint
from kd_lightning.metrics import peer_diversity
from kd_lightning.models.branches import GroupOutput, StudentGroup, default_shared_stages
from kd_lightning.models.registry import Backbone, weights_loaded_later
from kd_lightning.modules.classifier import ClassifierModule

__all__ = ["DistillationGroupModule", "StudentGroupModule", "sigmoid_rampup"]


def sigmoid_rampup(epoch: float, length: float) -> float:
    """Ramp-up weight :math:`w(t) = \\exp(-5 (1 - \\min(t, L)/L)^2)` of epoch ``t`` (0-based); 1 when ``L = 0``.

    The "sigmoid-shaped" ramp-up of Laine & Aila (2017) that ONE, CL-ILR and OKDDip put on their distillation terms:
    :math:`w(0) = e^{-5}`, :math:`w(t) = 1` from :math:`t = L` on.
    """
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


class StudentGroupModule(ClassifierModule):
    """Ind (the OKDDip paper's baseline): m students of one backbone, L = sum_i CE(z_i, y), no distillation.

    Ind (the OKDDip paper's baseline): ``m`` students of one backbone, each trained with cross-entropy alone.

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y),

    logged as ``train/ce``. The base of the online-distillation modules. Its students are a
    :class:`~kd_lightning.models.branches.StudentGroup`: branch-based (``stem + stages[:shared_stages]`` shared) or
    network-based (``network_based=True``, nothing shared). The module's own prediction (``self(x)``, ``predict``,
    ``<stage>/acc1``) is the inference student's, student 0 here; :meth:`export_backbone` and
    :meth:`save_backbone_checkpoint` take any student out as a plain backbone for deployment.

    The single network that :class:`ClassifierModule` builds is removed: a group module has no parameter outside its
    students and method parts, and creates no parameter a mode leaves without gradient (DDP would fail on it).

    Args:
        num_students: ``m``, the number of students, >= 2 (OKDDip with a leader: >= 3).
        network_based: ``m`` independent networks (stems included) instead of branches on a shared trunk.
        shared_stages: stages in the shared trunk, in ``[0, len(stages) - 1]``; None: all stages but the last (the
            CIFAR split of ONE and OKDDip). Only for branch-based groups.
        **kwargs: :class:`ClassifierModule` arguments (``backbone``, ``num_classes``, ``optimizer`` ...).

    Raises:
        ValueError: ``num_students < 2``, ``shared_stages`` given with ``network_based`` or out of range.
    """

    def __init__(
        self,
        num_students: int = 4,
        network_based: bool = False,
        shared_stages: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_students < 2:
            raise ValueError(f"num_students must be >= 2, got {num_students}")
        if network_based and shared_stages is not None:
            raise ValueError(f"a network-based group shares nothing: got shared_stages={shared_stages}")
        if not network_based and shared_stages is None:
            shared_stages = default_shared_stages(self.backbone)
        del self.backbone
        hp = self.hparams
        self.group = StudentGroup(hp.backbone, self.num_classes, num_students, shared_stages, hp.backbone_kwargs)
        if hp.channels_last:
            self.group.to(memory_format=torch.channels_last)
        if hp.compile:
            self.group.compile()

    # ------------------------------------------------------------------------------------------------ students
    @property
    def num_students(self) -> int:
        return self.group.num_students

    @property
    def inference_index(self) -> int:
        """Index of the student used for inference (``self(x)``, ``<stage>/acc1``, the exported backbone)."""
        return 0

    @property
    def peer_indices(self) -> list[int]:
        """Students whose ensemble, mean accuracy and diversity are logged: all of them here."""
        return list(range(self.num_students))

    def student_name(self, index: int) -> str:
        """Name of student ``index`` in the logged metrics."""
        return f"student{index}"

    def run_group(self, x: Tensor, trunk_grad_scale: float = 1.0) -> GroupOutput:
        """All students on ``x`` (see :meth:`StudentGroup.forward`)."""
        return self.group(self._to_memory_format(x), trunk_grad_scale)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C)`` logits of the inference student alone."""
        return self.group.student_logits(self._to_memory_format(x), self.inference_index)

    def _to_memory_format(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ----------------------------------------------------------------------------------------------- training
    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        return {"ce": self.group_cross_entropy(self.run_group(x).logits, y)}

    def group_cross_entropy(self, logits: Tensor, target: Tensor) -> Tensor:
        """:math:`\\sum_i \\mathrm{CE}(z_i, y)` over the ``(k, B, C)`` logits of ``k`` students."""
        k = logits.shape[0]
        return k * self.cross_entropy(logits.flatten(0, 1), target.repeat(k))

    # --------------------------------------------------------------------------------------------- evaluation
    def eval_output_names(self) -> list[str]:
        first = self.inference_index
        others = [self.student_name(i) for i in range(self.num_students) if i != first]
        return [self.student_name(first), *others, "ensemble"]

    def eval_outputs(self, x: Tensor) -> dict[str, Tensor]:
        outputs = self.named_outputs(self.run_group(x))
        return {name: outputs[name] for name in self.eval_output_names()}

    def named_outputs(self, output: GroupOutput) -> dict[str, Tensor]:
        """Every student's logits by name, and the ``ensemble`` of the peers: the log of their mean probability."""
        logits = output.logits
        outputs = {self.student_name(i): logits[i] for i in range(self.num_students)}
        peers = logits[self.peer_indices].float()
        outputs["ensemble"] = peers.log_softmax(dim=-1).logsumexp(dim=0) - math.log(len(self.peer_indices))
        return outputs

    def eval_extra_metrics(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        peers = torch.stack([outputs[self.student_name(i)] for i in self.peer_indices])
        mean_acc1 = (peers.argmax(dim=-1) == target).float().mean()
        return {"diversity": peer_diversity(peers), "mean_acc1": mean_acc1}

    # ----------------------------------------------------------------------------------------------- export
    def export_backbone(self, index: int | None = None) -> Backbone:
        """Student ``index`` (default: the inference student) as a plain backbone, weights copied (no peers)."""
        return self.group.export(self.inference_index if index is None else index)

    def save_backbone_checkpoint(self, path: str | Path, index: int | None = None) -> Path:
        """Write student ``index`` (default: the inference student) as a :class:`ClassifierModule` checkpoint.

        :func:`~kd_lightning.load_module` loads it back as a ``ClassifierModule`` (to test, predict or fine-tune) and
        :meth:`FrozenTeacher.from_checkpoint` reads it as a teacher. Returns ``path``.
        """
        hp = self.hparams
        with torch.random.fork_rng(devices=[]), weights_loaded_later():
            classifier = ClassifierModule(
                backbone=hp.backbone,
                num_classes=self.num_classes,
                backbone_kwargs=hp.backbone_kwargs,
                label_smoothing=hp.label_smoothing,
            )
        classifier.backbone = self.export_backbone(index).cpu()
        return write_module_checkpoint(path, classifier)


class DistillationGroupModule(StudentGroupModule):
    """A :class:`StudentGroupModule` whose students also learn from group-derived soft targets at temperature ``T``.

    Subclasses add their distillation terms, multiplied by the ramp-up :func:`sigmoid_rampup` of the epoch.

    Args:
        temperature: ``T > 0`` of the distillation terms (3 in OKDDip for all methods).
        rampup_epochs: ``L`` of the ramp-up :math:`w(t)`; 0: no ramp-up.
        detach_targets: treat the targets as constants (no gradient through them).
        **kwargs: :class:`StudentGroupModule` arguments.

    Raises:
        ValueError: ``temperature <= 0`` or ``rampup_epochs < 0``.
    """

    def __init__(
        self, temperature: float = 3.0, rampup_epochs: float = 80.0, detach_targets: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if rampup_epochs < 0:
            raise ValueError(f"rampup_epochs must be >= 0, got {rampup_epochs}")

    def distill_weight(self) -> float:
        """Ramp-up weight :math:`w(t)` of the current epoch."""
        return sigmoid_rampup(self.current_epoch, self.hparams.rampup_epochs)

    def as_target(self, tensor: Tensor) -> Tensor:
        """``tensor`` detached when ``detach_targets``, else itself."""
        return tensor.detach() if self.hparams.detach_targets else tensor
