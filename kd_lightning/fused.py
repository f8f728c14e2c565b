"""The chunked CE + KD autograd kernel of the class-target tables (DUPS), for dense and sparse targets.

:func:`cross_entropy_and_kd` gives the same values and gradients as ``F.cross_entropy`` plus
:func:`~kd_lightning.losses.kd_kl_div` (tested) in one pass over the logits; why it pays is in its docstring and
the benchmark documentation (``benchmarks/fused_loss.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kd_lightning.losses import KDSettings

__all__ = [
    "SparseTargets",
    "cross_entropy_and_kd",
    "expand_sparse_targets",
    "kd_loss_terms",
    "sparse_neg_entropy",
    "sparse_target_terms",
]


SparseTargets = tuple[Tensor, Tensor, Tensor]
"""Target rows stored as their ``k`` largest entries and a uniform rest: ``(values, indices, rest)`` of shapes
``(b, k)``, ``(b, k)`` and ``(b,)`` (the remaining mass spread uniformly over
the other classes, as KD-topk's target, Sec. 5.3 of Tang et al.)."""


def expand_sparse_targets(values: Tensor, indices: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """The ``(B, C)`` float32 rows that ``k`` stored entries and a uniform rest stand for (see
    :data:`SparseTargets`): :math:`q_{a_j} = v_j`, every other entry :math:`r`."""
    target = rest.float()[:, None].expand(-1, num_classes).clone()
    return target.scatter_(1, indices.long(), values.float())


def sparse_neg_entropy(values: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """``(B,)`` :math:`\\sum_j v_j \\log v_j + (C-k)\\, r \\log r` of such rows, from the stored entries alone."""
    values, rest = values.float(), rest.float()
    return torch.xlogy(values, values).sum(-1) + (num_classes - values.shape[-1]) * torch.xlogy(rest, rest)


def sparse_target_terms(
    values: Tensor, indices: Tensor, rest: Tensor, num_classes: int
) -> tuple[SparseTargets, Tensor, Tensor]:
    """The arguments of :func:`cross_entropy_and_kd` for sparse targets: the targets, their ``(B,)``
    :func:`sparse_neg_entropy` and their ``(B,)`` masses :math:`\\sum_j v_j + (C - k)\\, r`."""
    mass = values.float().sum(-1) + (num_classes - values.shape[-1]) * rest.float()
    return (values, indices, rest), sparse_neg_entropy(values, rest, num_classes), mass


def kd_loss_terms(
    logits: Tensor, labels: Tensor, target: Tensor | SparseTargets, settings: KDSettings
) -> tuple[Tensor, Tensor]:
    """``(ce_weight * CE, kd_weight * KD)`` of :func:`cross_entropy_and_kd` against per-sample targets: dense
    ``(B, C)`` rows :math:`\\rho` (a teacher's distribution) or :data:`SparseTargets` (read from a teacher store)."""
    if isinstance(target, Tensor):
        rho = target.float()
        terms = (lambda rows: rho[rows]), torch.xlogy(rho, rho).sum(-1), rho.sum(-1)
    else:
        terms = sparse_target_terms(*target, logits.shape[-1])
    return cross_entropy_and_kd(logits, labels, *terms, settings)


def cross_entropy_and_kd(
    logits: Tensor,
    labels: Tensor,
    targets: Callable[[slice], Tensor] | SparseTargets,
    target_neg_entropy: Tensor,
    target_mass: Tensor,
    settings: KDSettings,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The weighted CE and KD terms of one batch in one pass over its logits: ``(ce_weight * CE, kd_weight * KD)``.

    .. math:: \mathrm{CE} = \frac{1}{B}\sum_i -\big[(1-\epsilon) \log s_{i y_i} + \tfrac{\epsilon}{C}
        \textstyle\sum_c \log s_{ic}\big], \qquad
        \mathrm{KD} = \frac{T^2}{B}\sum_i \mathrm{KL}\big(\rho_i \,\|\, \mathrm{softmax}(z_i/T)\big),

    :math:`s = \mathrm{softmax}(z)`, :math:`\rho_i` the target of row ``i`` (a class table's row: DUPS Eq. 2 and
    4-5); equal to ``F.cross_entropy(z, y, label_smoothing=eps)`` and :func:`~kd_lightning.losses.kd_kl_div`
    (tested), with the gradients
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
        settings: ``T``, the :math:`T^2` flag, :math:`\epsilon` of the CE term and the two terms' weights.
        chunk_elements: about this many logits per chunk; None: ``2**18`` on CPU (a chunk and its scratch fit in
            a core's L2), the whole batch on an accelerator (where chunks would only add kernel launches).
    """
    return _CrossEntropyAndKD.apply(
        logits,
        labels,
        target_mass,
        target_neg_entropy,
        _FusedPass(targets, settings, chunk_elements),
    )


class _FusedPass(NamedTuple):
    """The settings of one :func:`cross_entropy_and_kd` call (kept for the backward's recomputation)."""

    targets: Callable[[slice], Tensor] | SparseTargets
    settings: KDSettings
    chunk_elements: int | None

    def gradient_scales(self, batch: int, ce_out: float = 1.0, kd_out: float = 1.0) -> tuple[float, float]:
        """The factors of :math:`s - \\bar y` and of :math:`|\\rho| \\mathrm{softmax}(z/T) - \\rho` in the gradient
        of ``ce_out * ce_weight * CE + kd_out * kd_weight * KD``."""
        settings = self.settings
        kd = kd_out * settings.kd_weight * settings.kd_factor / (settings.temperature * batch)
        return ce_out * settings.ce_weight / batch, kd

    def run(self, z: Tensor, labels: Tensor, mass: Tensor, ce_scale: float, kd_scale: float) -> tuple[Tensor, ...]:
        """One pass over the float32 logits ``z``: the ``(B, C)`` gradient
        ``ce_scale * (s - ybar) + kd_scale * (|rho| softmax(z/T) - rho)`` and, per row, :math:`\\log\\sum_c e^{z_c}`,
        :math:`\\log\\sum_c e^{z_c/T}` and :math:`\\rho \\cdot z`."""
        batch, classes = z.shape
        t = self.settings.temperature
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
        smoothing = self.settings.label_smoothing
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
            settings = fused.settings
            if settings.label_smoothing:
                nll = (1 - settings.label_smoothing) * nll + settings.label_smoothing * (lse - z.mean(1))
            kl = neg_entropy.float() + mass.float() * lse_soft - dot / settings.temperature
        ctx.grad, ctx.fused, ctx.dtype = grad, fused, logits.dtype  # the buffer: not saved, handed on in place
        ctx.save_for_backward(logits, labels, mass)
        return settings.ce_weight * nll.mean(), settings.kd_weight * settings.kd_factor * kl.mean()

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
