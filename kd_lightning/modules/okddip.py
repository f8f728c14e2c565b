"""Online distillation in a group of students: OKDDip and the methods it is compared with (DML, ONE, CL-ILR, Ind).

All of them train ``m`` students of one backbone together, branch-based (a shared trunk) or network-based (see
:class:`~kd_lightning.models.branches.StudentGroup`), and differ only in what each student learns from:

* :class:`StudentGroupModule` ("Ind"): every student learns from the labels alone (cross-entropy);
* :class:`DMLModule`: + the KL to every other student, pair by pair (Zhang et al. 2018);
* :class:`ONEModule`: + the KL to a gated ensemble of all branches, whose cross-entropy trains the gate (Lan et al.
  2018);
* :class:`CLILRModule`: + the KL to the mean of the other branches, the trunk's gradient divided by ``m`` (Song &
  Chai 2018);
* :class:`OKDDipModule`: + for each peer, the KL to its own attention-weighted aggregate of the peers; for the group
  leader, the KL to the peers' mean (Chen et al. 2020).

Evaluation logs, for every student, its top-1/top-5 (``<stage>/<name>/acc1``; the inference student's as
``<stage>/acc1``), the ensemble of the peers (mean of their probabilities, ``<stage>/ensemble/acc1``), the peers'
mean top-1 (``<stage>/mean_acc1``) and their diversity (``<stage>/diversity``, OKDDip's Fig. 4).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from kd_lightning.losses import (
    aggregate_targets,
    attention_weights,
    group_kd_kl_div,
    mutual_kl_div,
    soft_cross_entropy,
)
from kd_lightning.metrics import peer_diversity
from kd_lightning.models.branches import GroupOutput, StudentGroup, default_shared_stages
from kd_lightning.models.registry import Backbone
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.teacher import FrozenTeacher

__all__ = [
    "AGGREGATE_SPACES",
    "AGGREGATIONS",
    "CLILRModule",
    "DMLModule",
    "DistillationGroupModule",
    "OKDDipModule",
    "ONEModule",
    "StudentGroupModule",
    "sigmoid_rampup",
]

#: OKDDip's first-level aggregations: the method and the ablations of its Table 5.
Aggregation = Literal["attention", "mean", "random", "symmetric", "self"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
#: Where OKDDip's targets are aggregated: ``"logits"`` (the authors' code) or ``"probs"`` (Eq. 5 and 7).
AggregateSpace = Literal["logits", "probs"]
AGGREGATE_SPACES: tuple[str, ...] = get_args(AggregateSpace)
#: Width of OKDDip's query/key projections: the feature width divided by this (the authors' ``factor``).
PROJECTION_DIVISOR = 8


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

    ``m`` students of one backbone trained side by side, each with cross-entropy alone: the "Ind" baseline.

    The base of the online-distillation modules. Its students are a
    :class:`~kd_lightning.models.branches.StudentGroup`: branch-based (``stem + stages[:shared_stages]`` shared) or
    network-based (``network_based=True``, nothing shared). The loss is :math:`\\sum_i \\mathrm{CE}(z_i, y)`, logged as
    ``train/ce``. The module's own prediction (``self(x)``, ``predict``, ``<stage>/acc1``) is the inference student's,
    student 0 here; :meth:`export_backbone` and :meth:`save_backbone_checkpoint` take any student out as a plain
    backbone for deployment.

    The single network that :class:`ClassifierModule` builds is removed: a group module has no parameter outside its
    students and method parts, and creates no parameter a mode leaves without gradient (DDP would fail on it).

    Args:
        num_students: ``m >= 2``.
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
        with torch.random.fork_rng(devices=[]):
            classifier = ClassifierModule(
                backbone=hp.backbone,
                num_classes=self.num_classes,
                backbone_kwargs=hp.backbone_kwargs,
                label_smoothing=hp.label_smoothing,
            )
        classifier.backbone = self.export_backbone(index).cpu()
        checkpoint = {
            "state_dict": classifier.state_dict(),
            "hyper_parameters": dict(classifier.hparams),
            "pytorch-lightning_version": pl.__version__,
        }
        classifier.on_save_checkpoint(checkpoint)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, path)
        return path


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
        self.temperature = temperature
        self.detach_targets = detach_targets

    def distill_weight(self) -> float:
        """Ramp-up weight :math:`w(t)` of the current epoch."""
        return sigmoid_rampup(self.current_epoch, self.hparams.rampup_epochs)

    def as_target(self, tensor: Tensor) -> Tensor:
        """``tensor`` detached when ``detach_targets``, else itself."""
        return tensor.detach() if self.detach_targets else tensor


class DMLModule(DistillationGroupModule):
    """DML (Zhang et al. 2018): L = sum_i [CE(z_i, y) + 1/(m-1) sum_{j!=i} T^2 KL(p_j^T || p_i^T)].

    Deep mutual learning (Zhang et al., CVPR 2018), as OKDDip ran it: network-based, T = 3, no ramp-up.

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y) + \\sum_i \\frac{1}{m-1} \\sum_{j \\ne i}
        T^2\\, \\mathrm{KL}(p_j^T \\,\\|\\, p_i^T),

    logged as ``train/ce`` and ``train/kd`` (see :func:`~kd_lightning.losses.mutual_kl_div`); the peers' predictions
    are constants by default (``detach_targets``), as in DML's alternating updates.

    Args:
        num_students: ``m >= 2``.
        network_based: independent networks (DML) or branches.
        temperature: ``T``.
        rampup_epochs: ramp-up length of the KL term (0: none).
        detach_targets: no gradient through the other students' predictions.
        **kwargs: :class:`StudentGroupModule` arguments.
    """

    def __init__(
        self,
        num_students: int = 4,
        network_based: bool = True,
        temperature: float = 3.0,
        rampup_epochs: float = 0.0,
        detach_targets: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_students=num_students,
            network_based=network_based,
            temperature=temperature,
            rampup_epochs=rampup_epochs,
            detach_targets=detach_targets,
            **kwargs,
        )

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        logits = self.run_group(x).logits
        kd = mutual_kl_div(logits, self.as_target(logits), self.temperature)
        return {"ce": self.group_cross_entropy(logits, y), "kd": self.distill_weight() * kd}


class CLILRModule(DistillationGroupModule):
    """CL-ILR (Song & Chai 2018): L = sum_i [CE(z_i, y) + w(t) T^2 KL(softmax(mean_{j!=i} z_j / T) || p_i^T)].

    Collaborative learning with intermediate-level representation sharing (Song & Chai, NeurIPS 2018).

    Branch ``i`` learns from the mean of the other branches' logits, softened at ``T``; the gradient that flows from
    the branches into the shared trunk is divided by the number of branches (backpropagation rescaling):

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y) + w(t) \\sum_i T^2\\,
        \\mathrm{KL}\\Big(\\mathrm{softmax}\\big(\\tfrac{1}{m-1}\\textstyle\\sum_{j \\ne i} z_j / T\\big) \\,\\big\\|\\,
        p_i^T\\Big),

    logged as ``train/ce`` and ``train/kd``.

    Args:
        num_students: ``m >= 2`` branches.
        shared_stages: see :class:`StudentGroupModule`.
        temperature: ``T``.
        rampup_epochs: ramp-up length (80 as OKDDip's runs).
        detach_targets: no gradient through the targets.
        **kwargs: :class:`StudentGroupModule` arguments.
    """

    def __init__(
        self,
        num_students: int = 4,
        shared_stages: int | None = None,
        temperature: float = 3.0,
        rampup_epochs: float = 80.0,
        detach_targets: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_students=num_students,
            shared_stages=shared_stages,
            temperature=temperature,
            rampup_epochs=rampup_epochs,
            detach_targets=detach_targets,
            **kwargs,
        )

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        m = self.num_students
        logits = self.run_group(x, trunk_grad_scale=1.0 / m).logits
        others = (torch.ones(m, m, device=logits.device) - torch.eye(m, device=logits.device)) / (m - 1)
        targets = aggregate_targets(self.as_target(logits), others, self.temperature, "logits")
        kd = group_kd_kl_div(logits, targets, self.temperature)
        return {"ce": self.group_cross_entropy(logits, y), "kd": self.distill_weight() * kd}


class ONEModule(DistillationGroupModule):
    """ONE (Lan et al. 2018): L = sum_i CE(z_i,y) + CE(z_e,y) + w(t) sum_i T^2 KL(p_e^T || p_i^T), z_e = sum_i g_i z_i.

    On-the-fly native ensemble (Lan et al., NeurIPS 2018): branches distil a gated ensemble of themselves.

    The gate reads the shared trunk's globally pooled output: ``g = softmax(ReLU(BN(W h)))`` over the ``m``
    branches (the authors' code). The gated ensemble's logits :math:`z_e = \\sum_i g_i z_i` are trained with a
    cross-entropy (what trains the gate) and are every branch's target, detached by default:

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y) + \\mathrm{CE}(z_e, y)
        + w(t) \\sum_i T^2\\, \\mathrm{KL}(p_e^T \\,\\|\\, p_i^T),

    logged as ``train/ce``, ``train/ce_ensemble`` and ``train/kd``. Branch-based only (the gate needs the trunk).
    Evaluation also logs the gated ensemble (``<stage>/gated_ensemble/acc1``).

    Args:
        num_students: ``m >= 2`` branches.
        shared_stages: see :class:`StudentGroupModule`.
        temperature: ``T``.
        rampup_epochs: ramp-up length (80 as ONE's and OKDDip's runs).
        detach_targets: no gradient through the gated ensemble in the KL term.
        **kwargs: :class:`StudentGroupModule` arguments.

    Raises:
        ValueError: ``network_based=True`` (the gate reads the shared trunk).
    """

    def __init__(
        self,
        num_students: int = 4,
        shared_stages: int | None = None,
        temperature: float = 3.0,
        rampup_epochs: float = 80.0,
        detach_targets: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("network_based"):
            raise ValueError("ONE is branch-based only: its gate reads the shared trunk (network_based=True given)")
        super().__init__(
            num_students=num_students,
            shared_stages=shared_stages,
            temperature=temperature,
            rampup_epochs=rampup_epochs,
            detach_targets=detach_targets,
            **kwargs,
        )
        m = self.num_students
        self.gate = nn.Sequential(nn.Linear(self.group.trunk_width(), m), nn.BatchNorm1d(m), nn.ReLU())

    def gate_weights(self, trunk: Tensor) -> Tensor:
        """``(B, m)`` gate of the trunk output ``(B, C, ...)``, pooled over its spatial dimensions."""
        pooled = trunk.flatten(2).mean(dim=-1) if trunk.dim() > 2 else trunk
        return self.gate(pooled).float().softmax(dim=-1)

    def gated_ensemble(self, output: GroupOutput) -> Tensor:
        """``(B, C)`` gated ensemble logits :math:`\\sum_i g_i z_i`."""
        gate = self.gate_weights(output.trunk)
        return (gate.t()[:, :, None] * output.logits.float()).sum(dim=0)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        output = self.run_group(x)
        logits = output.logits
        ensemble = self.gated_ensemble(output)
        target = (self.as_target(ensemble) / self.temperature).softmax(dim=-1)
        kd = group_kd_kl_div(logits, target.expand_as(logits), self.temperature)
        return {
            "ce": self.group_cross_entropy(logits, y),
            "ce_ensemble": self.cross_entropy(ensemble, y),
            "kd": self.distill_weight() * kd,
        }

    def eval_output_names(self) -> list[str]:
        return [*super().eval_output_names(), "gated_ensemble"]

    def named_outputs(self, output: GroupOutput) -> dict[str, Tensor]:
        return {**super().named_outputs(output), "gated_ensemble": self.gated_ensemble(output)}


class OKDDipModule(DistillationGroupModule):
    """OKDDip (Chen et al. 2020, Eq. 8): L = sum_i CE(z_i,y) + w(t) T^2 [sum_{i<m} KL(t_i || p_i^T) + KL(t_m || p_m^T)].

    Online knowledge distillation with diverse peers (Chen et al., AAAI 2020): ``m - 1`` peers and a group leader.

    Students ``0 .. m-2`` are the auxiliary peers, student ``m - 1`` the group leader (the model for inference).
    First level: peer ``i`` learns from its own target :math:`t_i = \\sum_j \\alpha_{ij} p_j` (Eq. 5), the weights
    from query/key projections of the peers' pooled last-stage features (Eq. 9-10; see
    :func:`~kd_lightning.losses.attention_weights`): projections shared by the peers, no bias, width ``D / 8``,
    softmax over all peers including itself; the leader takes no part in it. Second level: the leader learns from
    the peers' mean :math:`t_m = \\frac{1}{m-1}\\sum_j p_j` (Eq. 7). The loss (Eq. 8), with the ramp-up :math:`w(t)`:

    .. math:: \\mathcal{L} = \\sum_{i=1}^{m} \\mathrm{CE}(z_i, y) + w(t)\\, T^2 \\Big(\\sum_{i=1}^{m-1}
        \\mathrm{KL}(t_i \\,\\|\\, p_i^T) + \\mathrm{KL}(t_m \\,\\|\\, p_m^T)\\Big),

    logged as ``train/ce``, ``train/peer_kd`` and ``train/leader_kd`` (and ``train/teacher_kd`` with a teacher).

    Where the paper and the authors' code differ, the default follows the code:

    * ``aggregate``: ``"logits"`` (the code: weighted logits, softened afterwards) or ``"probs"`` (Eq. 5 and 7).
    * ``detach_targets``: False (the code): gradients flow through the targets at both levels, which is what trains
      the projections (through :math:`\\alpha`) and lets the leader's term train the peers. With True the targets
      are constants and the projections, which would get no gradient, are frozen at their initial values.

    Ablations (Table 5) as options: ``aggregation`` = ``"attention"`` (the method), ``"mean"`` (uniform weights over
    the peers), ``"random"`` (fresh random weights per sample and step, rows normalised), ``"symmetric"`` (identity
    projections: :math:`\\alpha = \\mathrm{softmax}(h h^\\top)`, whose energies are symmetric), ``"self"`` (each peer
    attends only to itself: the KL to its own prediction being identically zero, its term is the entropy
    :math:`T^2 H(p_i^T)`, the cross-entropy with its own prediction as target, as the authors' ``E_Loss``; it needs
    ``detach_targets=False``, else its gradient is zero); and ``leader=False`` (all ``m`` students are peers and a
    random peer, ``inference_peer``, is used for inference). Projections exist only with ``"attention"``.

    OKDDip+KD (Table 6): with ``teacher_backbone`` + ``teacher_checkpoint``, every student also learns from a
    pre-trained :class:`~kd_lightning.modules.teacher.FrozenTeacher`: ``teacher_weight``
    :math:`\\cdot \\sum_i T^2\\, \\mathrm{KL}(p^T_{teacher} \\,\\|\\, p_i^T)` (no ramp-up). The teacher is
    held outside the module tree (not in checkpoints, not wrapped by DDP), as in :class:`~kd_lightning.DistillModule`,
    and rebuilt from the hyperparameters on loading.

    Args:
        num_students: ``m``, peers and leader together (>= 3 with a leader, >= 2 without).
        network_based: ``m`` independent networks instead of branches (Tables 1-2, first column).
        shared_stages: see :class:`StudentGroupModule`.
        temperature: ``T`` (3).
        rampup_epochs: ramp-up length ``L`` of :math:`w(t)` (80).
        detach_targets: see above (False).
        aggregation: first-level aggregation: the method (``"attention"``) or an ablation, see above.
        aggregate: ``"logits"`` or ``"probs"``, at both levels.
        leader: train a group leader (False: the "w/o two-level" ablation).
        inference_peer: without a leader, the peer used for inference; None: drawn at random (and recorded).
        teacher_backbone: registered backbone of an optional pre-trained teacher (OKDDip+KD).
        teacher_checkpoint: its weights (a kd_lightning checkpoint or a plain ``state_dict``).
        teacher_backbone_kwargs: its backbone's keyword arguments (None: those its checkpoint records).
        teacher_weight: weight of the teacher term.
        **kwargs: :class:`StudentGroupModule` arguments.

    Raises:
        ValueError: an unknown ``aggregation`` or ``aggregate``, ``"self"`` with detached targets, too few students,
            ``inference_peer`` with a leader or out of range, a teacher half given, ``teacher_weight < 0``.
    """

    def __init__(
        self,
        num_students: int = 4,
        network_based: bool = False,
        shared_stages: int | None = None,
        temperature: float = 3.0,
        rampup_epochs: float = 80.0,
        detach_targets: bool = False,
        aggregation: Aggregation = "attention",
        aggregate: AggregateSpace = "logits",
        leader: bool = True,
        inference_peer: int | None = None,
        teacher_backbone: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_backbone_kwargs: dict[str, Any] | None = None,
        teacher_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose among {list(AGGREGATIONS)}")
        if aggregate not in AGGREGATE_SPACES:
            raise ValueError(f"aggregate must be 'probs' or 'logits', got {aggregate!r}")
        if aggregation == "self" and detach_targets:
            raise ValueError(
                "aggregation='self' with detach_targets=True gives the entropy term no gradient: set "
                "detach_targets=False"
            )
        min_students = 3 if leader else 2
        if num_students < min_students:
            raise ValueError(
                f"OKDDip needs at least 2 peers: num_students must be >= {min_students} "
                f"{'with' if leader else 'without'} a leader, got {num_students}"
            )
        if leader and inference_peer is not None:
            raise ValueError("inference_peer is for leader=False: with a leader, the leader is used for inference")
        if inference_peer is not None and not 0 <= inference_peer < num_students:
            raise ValueError(f"inference_peer must be in [0, {num_students - 1}], got {inference_peer}")
        if (teacher_backbone is None) != (teacher_checkpoint is None):
            raise ValueError(
                f"teacher_backbone and teacher_checkpoint go together, got teacher_backbone={teacher_backbone!r} "
                f"and teacher_checkpoint={teacher_checkpoint!r}"
            )
        if teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0, got {teacher_weight}")
        super().__init__(
            num_students=num_students,
            network_based=network_based,
            shared_stages=shared_stages,
            temperature=temperature,
            rampup_epochs=rampup_epochs,
            detach_targets=detach_targets,
            **kwargs,
        )
        self.aggregation = aggregation
        self.aggregate = aggregate
        self.leader = leader
        if not leader and inference_peer is None:
            inference_peer = int(torch.randint(num_students, ()).item())
            self.hparams["inference_peer"] = inference_peer
        self._inference_index = num_students - 1 if leader else inference_peer
        self.num_peers = num_students - 1 if leader else num_students
        if aggregation == "attention":
            width = self.group.num_features
            self.query = nn.Linear(width, max(1, width // PROJECTION_DIVISOR), bias=False)
            self.key = nn.Linear(width, max(1, width // PROJECTION_DIVISOR), bias=False)
            if detach_targets:
                self.query.requires_grad_(False)
                self.key.requires_grad_(False)
        self._teacher: tuple[FrozenTeacher, ...] = ()  # out of the module tree, as DistillModule's teacher
        if teacher_checkpoint is not None:
            teacher = FrozenTeacher.from_checkpoint(
                teacher_backbone, self.num_classes, teacher_checkpoint, teacher_backbone_kwargs
            )
            self._teacher = (teacher.to(self.device),)

    # ------------------------------------------------------------------------------------------------ students
    @property
    def inference_index(self) -> int:
        return self._inference_index

    @property
    def peer_indices(self) -> list[int]:
        return list(range(self.num_peers))

    def student_name(self, index: int) -> str:
        return "leader" if self.leader and index == self.num_students - 1 else f"peer{index}"

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The frozen teacher of OKDDip+KD, or None (held outside the module tree; see :class:`DistillModule`)."""
        return self._teacher[0] if self._teacher else None

    def frozen_networks(self) -> tuple[nn.Module, ...]:
        return self._teacher

    # ----------------------------------------------------------------------------------------------- training
    def peer_weights(self, features: Tensor) -> Tensor:
        """First-level weights of the peers from their ``(n, B, D)`` features: ``(B, n, n)`` or ``(n, n)``."""
        n = features.shape[0]
        if self.aggregation == "attention":
            per_sample = features.transpose(0, 1)
            return attention_weights(self.query(per_sample), self.key(per_sample))
        if self.aggregation == "symmetric":
            per_sample = features.transpose(0, 1)
            return attention_weights(per_sample, per_sample)
        if self.aggregation == "random":
            draws = torch.rand(features.shape[1], n, n, device=features.device)
            return draws / draws.sum(dim=-1, keepdim=True)
        return torch.full((n, n), 1.0 / n, device=features.device)  # "mean"

    def peer_loss(self, features: Tensor, logits: Tensor) -> Tensor:
        """First-level distillation :math:`\\mathcal{L}_{dis1}` of the peers (Eq. 6), or the entropy for ``"self"``."""
        temperature = self.temperature
        if self.aggregation == "self":
            soft = logits.flatten(0, 1).float() / temperature
            return len(logits) * temperature**2 * soft_cross_entropy(soft, soft.softmax(dim=-1))
        weights = self.as_target(self.peer_weights(features))
        targets = aggregate_targets(self.as_target(logits), weights, temperature, self.aggregate)
        return group_kd_kl_div(logits, targets, temperature)

    def leader_loss(self, peer_logits: Tensor, leader_logits: Tensor) -> Tensor:
        """Second-level distillation :math:`\\mathcal{L}_{dis2}` (Eq. 7): the leader from the peers' mean."""
        mean = torch.full((1, len(peer_logits)), 1.0 / len(peer_logits), device=peer_logits.device)
        target = aggregate_targets(self.as_target(peer_logits), mean, self.temperature, self.aggregate)
        return group_kd_kl_div(leader_logits[None], target, self.temperature)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        output = self.run_group(x)
        logits, peers = output.logits, slice(0, self.num_peers)
        weight = self.distill_weight()
        losses = {
            "ce": self.group_cross_entropy(logits, y),
            "peer_kd": weight * self.peer_loss(output.features[peers], logits[peers]),
        }
        if self.leader:
            losses["leader_kd"] = weight * self.leader_loss(logits[peers], logits[-1])
        if self.teacher is not None:
            teacher = (self.teacher(x).float() / self.temperature).softmax(dim=-1)
            kd = group_kd_kl_div(logits, teacher.expand_as(logits), self.temperature)
            losses["teacher_kd"] = self.hparams.teacher_weight * kd
        return losses
