"""Pure loss functions shared by the methods: tensors in, a scalar out; no Lightning, no state.

Every function computes its softmax / log-softmax / KL in float32 (also under mixed precision) and uses
``log_softmax`` and ``kl_div`` rather than epsilon-guarded logarithms. Shapes: ``B`` samples, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "SparseTargets",
    "aggregate_targets",
    "attention_weights",
    "cross_entropy_and_kd",
    "empirical_mmd",
    "expand_sparse_targets",
    "group_kd_kl_div",
    "kd_kl_div",
    "kd_kl_div_logits",
    "mutual_kl_div",
    "peer_diversity",
    "score_difference",
    "soft_cross_entropy",
    "sparse_kd_kl_div",
    "sparse_neg_entropy",
]


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
    target_neg_entropy: Tensor | None = None,
) -> Tensor:
    """Hinton et al. (2015) distillation term: KL(teacher || student at temperature T), batch mean, times T^2.

    .. math::
        \\mathcal{L}_{KD} = \\frac{T^2}{B}\\sum_i \\mathrm{KL}\\big(\\rho_i \\,\\|\\, \\mathrm{softmax}(z_i/T)\\big)

    (Eq. 2 of Tang et al. with the :math:`T^2` of their Appendix 7.2; Eq. 4 of OKDDip.) The :math:`T^2`
    factor keeps the gradient magnitude independent of ``T``; ``t2_scaling=False`` drops it.

    Computed as :math:`\\mathrm{KL}(\\rho \\| p) = \\mathrm{CE}(\\rho, p) + \\sum_c \\rho_c \\log \\rho_c`: the
    cross-entropy is torch's fused soft-target ``cross_entropy`` (fewer passes over the ``(B, C)`` values than
    ``log_softmax`` + ``kl_div``, which matters for the 10k-word targets of language models); the second term,
    constant for the student, can be given per sample (``target_neg_entropy``) when the targets are rows of a
    fixed table, which saves a logarithm of every entry.

    Args:
        student_logits: ``(B, C)`` raw student logits ``z``.
        teacher_probs: ``(B, C)`` teacher distribution ``rho`` (rows sum to 1; zeros allowed).
        temperature: ``T > 0``.
        t2_scaling: multiply by :math:`T^2`.
        target_neg_entropy: ``(B,)`` :math:`\\sum_c \\rho_c \\log \\rho_c` of the rows, if known.
    """
    rho = teacher_probs.float()
    if target_neg_entropy is None:
        target_neg_entropy = torch.xlogy(rho, rho).sum(-1)
    loss = F.cross_entropy(student_logits.float() / temperature, rho) + target_neg_entropy.float().mean()
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


def sparse_kd_kl_div(
    student_logits: Tensor, values: Tensor, indices: Tensor, rest: Tensor, temperature: float, t2_scaling: bool = True
) -> Tensor:
    """:func:`kd_kl_div` against targets stored as their ``k`` largest entries and a uniform rest (top-k tables).

    The target of sample ``b`` is :math:`q_i = v_j` for :math:`i = a_j` (its ``k`` stored entries) and
    :math:`q_i = r` for the other :math:`C - k` classes (the remaining mass spread uniformly, as KD-topk's
    target, Sec. 5.3 of Tang et al.), so its constant term is known from the stored entries alone:

    .. math:: \\mathrm{KL}(q \\,\\|\\, p) = \\mathrm{CE}(q, p) + \\sum_j v_j \\log v_j + (C-k)\\, r \\log r .

    Only the batch's ``(B, C)`` rows are expanded (the table stays ``O(C k)``), for torch's fused soft-target
    cross-entropy: measured faster on CPU than a gather/log-sum-exp form that never builds them (58 vs 86-112 ms for
    700 tokens x 10k words). Rows with ``v = 0`` and ``r = 0`` (no target) give 0.

    Args:
        student_logits: ``(B, C)`` raw student logits ``z``.
        values: ``(B, k)`` stored target masses :math:`v` (distinct classes per row).
        indices: ``(B, k)`` their classes :math:`a`.
        rest: ``(B,)`` mass :math:`r` of each other class.
        temperature: ``T > 0``.
        t2_scaling: multiply by :math:`T^2`.
    """
    num_classes = student_logits.shape[-1]
    target = expand_sparse_targets(values, indices, rest, num_classes)
    return kd_kl_div(student_logits, target, temperature, t2_scaling, sparse_neg_entropy(values, rest, num_classes))


def expand_sparse_targets(values: Tensor, indices: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """The ``(B, C)`` float32 rows that ``k`` stored entries and a uniform rest stand for (see
    :func:`sparse_kd_kl_div`): :math:`q_{a_j} = v_j`, every other entry :math:`r`."""
    target = rest.float()[:, None].expand(-1, num_classes).clone()
    return target.scatter_(1, indices.long(), values.float())


def sparse_neg_entropy(values: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """``(B,)`` :math:`\\sum_j v_j \\log v_j + (C-k)\\, r \\log r` of such rows, from the stored entries alone."""
    values, rest = values.float(), rest.float()
    return torch.xlogy(values, values).sum(-1) + (num_classes - values.shape[-1]) * torch.xlogy(rest, rest)


SparseTargets = tuple[Tensor, Tensor, Tensor]
"""Target rows stored as their ``k`` largest entries and a uniform rest: ``(values, indices, rest)`` of shapes
``(b, k)``, ``(b, k)`` and ``(b,)`` (see :func:`sparse_kd_kl_div`)."""


def cross_entropy_and_kd(
    logits: Tensor,
    labels: Tensor,
    targets: Callable[[slice], Tensor] | SparseTargets,
    target_neg_entropy: Tensor,
    target_mass: Tensor,
    temperature: float,
    t2_scaling: bool = True,
    label_smoothing: float = 0.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The weighted CE and KD terms of one batch in one pass over its logits: ``(ce_weight * CE, kd_weight * KD)``.

    .. math:: \mathrm{CE} = \frac{1}{B}\sum_i -\big[(1-\epsilon) \log s_{i y_i} + \tfrac{\epsilon}{C}
        \textstyle\sum_c \log s_{ic}\big], \qquad
        \mathrm{KD} = \frac{T^2}{B}\sum_i \mathrm{KL}\big(\rho_i \,\|\, \mathrm{softmax}(z_i/T)\big),

    :math:`s = \mathrm{softmax}(z)`, :math:`\rho_i` the target of row ``i`` (a class table's row: DUPS Eq. 2 and
    4-5); equal to ``F.cross_entropy(z, y, label_smoothing=eps)`` and :func:`kd_kl_div` (tested), with the gradients
    :math:`\partial\mathrm{CE}/\partial z_i = (s_i - \bar y_i)/B` and
    :math:`\partial\mathrm{KD}/\partial z_i = T\,(|\rho_i|\,\mathrm{softmax}(z_i/T) - \rho_i)/B`
    (:math:`|\rho_i|` the row's mass: 0 for a class without a target, whose KL is 0), where
    :math:`\mathrm{KL}(\rho\|q) = \sum_c \rho_c\log\rho_c + |\rho| \log\sum_c e^{z_c/T} - \rho\cdot z/T`.

    Why one function: with 10k-word targets (language models) both terms are memory-bound passes over ``(B, C)``
    values. The rows are worked through in chunks of about ``chunk_elements`` values, so each chunk stays in cache
    for all its passes; dense target rows are built a chunk at a time, never for the whole batch; for an integer
    ``T <= 16``, :math:`e^{z - m} = (e^{(z - m)/T})^T` by repeated squaring (one exponential per logit, as the plain
    CE); and the forward pass writes the weighted gradient of the sum of the two terms into one ``(B, C)`` buffer
    (the plain CE allocates two: its log-softmax and its gradient; on CPU each fresh buffer costs page faults).
    The backward hands that buffer on when the two terms reach the loss with the same factor (``ce + kd``: every
    module here); otherwise (another combination of the two, or a second backward with ``retain_graph``) it makes
    one more pass with the right weights: always the exact gradient. Not twice differentiable.

    Args:
        logits: ``(B, C)`` raw logits ``z`` (any float dtype; computed in float32).
        labels: ``(B,)`` class indices.
        targets: the dense targets as a function of the rows ``rows`` (a slice of the batch) returning their
            ``(b, C)`` float32 rows (summing to :math:`|\rho|`: 1, or 0 for no target; called once per chunk), or
            the batch's :data:`SparseTargets` (never expanded: the KL needs their entries and :math:`\sum_c z_c`).
        target_neg_entropy: ``(B,)`` :math:`\sum_c \rho_c \log \rho_c` of each row's target.
        target_mass: ``(B,)`` :math:`|\rho_i|`.
        temperature: ``T > 0``.
        t2_scaling: multiply the KD term by :math:`T^2`.
        label_smoothing: :math:`\epsilon` of the CE term.
        ce_weight: factor of the CE term.
        kd_weight: factor of the KD term.
        chunk_elements: about this many logits per chunk; None: ``2**18`` on CPU (a chunk and its scratch fit in
            a core's L2), the whole batch on an accelerator (where chunks would only add kernel launches; not
            measured here: no GPU).
    """
    return _CrossEntropyAndKD.apply(
        logits,
        labels,
        target_mass,
        target_neg_entropy,
        _FusedPass(targets, temperature, t2_scaling, label_smoothing, ce_weight, kd_weight, chunk_elements),
    )


