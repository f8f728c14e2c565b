"""OKDDip: online knowledge distillation with diverse peers and a group leader (Chen et al., AAAI 2020).

The methods it is compared with are in :mod:`kd_lightning.modules.group_baselines`, the student group they all
build on in :mod:`kd_lightning.modules.student_group`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from kd_lightning.fused import expand_sparse_targets
from kd_lightning.losses import aggregate_targets, attention_weights, group_kd_kl_div, soft_cross_entropy
from kd_lightning.modules.stored_teacher import StoredTeacher, split_stored_batch
from kd_lightning.modules.student_group import DistillationGroupModule
from kd_lightning.modules.teacher import FrozenTeacher

__all__ = ["AGGREGATE_SPACES", "AGGREGATIONS", "OKDDipModule"]

#: OKDDip's first-level aggregations: the method and the ablations of its Table 5.
Aggregation = Literal["attention", "mean", "random", "symmetric", "self"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
#: Where OKDDip's targets are aggregated: ``"logits"`` (the authors' code) or ``"probs"`` (Eq. 5 and 7).
AggregateSpace = Literal["logits", "probs"]
AGGREGATE_SPACES: tuple[str, ...] = get_args(AggregateSpace)
#: Width of OKDDip's query/key projections: the feature width divided by this (the authors' ``factor``).
PROJECTION_DIVISOR = 8


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
        detach_targets: see above (False).
        aggregation: first-level aggregation: the method (``"attention"``) or an ablation, see above.
        aggregate: ``"logits"`` or ``"probs"``, at both levels.
        leader: train a group leader (False: the "w/o two-level" ablation).
        inference_peer: without a leader, the peer used for inference; None: drawn at random (and recorded).
        teacher_backbone: registered backbone of an optional pre-trained teacher (OKDDip+KD).
        teacher_checkpoint: its weights (a kd_lightning checkpoint or a plain ``state_dict``).
        teacher_backbone_kwargs: its backbone's keyword arguments (None: those its checkpoint records).
        teacher_weight: weight of the teacher term.
        teacher_store: folder of a teacher store (as :class:`~kd_lightning.DistillModule`'s): the teacher term reads
            the teacher's stored outputs on recorded views (built at the start of the first ``fit``, at ``temperature``)
            instead of running the teacher; the students train on those views. None: the teacher runs every step.
        store_draws: ``R``, the augmentation draws recorded per training sample.
        store_topk: ``k``, the teacher's probabilities stored per view (the rest of the mass spread uniformly;
            ``num_classes`` or more: all of them).
        **kwargs: :class:`DistillationGroupModule` arguments: ``num_students`` (``m``, peers and leader together:
            >= 3 with a leader, >= 2 without), ``network_based`` (Tables 1-2, first column), ``temperature`` (3),
            ``rampup_epochs`` (80) ...

    Raises:
        ValueError: an unknown ``aggregation`` or ``aggregate``, ``"self"`` with detached targets, too few students,
            ``inference_peer`` with a leader or out of range, a teacher half given, ``teacher_weight < 0``,
            ``teacher_store`` without a teacher.
    """

    def __init__(
        self,
        detach_targets: bool = False,
        aggregation: Aggregation = "attention",
        aggregate: AggregateSpace = "logits",
        leader: bool = True,
        inference_peer: int | None = None,
        teacher_backbone: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_backbone_kwargs: dict[str, Any] | None = None,
        teacher_weight: float = 1.0,
        teacher_store: str | None = None,
        store_draws: int = 4,
        store_topk: int = 10,
        **kwargs: Any,
    ) -> None:
        _check_aggregation(aggregation, aggregate, detach_targets)
        if (teacher_backbone is None) != (teacher_checkpoint is None):
            raise ValueError(
                f"teacher_backbone and teacher_checkpoint go together, got teacher_backbone={teacher_backbone!r} "
                f"and teacher_checkpoint={teacher_checkpoint!r}"
            )
        if teacher_weight < 0:
            raise ValueError(f"teacher_weight must be >= 0, got {teacher_weight}")
        if teacher_store is not None and teacher_checkpoint is None:
            raise ValueError("teacher_store stores a teacher's outputs: give teacher_backbone + teacher_checkpoint")
        super().__init__(detach_targets=detach_targets, **kwargs)
        _check_students(self.num_students, leader, inference_peer)
        if not leader and inference_peer is None:
            self.hparams["inference_peer"] = int(torch.randint(self.num_students, ()).item())
        if aggregation == "attention":
            width = self.group.num_features
            self.query = nn.Linear(width, max(1, width // PROJECTION_DIVISOR), bias=False)
            self.key = nn.Linear(width, max(1, width // PROJECTION_DIVISOR), bias=False)
            if detach_targets:
                self.query.requires_grad_(False)
                self.key.requires_grad_(False)
        if teacher_checkpoint is not None:
            teacher = FrozenTeacher.from_checkpoint(
                teacher_backbone, self.num_classes, teacher_checkpoint, teacher_backbone_kwargs
            )
            self.frozen.set("teacher", [teacher], self.device)
        #: The teacher store read by the teacher term (None: the teacher runs).
        self.stored_teacher = None
        if teacher_store is not None:
            temperature = self.hparams.temperature
            self.stored_teacher = StoredTeacher(teacher_store, store_draws, store_topk, temperature, self.num_classes)

    # ------------------------------------------------------------------------------------------------ students
    @property
    def inference_index(self) -> int:
        return self.num_students - 1 if self.hparams.leader else self.hparams.inference_peer

    @property
    def num_peer_students(self) -> int:
        """Number of peers: the students but the leader (all of them without a leader)."""
        return self.num_students - 1 if self.hparams.leader else self.num_students

    @property
    def peer_indices(self) -> list[int]:
        return list(range(self.num_peer_students))

    def student_name(self, index: int) -> str:
        return "leader" if self.hparams.leader and index == self.num_students - 1 else f"peer{index}"

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The frozen teacher of OKDDip+KD, or None (held in :attr:`frozen`, outside the module tree)."""
        return self.frozen.first("teacher")

    # ----------------------------------------------------------------------------------------------- training
    def peer_weights(self, features: Tensor) -> Tensor:
        """First-level weights of the peers from their ``(n, B, D)`` features: ``(B, n, n)`` or ``(n, n)``."""
        n, aggregation = features.shape[0], self.hparams.aggregation
        if aggregation == "attention":
            per_sample = features.transpose(0, 1)
            return attention_weights(self.query(per_sample), self.key(per_sample))
        if aggregation == "symmetric":
            per_sample = features.transpose(0, 1)
            return attention_weights(per_sample, per_sample)
        if aggregation == "random":
            draws = torch.rand(features.shape[1], n, n, device=features.device)
            return draws / draws.sum(dim=-1, keepdim=True)
        return torch.full((n, n), 1.0 / n, device=features.device)  # "mean"

    def peer_loss(self, features: Tensor, logits: Tensor) -> Tensor:
        """First-level distillation :math:`\\mathcal{L}_{dis1}` of the peers (Eq. 6), or the entropy for ``"self"``."""
        temperature = self.hparams.temperature
        if self.hparams.aggregation == "self":
            soft = logits.flatten(0, 1).float() / temperature
            return len(logits) * temperature**2 * soft_cross_entropy(soft, soft.softmax(dim=-1))
        weights = self.as_target(self.peer_weights(features))
        targets = aggregate_targets(self.as_target(logits), weights, temperature, self.hparams.aggregate)
        return group_kd_kl_div(logits, targets, temperature)

    def leader_loss(self, peer_logits: Tensor, leader_logits: Tensor) -> Tensor:
        """Second-level distillation :math:`\\mathcal{L}_{dis2}` (Eq. 7): the leader from the peers' mean."""
        temperature = self.hparams.temperature
        mean = torch.full((1, len(peer_logits)), 1.0 / len(peer_logits), device=peer_logits.device)
        target = aggregate_targets(self.as_target(peer_logits), mean, temperature, self.hparams.aggregate)
        return group_kd_kl_div(leader_logits[None], target, temperature)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        batch, rows = split_stored_batch(batch)
        x, y = self.unpack_batch(batch)
        teacher = None if self.teacher is None else self.teacher_probs(x, rows)  # first: see KDStudentModule's
        output = self.run_group(x)
        logits, peers = output.logits, slice(0, self.num_peer_students)
        weight = self.distill_weight()
        losses = {
            "ce": self.group_cross_entropy(logits, y),
            "peer_kd": weight * self.peer_loss(output.features[peers], logits[peers]),
        }
        if self.hparams.leader:
            losses["leader_kd"] = weight * self.leader_loss(logits[peers], logits[-1])
        if teacher is not None:
            kd = group_kd_kl_div(logits, teacher.expand_as(logits), self.hparams.temperature)
            losses["teacher_kd"] = self.hparams.teacher_weight * kd
        return losses

    def teacher_probs(self, x: Tensor, rows: Tensor | None) -> Tensor:
        """The teacher's ``(B, C)`` probabilities at the temperature: its forward on ``x``, or the store's ``rows``
        (their stored entries expanded)."""
        if rows is None:
            return (self.teacher(x).float() / self.hparams.temperature).softmax(dim=-1)
        return expand_sparse_targets(*self.stored_teacher.targets(rows), self.num_classes)

    # ---------------------------------------------------------------------------------------- teacher store
    @override
    def configure_callbacks(self) -> list[Callback]:
        """The teacher store, which attaches itself to the datamodule and is built or checked at fit start."""
        return [] if self.stored_teacher is None else [self.stored_teacher]


def _check_aggregation(aggregation: str, aggregate: str, detach_targets: bool) -> None:
    """Refuse an unknown ``aggregation`` or ``aggregate``, and ``"self"`` with detached targets.

    Raises:
        ValueError: as above.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose among {list(AGGREGATIONS)}")
    if aggregate not in AGGREGATE_SPACES:
        raise ValueError(f"aggregate must be 'probs' or 'logits', got {aggregate!r}")
    if aggregation == "self" and detach_targets:
        raise ValueError(
            "aggregation='self' with detach_targets=True gives the entropy term no gradient: set detach_targets=False"
        )


def _check_students(num_students: int, leader: bool, inference_peer: int | None) -> None:
    """Refuse fewer than 2 peers, and an ``inference_peer`` with a leader or out of range.

    Raises:
        ValueError: as above.
    """
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


#: Where the names this module held before the group methods were split into three files live now.
_MOVED = {
    "StudentGroupModule": "kd_lightning.modules.student_group",
    "sigmoid_rampup": "kd_lightning.modules.student_group",
    "CLILRModule": "kd_lightning.modules.group_baselines",
    "DMLModule": "kd_lightning.modules.group_baselines",
    "ONEModule": "kd_lightning.modules.group_baselines",
}


def __getattr__(name: str) -> Any:
    """The moved names, still found here (with a deprecation warning) by the class paths of earlier checkpoints and
    configs (``kd_lightning.modules.okddip.DMLModule`` ...).

    Raises:
        AttributeError: ``name`` is not one of them.
    """
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} moved to {_MOVED[name]}.{name} (the old path is kept for one release)",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)
