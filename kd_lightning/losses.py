"""Pure loss functions shared by the methods: tensors in, a scalar out; no Lightning, no state.

Every function computes its softmax / log-softmax / KL in float32 (also under mixed precision) and uses
``log_softmax`` and ``kl_div`` rather than epsilon-guarded logarithms. Shapes: ``B`` samples, ``C`` classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_kl_div", "kd_kl_div_logits", "score_difference", "soft_cross_entropy"]


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a soft target, averaged over the batch.

    .. math:: \\mathcal{L} = -\\frac{1}{B}\\sum_i \\sum_c q_{ic} \\log \\mathrm{softmax}(z_i)_c

    Args:
        logits: ``(B, C)`` raw logits ``z``.
        target_probs: ``(B, C)`` rows ``q`` summing to 1.
    """
    return -(target_probs.float() * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def kd_kl_div(student_logits: Tensor, teacher_probs: Tensor, temperature: float, t2_scaling: bool = True) -> Tensor:
    """Hinton et al. (2015) distillation term: KL(teacher || student at temperature T), batch mean, times T^2.

    .. math::
        \\mathcal{L}_{KD} = \\frac{T^2}{B}\\sum_i \\mathrm{KL}\\big(\\rho_i \\,\\|\\, \\mathrm{softmax}(z_i/T)\\big)

    (Eq. 2 of Tang et al. with the :math:`T^2` of their Appendix 7.2; Eq. 4 of OKDDip.) The :math:`T^2`
    factor keeps the gradient magnitude independent of ``T``; ``t2_scaling=False`` drops it.

    Args:
        student_logits: ``(B, C)`` raw student logits ``z``.
        teacher_probs: ``(B, C)`` teacher distribution ``rho`` (rows sum to 1; zeros allowed).
        temperature: ``T > 0``.
        t2_scaling: multiply by :math:`T^2`.
    """
    log_p_student = (student_logits.float() / temperature).log_softmax(dim=-1)
    loss = F.kl_div(log_p_student, teacher_probs.float(), reduction="batchmean")
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
