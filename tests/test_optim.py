import math

import pytest
import torch

from kd_lightning.optim import DelayedExponentialLR, LanguageModelSGD, NesterovSGD, warmup_cosine


def _lrs(scheduler, optimizer, epochs):
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_nesterov_sgd_defaults_are_the_papers():
    opt = NesterovSGD([torch.nn.Parameter(torch.zeros(1))])
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 5e-4, True)


def test_cosine_matches_formula():
    opt = NesterovSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lrs = _lrs(warmup_cosine(opt, total_epochs=10), opt, 10)
    expected = [0.05 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_warmup_then_cosine():
    opt = NesterovSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    lrs = _lrs(warmup_cosine(opt, total_epochs=8, warmup_epochs=2), opt, 8)
    assert lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1], rel=1e-6)
    assert lrs[2:] == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 6)) for e in range(6)], rel=1e-6)


@pytest.mark.parametrize(
    ("total", "warmup", "match"), [(0, 0, "total_epochs >= 1"), (5, 5, "warmup_epochs must be in"), (5, -1, "warmup")]
)
def test_schedule_errors(total, warmup, match):
    opt = NesterovSGD([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match=match):
        warmup_cosine(opt, total, warmup)


def test_delayed_exponential_is_zarembas_small_schedule():
    """lr 20 for 4 epochs, then halved every epoch (Zaremba et al.'s small model, DUPS paper Sec. 4.2)."""
    optimizer = LanguageModelSGD([torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["lr"] == 20.0 and optimizer.defaults["momentum"] == 0
    assert _lrs(DelayedExponentialLR(optimizer, constant_epochs=4, gamma=0.5), optimizer, 7) == [
        20,
        20,
        20,
        20,
        10,
        5,
        2.5,
    ]
    with pytest.raises(ValueError, match="0 < gamma <= 1"):
        DelayedExponentialLR(optimizer, constant_epochs=1, gamma=1.5)
