"""Optimizers and learning-rate schedules with the papers' defaults as real, printable values.

``functools.partial`` defaults do not serialise in ``--print_config`` and plain ``torch.optim.SGD`` shows torch's
own defaults, so the defaults the papers use live in small subclasses whose signatures carry them.
lightning-bolts' ``LinearWarmupCosineAnnealingLR`` is :func:`warmup_cosine` here (torch's ``SequentialLR``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

__all__ = ["DelayedExponentialLR", "LanguageModelSGD", "NesterovSGD", "cyclic_cosine", "warmup_cosine"]


class NesterovSGD(torch.optim.SGD):
    """SGD with Nesterov momentum and the CIFAR defaults of the papers: lr 0.1, momentum 0.9, weight decay 5e-4."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


class LanguageModelSGD(torch.optim.SGD):
    """Plain SGD with Zaremba et al.'s language-model defaults (also the DUPS paper's): lr 20, no momentum, no
    weight decay (gradients clipped by the trainer's ``gradient_clip_val``)."""

    def __init__(
        self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 20.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay)


class DelayedExponentialLR(LRScheduler):
    r"""The learning rate constant for ``constant_epochs`` epochs, then multiplied by ``gamma`` every epoch.

    Zaremba et al.'s schedules (as the DUPS paper, Sec. 4.2, reports them): small model 4 epochs then x0.5, medium
    5 then x0.8, large 15 then x1/1.5. Epoch ``e`` (0-indexed) trains at
    :math:`\eta_0\, \gamma^{\max(0,\, e + 1 - c)}`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, constant_epochs: int, gamma: float) -> None:
        if constant_epochs < 0 or not 0 < gamma <= 1:
            raise ValueError(f"need constant_epochs >= 0 and 0 < gamma <= 1, got {constant_epochs} and {gamma}")
        self.constant_epochs, self.gamma = constant_epochs, gamma
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = self.gamma ** max(0, self.last_epoch + 1 - self.constant_epochs)
        return [base_lr * factor for base_lr in self.base_lrs]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_epochs: int, warmup_epochs: int = 0, eta_min: float = 0.0
) -> LRScheduler:
    """Cosine annealing over ``total_epochs`` epochs, after an optional linear warm-up of ``warmup_epochs``.

    .. math:: \\eta_e = \\eta_{min} + \\tfrac12(\\eta_0 - \\eta_{min})(1 + \\cos(\\pi e' / E')),

    with ``e'`` and ``E'`` counted after the warm-up. The schedule is stepped once per epoch.

    Raises:
        ValueError: ``total_epochs < 1`` or a warm-up that does not fit in ``total_epochs``.
    """
    if total_epochs < 1:
        raise ValueError(f"the cosine schedule needs total_epochs >= 1, got {total_epochs}")
    if not 0 <= warmup_epochs < total_epochs:
        raise ValueError(f"warmup_epochs must be in [0, total_epochs={total_epochs}), got {warmup_epochs}")
    cosine = CosineAnnealingLR(optimizer, T_max=total_epochs - warmup_epochs, eta_min=eta_min)
    if warmup_epochs == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / (warmup_epochs + 1), total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


def cyclic_cosine(optimizer: torch.optim.Optimizer, cycle_epochs: int, eta_min: float = 0.0) -> LRScheduler:
    """Cosine annealing restarted every ``cycle_epochs`` epochs: the cyclic schedule of Snapshot Distillation and DUPS+.

    .. math:: \\eta_e = \\eta_{min} + \\tfrac12(\\eta_0 - \\eta_{min})(1 + \\cos(\\pi\\,(e \\bmod t) / t)),

    with ``t = cycle_epochs`` and 0-indexed epochs ``e``: cycle ``k`` covers epochs ``k*t .. k*t+t-1`` and starts
    again at :math:`\\eta_0` (SGDR of Loshchilov & Hutter 2017 with :math:`T_{mult}=1`; torch's
    ``CosineAnnealingWarmRestarts``). Stepped once per epoch.

    Raises:
        ValueError: ``cycle_epochs < 1``.
    """
    if cycle_epochs < 1:
        raise ValueError(f"the cyclic cosine schedule needs cycle_epochs >= 1, got {cycle_epochs}")
    return CosineAnnealingWarmRestarts(optimizer, T_0=cycle_epochs, eta_min=eta_min)
