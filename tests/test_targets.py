"""The teacher distributions of Tang et al. against hand-computed rows, and the KD gradient against Eq. (2)."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses import kd_kl_div
from kd_lightning.targets import (
    TARGET_KINDS,
    TEACHER_FORWARD_KINDS,
    check_target_kind,
    gradient_rescaling,
    kd_target,
    pt_target,
    rel_table,
    sim_table,
    teacher_distribution,
    topk_target,
    uniform_target,
)

PROBS = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.25, 0.05]])
Y = torch.tensor([2, 1])


def _rows_sum_to_one(rho: torch.Tensor) -> None:
    assert torch.allclose(rho.sum(-1), torch.ones(len(rho)), atol=1e-6)
    assert (rho >= 0).all()


def test_kd_target_is_softmax_at_temperature():
    logits = torch.tensor([[math.log(1.0), math.log(2.0), math.log(4.0)]])
    # T = 2 takes square roots: (1, sqrt 2, 2) / (3 + sqrt 2)
    expected = torch.tensor([[1.0, math.sqrt(2.0), 2.0]]) / (3.0 + math.sqrt(2.0))
    assert torch.allclose(kd_target(logits, 2.0), expected)


def test_uniform_target():
    rho = uniform_target(Y, 4)
    assert torch.equal(rho, torch.full((2, 4), 0.25))


def test_pt_keeps_only_the_ground_truth_mass():
    rho = pt_target(PROBS, Y)
    expected = torch.tensor([[0.8 / 3, 0.8 / 3, 0.2, 0.8 / 3], [0.4 / 3, 0.6, 0.4 / 3, 0.4 / 3]])
    assert torch.allclose(rho, expected)
    _rows_sum_to_one(rho)


def test_topk_keeps_the_k_largest_and_spreads_the_rest():
    rho = topk_target(PROBS, 2)
    # row 0: top-2 are 0.5 and one of the 0.2s (ties: torch picks one); rest 0.3 over 2 classes
    assert rho[0, 0] == pytest.approx(0.5)
    assert sorted(rho[0, 1:].tolist()) == pytest.approx([0.15, 0.15, 0.2])
    assert torch.allclose(rho[1], torch.tensor([0.075, 0.6, 0.25, 0.075]))
    _rows_sum_to_one(rho)
    with pytest.raises(ValueError, match=r"topk needs 1 <= k < num_classes=4, got k=4"):
        topk_target(PROBS, 4)


def test_sim_table_hand_computed():
    # three classes: 0 and 1 at 60 degrees (cos 0.5), 2 orthogonal to both (cos 0)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0], [0.0, 0.0, 3.0]])
    table = sim_table(w, power=2.0, temperature=0.5)
    # ((1 + cos) / 2) ** 2 / 0.5: cos 1 -> 2, cos 0.5 -> 1.125, cos 0 -> 0.5
    row0 = torch.tensor([2.0, 1.125, 0.5]).softmax(-1)
    row2 = torch.tensor([0.5, 0.5, 2.0]).softmax(-1)
    assert torch.allclose(table[0], row0, atol=1e-6)
    assert torch.allclose(table[2], row2, atol=1e-6)
    _rows_sum_to_one(table)
    with pytest.raises(ValueError, match="sim needs power > 0 and temperature > 0"):
        sim_table(w, power=0.0, temperature=1.0)


def test_rel_table_hand_computed():
    superclass_map = torch.tensor([0, 0, 0, 1, 1, 1])
    table = rel_table(superclass_map, gt_mass=0.5, superclass_mass=0.3)
    # class 0: 0.5 on itself, 0.3 / 2 on classes 1, 2, 0.2 / 3 on classes 3, 4, 5
    assert torch.allclose(table[0], torch.tensor([0.5, 0.15, 0.15, 0.2 / 3, 0.2 / 3, 0.2 / 3]))
    assert torch.allclose(table[4], torch.tensor([0.2 / 3, 0.2 / 3, 0.2 / 3, 0.15, 0.5, 0.15]))
    _rows_sum_to_one(table)


@pytest.mark.parametrize(
    ("superclass_map", "masses", "match"),
    [
        ([0, 0, 1, 1], (0.8, 0.3), r"gt_mass \+ superclass_mass <= 1"),
        ([0, 0, 1, 1], (-0.1, 0.3), "gt_mass >= 0"),
        ([0, 0, 0, 1], (0.5, 0.3), r"at least 2 classes and not all of them; got super-class sizes \[1, 3\]"),
        ([0, 0, 0, 0], (0.5, 0.3), r"got super-class sizes \[4\] for 4 classes"),
    ],
)
def test_rel_table_errors(superclass_map, masses, match):
    with pytest.raises(ValueError, match=match):
        rel_table(torch.tensor(superclass_map), *masses)


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_every_kind_by_name(kind):
    torch.manual_seed(0)
    logits = torch.randn(2, 4)
    table = rel_table(torch.tensor([0, 0, 1, 1]), 0.5, 0.3)
    rho = teacher_distribution(kind, Y, 4, teacher_logits=logits, class_table=table, temperature=2.0, k=2)
    _rows_sum_to_one(rho)
    probs = (logits / 2.0).softmax(-1)
    expected = {
        "kd": probs,
        "ls": torch.full((2, 4), 0.25),
        "pt": pt_target(probs, Y),
        "sim": table[Y],
        "rel": table[Y],
        "pt+sim": 0.5 * pt_target(probs, Y) + 0.5 * table[Y],
        "pt+rel": 0.5 * pt_target(probs, Y) + 0.5 * table[Y],
        "topk": topk_target(probs, 2),
    }[kind]
    assert torch.allclose(rho, expected)


def test_kinds_without_teacher_forward_need_no_logits():
    table = torch.eye(4)
    for kind in set(TARGET_KINDS) - TEACHER_FORWARD_KINDS:
        teacher_distribution(kind, Y, 4, teacher_logits=None, class_table=table)
    with pytest.raises(ValueError, match="target kind 'pt' needs the teacher's logits"):
        teacher_distribution("pt", Y, 4)
    with pytest.raises(ValueError, match="target kind 'pt\\+sim' needs the 'sim' class table"):
        teacher_distribution("pt+sim", Y, 4, teacher_logits=torch.zeros(2, 4))


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown target kind 'kd-pt'; valid kinds: kd, ls, pt, sim, pt\+sim, topk"):
        check_target_kind("kd-pt")


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_logit_gradient_matches_eq2(temperature):
    """d/dz [(1-a) CE + a T^2 KL(rho || softmax(z/T))] = (1-a)(p - y) + a T (p_T - rho) (Eq. 2 with T^2)."""
    torch.manual_seed(0)
    alpha = 0.7
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(3, 5, dtype=torch.float64).softmax(-1)
    y = torch.tensor([0, 3, 4])

    def loss_fn(logits):
        ce = torch.nn.functional.cross_entropy(logits, y)
        return (1 - alpha) * ce + alpha * kd_kl_div(logits, rho, temperature).double()

    (grad,) = torch.autograd.grad(loss_fn(z), z)
    p, p_t = z.softmax(-1), (z / temperature).softmax(-1)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    expected = ((1 - alpha) * (p - onehot) + alpha * temperature * (p_t - rho)) / 3  # batch mean
    assert torch.allclose(grad, expected.detach(), atol=1e-7)  # kd_kl_div computes in float32
    # central finite differences on one logit (step 1e-2: float32 rounding / step stays below 1e-5)
    eps, (i, j) = 1e-2, (1, 2)
    bump = torch.zeros_like(z)
    bump[i, j] = eps
    numeric = (loss_fn(z + bump) - loss_fn(z - bump)) / (2 * eps)
    assert numeric.item() == pytest.approx(expected[i, j].item(), abs=1e-4)


def test_gradient_rescaling_is_the_ratio_of_ground_truth_gradients():
    torch.manual_seed(1)
    alpha, temperature = 0.6, 2.0
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    rho = torch.randn(4, 6, dtype=torch.float64).softmax(-1)
    y = torch.tensor([0, 1, 5, 2])
    kd_loss = (1 - alpha) * torch.nn.functional.cross_entropy(z, y, reduction="sum") + alpha * len(y) * kd_kl_div(
        z, rho, temperature
    )
    (g_kd,) = torch.autograd.grad(kd_loss, z)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y, reduction="sum"), z)
    idx = y[:, None]
    expected = (g_kd.gather(1, idx) / g_ce.gather(1, idx)).squeeze(1).float()
    assert torch.allclose(gradient_rescaling(z.detach(), rho, y, alpha, temperature), expected, atol=1e-5)
    # Proposition 2 at T = 1: rho_t = p_t + c gives (1 - alpha) + alpha c / (1 - p_t)
    p = z.detach().softmax(-1).float()
    c = 0.05
    rho_pt = pt_target(p, y)
    rho_pt = pt_target(rho_pt.scatter(1, idx, p.gather(1, idx) + c), y)
    w = gradient_rescaling(z.detach().float(), rho_pt, y, alpha, 1.0)
    assert torch.allclose(w, (1 - alpha) + alpha * c / (1 - p.gather(1, idx).squeeze(1)), atol=1e-5)
