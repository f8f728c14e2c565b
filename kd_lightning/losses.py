"""The papers' loss terms as pure functions: tensors in, a tensor out; no Lightning, no state.

The fused CE + KD kernel of the class-target tables is in :mod:`kd_lightning.fused`; plain measurements of a
model's outputs (peer diversity) are in :mod:`kd_lightning.metrics`.

Every function computes its softmax / log-softmax / KL in float32 (also under mixed precision) and uses
``log_softmax`` and ``kl_div`` rather than epsilon-guarded logarithms. Shapes: ``B`` samples, ``C`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KDSettings",
    "aggregate_targets",
    "attention_weights",
    "empirical_mmd",
    "group_kd_kl_div",
    "kd_kl_div",
    "kd_kl_div_logits",
    "mutual_kl_div",
    "score_difference",
    "soft_cross_entropy",
]


@dataclass(frozen=True)
class KDSettings:
    """The settings of a weighted CE + KD loss, which travel together from a module to its loss and targets.

    .. math:: \\mathcal{L} = w_{CE}\\,\\mathrm{CE}_\\epsilon(z, y)
        + w_{KD}\\, [T^2]\\, \\mathrm{KL}\\big(\\rho \\,\\|\\, \\mathrm{softmax}(z / T)\\big)

    One frozen object, so the temperature that softens the targets (a DUPS class table's) and the loss's cannot
    drift apart.

    Args:
        temperature: ``T > 0``.
        t2_scaling: multiply the KD term by :math:`T^2` (Hinton et al.'s convention).
        label_smoothing: :math:`\\epsilon \\in [0, 1)` of the CE term.
        ce_weight: :math:`w_{CE} \\ge 0`.
        kd_weight: :math:`w_{KD} \\ge 0`.

    Raises:
        ValueError: a value out of range.
    """

    temperature: float
    t2_scaling: bool = True
    label_smoothing: float = 0.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ce_weight < 0 or self.kd_weight < 0:
            raise ValueError(f"ce_weight and kd_weight must be >= 0, got {self.ce_weight} and {self.kd_weight}")

    @property
    def kd_factor(self) -> float:
        """The factor of the mean KL in the KD term: :math:`T^2`, or 1 without ``t2_scaling``."""
        return self.temperature**2 if self.t2_scaling else 1.0


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a soft target, averaged over the batch.

    .. math:: \\mathcal{L} = -\\frac{1}{B}\\sum_i \\sum_c q_{ic} \\log \\mathrm{softmax}(z_i)_c

    Args:
        logits: ``(B, C)`` raw logits ``z``.
        target_probs: ``(B, C)`` rows ``q`` summing to 1.
    """
    return -(target_probs.float() * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def kd_kl_div(
    student_logits: Tensor,
    teacher_probs: Tensor,
    temperature: float,
    t2_scaling: bool = True,
) -> Tensor:
    """Hinton et al. (2015) distillation term: KL(teacher || student at temperature T), batch mean, times T^2.

    .. math::
        \\mathcal{L}_{KD} = \\frac{T^2}{B}\\sum_i \\mathrm{KL}\\big(\\rho_i \\,\\|\\, \\mathrm{softmax}(z_i/T)\\big)

    (Eq. 2 of Tang et al. with the :math:`T^2` of their Appendix 7.2; Eq. 4 of OKDDip.) The :math:`T^2`
    factor keeps the gradient magnitude independent of ``T``; ``t2_scaling=False`` drops it.

    Computed as :math:`\\mathrm{KL}(\\rho \\| p) = \\mathrm{CE}(\\rho, p) + \\sum_c \\rho_c \\log \\rho_c`, the
    cross-entropy by torch's fused soft-target ``cross_entropy``.

    Args:
        student_logits: ``(B, C)`` raw student logits ``z``.
        teacher_probs: ``(B, C)`` teacher distribution ``rho`` (rows sum to 1; zeros allowed).
        temperature: ``T > 0``.
        t2_scaling: multiply by :math:`T^2`.
    """
    rho = teacher_probs.float()
    loss = F.cross_entropy(student_logits.float() / temperature, rho) + torch.xlogy(rho, rho).sum(-1).mean()
    return loss * temperature**2 if t2_scaling else loss


def kd_kl_div_logits(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, t2_scaling: bool = True
) -> Tensor:
    """:func:`kd_kl_div` with the teacher given as logits, softened at the same ``T`` (log-space KL, stable).

    .. math:: \\mathcal{L}_{KD} = \\frac{T^2}{B}\\sum_i
        \\mathrm{KL}\\big(\\mathrm{softmax}(t_i/T) \\,\\|\\, \\mathrm{softmax}(z_i/T)\\big)
    """
    log_p_student = (student_logits.float() / temperature).log_softmax(dim=-1)
    log_p_teacher = (teacher_logits.float() / temperature).log_softmax(dim=-1)
    loss = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return loss * temperature**2 if t2_scaling else loss


def score_difference(logits: Tensor, k: int = 5) -> Tensor:
    """The tolerant patriarch's score-difference term (Yang et al. 2019, Eq. 3), averaged over the batch.

    .. math:: \\mathcal{L}_{SD} = \\frac{1}{B}\\sum_i \\Big[f_{a_1} - \\frac{1}{K-1}\\sum_{k=2}^{K} f_{a_k}\\Big]_i,
        \\qquad f = \\mathrm{softmax}(z),

    where :math:`a_1, \\dots, a_K` are the ``K`` classes of largest score of each sample (the model's own, so
    :math:`a_1` need not be the label). The classes are chosen without gradient; the gradient flows through the
    selected softmax values. The patriarch minimises :math:`(1-\\eta)\\,\\mathrm{CE} + \\eta\\,\\mathcal{L}_{SD}`.

    Args:
        logits: ``(B, C)`` raw logits ``z``.
        k: ``K``, with ``2 <= K <= C``.

    Raises:
        ValueError: ``k`` out of range.
    """
    if not 2 <= k <= logits.shape[-1]:
        raise ValueError(f"score_difference needs 2 <= k <= num_classes={logits.shape[-1]}, got k={k}")
    top = logits.float().softmax(dim=-1).topk(k, dim=-1).values
    return (top[:, 0] - top[:, 1:].mean(dim=-1)).mean()


def empirical_mmd(features_a: Tensor, features_b: Tensor) -> Tensor:
    """Empirical MMD with a linear kernel: the squared distance between the batch means of two feature sets.

    .. math:: \\mathrm{MMD}_{emp} = \\Big\\| \\frac{1}{n}\\sum_{i=1}^n h(x_{ai}) - \\frac{1}{n}\\sum_{i=1}^n h(x_{bi})
        \\Big\\|_2^2

    (Eq. 1 of Xu & Liu 2019, "Data-Distortion Guided Self-Distillation"). Its gradient with respect to every row of
    ``features_a`` is :math:`\\frac{2}{n^2}(\\sum_i h(x_{ai}) - \\sum_i h(x_{bi}))`, the negative of that for
    ``features_b`` (the gradient after their Eq. 1).

    Args:
        features_a: ``(n, D)`` features :math:`h(x_{ai})` of the first view.
        features_b: ``(n, D)`` features :math:`h(x_{bi})` of the second view.
    """
    return (features_a.float().mean(dim=0) - features_b.float().mean(dim=0)).square().sum()


def attention_weights(query: Tensor, key: Tensor) -> Tensor:
    """OKDDip's attention-based aggregation weights (Chen et al. 2020, Eq. 10), per sample.

    .. math:: \\alpha_{ij} = \\frac{\\exp(q_i^\\top k_j)}{\\sum_{l} \\exp(q_i^\\top k_l)},
        \\qquad q_i = W_L h_i,\\ k_j = W_E h_j \\ \\text{(Eq. 9)},

    a softmax over all peers including peer ``i`` itself, without the :math:`1/\\sqrt{d}` of Vaswani et al. (as the
    authors' code). Row ``i`` holds the weights with which peer ``i`` aggregates the group (Eq. 5).

    Args:
        query: ``(B, n, d)`` projections :math:`q_i` of the ``n`` peers' features.
        key: ``(B, n, d)`` projections :math:`k_j`.

    Returns:
        ``(B, n, n)`` float32 weights, every row summing to 1.
    """
    return (query.float() @ key.float().transpose(1, 2)).softmax(dim=-1)


def aggregate_targets(logits: Tensor, weights: Tensor, temperature: float, space: str = "probs") -> Tensor:
    """Group-derived soft targets: each target a weighted sum of the students' predictions (OKDDip Eq. 5 and 7).

    .. math:: t_i = \\sum_j w_{ij}\\, \\mathrm{softmax}(z_j / T) \\quad (\\texttt{space="probs"}, \\text{Eq. 5}),
        \\qquad t_i = \\mathrm{softmax}\\Big(\\sum_j w_{ij} z_j / T\\Big) \\quad (\\texttt{space="logits"}).

    The paper writes Eq. 5 and 7 on probabilities; the authors' code aggregates logits and softens the result.
    The same function gives the targets of OKDDip's peers (``w`` = attention weights), its leader (``w`` = one row
    of :math:`1/(m-1)`), CL-ILR (the mean of the other branches) and ONE (``w`` = the gate).

    Args:
        logits: ``(n, B, C)`` logits :math:`z_j` of ``n`` students.
        weights: ``(k, n)`` weights shared by the batch, or ``(B, k, n)`` per sample; rows normally sum to 1.
        temperature: ``T > 0``.
        space: ``"probs"`` or ``"logits"``: what is aggregated.

    Returns:
        ``(k, B, C)`` float32 target distributions.

    Raises:
        ValueError: an unknown ``space``.
    """
    if space not in ("probs", "logits"):
        raise ValueError(f"space must be 'probs' or 'logits', got {space!r}")
    values = logits.float() / temperature
    if space == "probs":
        values = values.softmax(dim=-1)
    n, batch, classes = values.shape
    if weights.dim() == 2:
        mixed = (weights.float() @ values.reshape(n, batch * classes)).reshape(-1, batch, classes)
    else:
        mixed = (weights.float() @ values.transpose(0, 1)).transpose(0, 1)
    return mixed if space == "probs" else mixed.softmax(dim=-1)


def group_kd_kl_div(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """:func:`kd_kl_div` summed over a group of students, each against its own target (OKDDip Eq. 6).

    .. math:: \\mathcal{L} = \\sum_{i=1}^{k} \\frac{T^2}{B} \\sum_b
        \\mathrm{KL}\\big(t_{ib} \\,\\|\\, \\mathrm{softmax}(z_{ib}/T)\\big)

    Args:
        student_logits: ``(k, B, C)`` logits of ``k`` students.
        target_probs: ``(k, B, C)`` their targets (rows sum to 1).
        temperature: ``T > 0``.
    """
    k = student_logits.shape[0]
    return k * kd_kl_div(student_logits.flatten(0, 1), target_probs.flatten(0, 1), temperature)


def mutual_kl_div(student_logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """Deep mutual learning (Zhang et al. 2018, Eq. 10): every student learns from every other one, pair by pair.

    .. math:: \\mathcal{L} = \\sum_{i=1}^{n} \\frac{1}{n-1} \\sum_{j \\ne i} \\frac{T^2}{B} \\sum_b
        \\mathrm{KL}\\big(\\mathrm{softmax}(z'_{jb}/T) \\,\\|\\, \\mathrm{softmax}(z_{ib}/T)\\big)

    ``target_logits`` :math:`z'` are the same students' logits, detached or not by the caller (DML's updates
    treat the peers as constants).

    Args:
        student_logits: ``(n, B, C)`` logits :math:`z` of ``n >= 2`` students.
        target_logits: ``(n, B, C)`` logits :math:`z'` of the targets.
        temperature: ``T > 0``.
    """
    n, batch, _ = student_logits.shape
    log_p = (student_logits.float() / temperature).log_softmax(dim=-1)
    log_q = (target_logits.float() / temperature).log_softmax(dim=-1)
    shape = (n, n, *log_p.shape[1:])
    # pair[j, i, b] = KL(q_jb || p_ib)
    pair = F.kl_div(log_p[None].expand(shape), log_q[:, None].expand(shape), reduction="none", log_target=True)
    pair = pair.sum(dim=-1)
    off_diagonal = pair.sum() - pair.diagonal(dim1=0, dim2=1).sum()
    return off_diagonal * temperature**2 / ((n - 1) * batch)
