"""Losses against hand-computed values and gradients."""

import math

import pytest
import torch

from kd_lightning.losses import kd_kl_div, kd_kl_div_logits, score_difference, soft_cross_entropy


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    z = math.log(math.e + math.e**2 + 1)
    expected = -(0.2 * (1 - z) + 0.5 * (2 - z) + 0.3 * (0 - z))
    assert soft_cross_entropy(logits, q).item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_of_one_hot_is_ce():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 2])
    one_hot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, y))


def test_kd_kl_div_by_hand():
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    rho = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    t = 2.0
    p1 = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([1, 0])
    kl1 = 0.5 * math.log(0.5 / p1[0]) + 0.5 * math.log(0.5 / p1[1])
    kl2 = 1.0 * math.log(1.0 / 0.5)  # 0 * log 0 = 0
    expected = t**2 * (kl1 + kl2) / 2
    assert kd_kl_div(z, rho, t).item() == pytest.approx(expected, rel=1e-6)
    assert kd_kl_div(z, rho, t, t2_scaling=False).item() == pytest.approx(expected / t**2, rel=1e-6)


def test_kd_gradient_is_p_minus_rho_over_t():
    """d/dz [T^2 KL(rho || softmax(z/T))] = T (softmax(z/T) - rho) per sample (divided by B for the mean)."""
    torch.manual_seed(0)
    z = torch.randn(3, 5, requires_grad=True)
    rho = torch.softmax(torch.randn(3, 5), dim=-1)
    t = 4.0
    kd_kl_div(z, rho, t).backward()
    expected = t * (torch.softmax(z.detach() / t, dim=-1) - rho) / 3
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_logit_form_equals_prob_form():
    torch.manual_seed(1)
    z, teacher = torch.randn(4, 6), torch.randn(4, 6)
    t = 3.0
    assert torch.allclose(kd_kl_div_logits(z, teacher, t), kd_kl_div(z, torch.softmax(teacher / t, -1), t), atol=1e-6)


def test_float32_under_half_inputs():
    z = torch.randn(2, 3).to(torch.bfloat16)
    assert kd_kl_div_logits(z, z, 2.0).dtype == torch.float32
    assert kd_kl_div_logits(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_score_difference_by_hand():
    # softmax(log p) = p: the top-3 of [.5, .2, .2, .1] give .5 - (.2 + .2) / 2 = .3, of [.1, .6, .1, .2] .6 - .15 = .45
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2]])
    assert score_difference(probs.log(), k=3).item() == pytest.approx(0.375, rel=1e-6)


def test_score_difference_gradient_is_the_softmax_jacobian():
    """d/dz_j of f_a1 - mean_k f_ak = sum_k w_k f_k (delta_kj - f_j), w = 1 on a_1, -1/(K-1) on a_2..a_K."""
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    k = 4
    score_difference(logits, k).backward()
    f = logits.detach().softmax(-1)
    order = f.argsort(dim=-1, descending=True)
    w = torch.zeros_like(f)
    w.scatter_(1, order[:, :1], 1.0)
    w.scatter_(1, order[:, 1:k], -1.0 / (k - 1))
    expected = (w * f - f * (w * f).sum(-1, keepdim=True)) / len(f)
    assert torch.allclose(logits.grad, expected, atol=1e-10)


@pytest.mark.parametrize("k", [1, 7])
def test_score_difference_rejects_k(k):
    with pytest.raises(ValueError, match="2 <= k <= num_classes=6"):
        score_difference(torch.randn(2, 6), k)


# ----------------------------------------------------------------------------------- OKDDip and its baselines