class _FusedPass(NamedTuple):
    """The settings of one :func:`cross_entropy_and_kd` call (kept for the backward's recomputation)."""

    targets: Callable[[slice], Tensor] | SparseTargets
    temperature: float
    t2_scaling: bool
    label_smoothing: float
    ce_weight: float
    kd_weight: float
    chunk_elements: int | None

    def kd_factor(self) -> float:
        """The factor of the mean KL in the KD term: :math:`T^2` or 1."""
        return self.temperature**2 if self.t2_scaling else 1.0

    def gradient_scales(self, batch: int, ce_out: float = 1.0, kd_out: float = 1.0) -> tuple[float, float]:
        """The factors of :math:`s - \\bar y` and of :math:`|\\rho| \\mathrm{softmax}(z/T) - \\rho` in the gradient
        of ``ce_out * ce_weight * CE + kd_out * kd_weight * KD``."""
        kd = kd_out * self.kd_weight * self.kd_factor() / (self.temperature * batch)
        return ce_out * self.ce_weight / batch, kd

    def run(self, z: Tensor, labels: Tensor, mass: Tensor, ce_scale: float, kd_scale: float) -> tuple[Tensor, ...]:
        """One pass over the float32 logits ``z``: the ``(B, C)`` gradient
        ``ce_scale * (s - ybar) + kd_scale * (|rho| softmax(z/T) - rho)`` and, per row, :math:`\\log\\sum_c e^{z_c}`,
        :math:`\\log\\sum_c e^{z_c/T}` and :math:`\\rho \\cdot z`."""
        batch, classes = z.shape
        t = self.temperature
        grad = torch.empty_like(z)
        chunk = self.chunk_elements or (2**18 if z.device.type == "cpu" else batch * classes)
        step = max(1, min(batch, chunk // classes))
        scratch = z.new_empty(step, classes)
        kd_rows = mass[:, None].float() * kd_scale
        row_max, sum_exp, sum_soft, dot = (z.new_empty(batch, 1) for _ in range(4))
        power = int(t) if float(t).is_integer() and 1 <= t <= 16 else None
        dense = callable(self.targets)
        if not dense:  # the batch's few stored entries, prepared once; rho = rest + spikes at their indices
            values, indices, rest = self.targets
            rest = rest[:, None].float()
            spikes = values.float() - rest
            scaled_rest, neg_spikes = rest * kd_scale, spikes * -kd_scale
        for start in range(0, batch, step):
            rows = slice(start, start + step)
            g, zr = grad[rows], z[rows]
            exp = scratch[: len(zr)]
            shift = torch.amax(zr, 1, keepdim=True, out=row_max[rows])  # per chunk: the rows are then in cache
            if dense:
                target = self.targets(rows)
                torch.sum(torch.mul(target, zr, out=exp), 1, keepdim=True, out=dot[rows])
            else:
                torch.sum(zr, 1, keepdim=True, out=dot[rows])  # sum_c z_c, for rest * sum_c z_c below
            torch.add(shift * (-1.0 / t), zr, alpha=1.0 / t, out=g).exp_()  # e^((z - m)/T)
            soft_total = torch.sum(g, 1, keepdim=True, out=sum_soft[rows])
            if power is None:
                torch.sub(zr, shift, out=exp).exp_()
            else:
                _integer_power(g, power, out=exp)
            exp_total = torch.sum(exp, 1, keepdim=True, out=sum_exp[rows])
            g.mul_(kd_rows[rows] / soft_total)
            if dense:
                g.sub_(target, alpha=kd_scale)
            else:  # (two in-place ops: 5x faster on CPU than one broadcasting addcmul with out=)
                g.sub_(scaled_rest[rows]).scatter_add_(1, indices[rows], neg_spikes[rows])
            g.addcmul_(exp, ce_scale / exp_total)
        if not dense:
            dot = rest * dot + (spikes * z.gather(1, indices)).sum(1, keepdim=True)
        smoothing = self.label_smoothing
        if smoothing:
            grad.sub_(ce_scale * smoothing / classes)
        grad.scatter_add_(1, labels[:, None], grad.new_full((batch, 1), ce_scale * (smoothing - 1.0)))
        row_max = row_max.squeeze(1)
        lse = sum_exp.squeeze(1).log_().add_(row_max)
        return grad, lse, sum_soft.squeeze(1).log_().add_(row_max, alpha=1.0 / t), dot.squeeze(1)


def _integer_power(base: Tensor, exponent: int, out: Tensor) -> Tensor:
    """``out = base ** exponent`` (``exponent >= 1``) by repeated squaring, in place: cheaper than an exponential."""
    if exponent == 1:
        return out.copy_(base)
    bits = bin(exponent)[3:]  # after the leading 1, which the first square covers
    torch.mul(base, base, out=out)
    for index, bit in enumerate(bits):
        if index:
            out.mul_(out)
        if bit == "1":
            out.mul_(base)
    return out


class _CrossEntropyAndKD(torch.autograd.Function):
    """:func:`cross_entropy_and_kd`; the forward pass keeps the gradient of the sum of the two terms."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, labels: Tensor, mass: Tensor, neg_entropy: Tensor, fused: _FusedPass
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(logits.device.type, enabled=False):
            z = logits.detach().float()
            grad, lse, lse_soft, dot = fused.run(z, labels, mass, *fused.gradient_scales(len(z)))
            nll = lse - z.gather(1, labels[:, None]).squeeze(1)
            if fused.label_smoothing:
                nll = (1 - fused.label_smoothing) * nll + fused.label_smoothing * (lse - z.mean(1))
            kl = neg_entropy.float() + mass.float() * lse_soft - dot / fused.temperature
        ctx.grad, ctx.fused, ctx.dtype = grad, fused, logits.dtype  # the buffer: not saved, handed on in place
        ctx.save_for_backward(logits, labels, mass)
        return fused.ce_weight * nll.mean(), fused.kd_weight * fused.kd_factor() * kl.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_ce: Tensor, grad_kd: Tensor) -> tuple[Tensor | None, ...]:
        ce_out, kd_out = grad_ce.item(), grad_kd.item()
        if ctx.grad is not None and ce_out == kd_out:  # the terms summed (scaled alike): the forward's gradient
            grad, ctx.grad = ctx.grad, None
            if ce_out != 1.0:
                grad.mul_(ce_out)
        else:  # another combination, or a second backward: one more pass with these weights
            logits, labels, mass = ctx.saved_tensors
            with torch.autocast(logits.device.type, enabled=False):
                z = logits.detach().float()
                grad = ctx.fused.run(z, labels, mass, *ctx.fused.gradient_scales(len(z), ce_out, kd_out))[0]
        return grad.to(ctx.dtype), None, None, None, None


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


def peer_diversity(logits: Tensor) -> Tensor:
    """Peer diversity of OKDDip (Fig. 4): mean Euclidean distance between two peers' predictions.

    .. math:: D = \\frac{2}{n(n-1)B} \\sum_b \\sum_{i<j} \\big\\| \\mathrm{softmax}(z_{ib}) - \\mathrm{softmax}(z_{jb})
        \\big\\|_2

    (The authors' code divides the sum over pairs by 3, the number of pairs of its 3 peers.)

    Args:
        logits: ``(n, B, C)`` logits of ``n >= 2`` peers.
    """
    probs = logits.float().softmax(dim=-1)
    n, batch, _ = probs.shape
    total = sum((probs[i + 1 :] - probs[i]).norm(dim=-1).sum() for i in range(n - 1))  # peers i < j, no (n, n, B, C)
    return total * 2 / (n * (n - 1) * batch)
