"""Losses against hand-computed values and gradients."""

import math

import pytest
import torch

from kd_lightning.losses import (
    KDSettings,
    aggregate_targets,
    attention_weights,
    empirical_mmd,
    group_kd_kl_div,
    kd_kl_div,
    kd_kl_div_logits,
    mutual_kl_div,
    score_difference,
    soft_cross_entropy,
)


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


def test_empirical_mmd_by_hand():
    """Eq. 1 of Xu & Liu: means (2, 1) and (0.5, 0.5), squared distance 1.5^2 + 0.5^2."""
    h_a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    h_b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert empirical_mmd(h_a, h_b).item() == pytest.approx(2.5, rel=1e-6)
    assert empirical_mmd(h_b, h_a).item() == pytest.approx(2.5, rel=1e-6)
    assert empirical_mmd(h_a, h_a[[1, 0]]).item() == 0.0  # a distance between batch means: order-free
    assert empirical_mmd(h_a.to(torch.bfloat16), h_b).dtype == torch.float32


def test_empirical_mmd_gradient_is_the_papers():
    """The gradient after Eq. 1: +2/n^2 (sum_i h_ai - sum_i h_bi) for every x in B^a, the negative for B^b."""
    torch.manual_seed(2)
    n = 5
    h_a = torch.randn(n, 7, requires_grad=True)
    h_b = torch.randn(n, 7, requires_grad=True)
    empirical_mmd(h_a, h_b).backward()
    expected = (2 / n**2) * (h_a.detach().sum(0) - h_b.detach().sum(0))
    assert torch.allclose(h_a.grad, expected.expand(n, 7), atol=1e-6)
    assert torch.allclose(h_b.grad, -expected.expand(n, 7), atol=1e-6)


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
def test_attention_weights_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    key = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # energies [[1, 0], [0, 2]]
    alpha = attention_weights(query, key)
    e = math.e
    expected = torch.tensor([[[e / (e + 1), 1 / (e + 1)], [1 / (1 + e**2), e**2 / (1 + e**2)]]])
    assert torch.allclose(alpha, expected, atol=1e-6)


def test_attention_rows_sum_to_one():
    gen = torch.Generator().manual_seed(0)
    alpha = attention_weights(torch.randn(5, 3, 4, generator=gen), torch.randn(5, 3, 4, generator=gen))
    assert alpha.shape == (5, 3, 3) and (alpha > 0).all()
    assert torch.allclose(alpha.sum(-1), torch.ones(5, 3))


def test_identity_projections_give_symmetric_energies():
    """The "symmetric" ablation: q = k = h, so exp(energy) is symmetric and alpha_ij * Z_i = alpha_ji * Z_j.

    alpha itself is a row-normalised matrix: it equals its transpose only when the row sums Z_i are equal.
    """
    h = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    alpha = attention_weights(h, h)
    z = (h @ h.transpose(1, 2)).exp().sum(-1)  # Z_i
    scaled = alpha * z[:, :, None]
    assert torch.allclose(scaled, scaled.transpose(1, 2), rtol=1e-5)
    same_norm = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # equal Z_i: alpha is symmetric
    alpha = attention_weights(same_norm, same_norm)
    assert torch.allclose(alpha, alpha.transpose(1, 2))


def test_aggregate_targets_are_the_weighted_sums():
    gen = torch.Generator().manual_seed(2)
    logits, t = torch.randn(3, 4, 5, generator=gen), 3.0
    weights = torch.randn(4, 2, 3, generator=gen).softmax(-1)  # (B, k, n): per sample
    probs = aggregate_targets(logits, weights, t, "probs")
    soft = aggregate_targets(logits, weights, t, "logits")
    assert probs.shape == soft.shape == (2, 4, 5)
    for i in range(2):
        for b in range(4):
            p = sum(weights[b, i, j] * (logits[j, b] / t).softmax(-1) for j in range(3))
            z = sum(weights[b, i, j] * logits[j, b] for j in range(3))
            assert torch.allclose(probs[i, b], p, atol=1e-6)
            assert torch.allclose(soft[i, b], (z / t).softmax(-1), atol=1e-6)
    shared = torch.tensor([[0.5, 0.5, 0.0]])  # (k, n): one row for the whole batch
    mean01 = ((logits[0] / t).softmax(-1) + (logits[1] / t).softmax(-1)) / 2
    assert torch.allclose(aggregate_targets(logits, shared, t, "probs")[0], mean01, atol=1e-6)


def test_aggregate_targets_rejects_unknown_space():
    with pytest.raises(ValueError, match=r"space must be 'probs' or 'logits', got 'mean'"):
        aggregate_targets(torch.zeros(2, 1, 3), torch.ones(2, 2) / 2, 1.0, "mean")


def test_group_kd_kl_div_sums_the_students():
    gen = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen).softmax(-1)
    expected = sum(kd_kl_div(logits[i], targets[i], 2.0) for i in range(3))
    assert group_kd_kl_div(logits, targets, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mutual_kl_div_by_hand():
    gen = torch.Generator().manual_seed(4)
    logits, t = torch.randn(3, 2, 4, generator=gen), 3.0
    expected = 0.0
    for i in range(3):
        for j in range(3):
            if i != j:
                p_j, p_i = (logits[j] / t).softmax(-1), (logits[i] / t).softmax(-1)
                expected += (p_j * (p_j.log() - p_i.log())).sum(-1).mean() * t**2 / 2
    assert mutual_kl_div(logits, logits, t).item() == pytest.approx(expected.item(), rel=1e-5)
    two = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # p = (1/2, 1/2), q = (3/4, 1/4), T = 1
    kl_qp = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_pq = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert mutual_kl_div(two, two, 1.0).item() == pytest.approx(kl_qp + kl_pq, rel=1e-5)


def test_mutual_kl_div_detached_targets_train_only_the_students():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    mutual_kl_div(logits, logits.detach(), 1.0).backward()
    p = logits.detach().softmax(-1)  # d/dz_i KL(p_j || p_i) = (p_i - p_j) / B
    assert torch.allclose(logits.grad[0], (p[0] - p[1]) / 3, atol=1e-6)


def test_attention_projection_gradient_matches_finite_differences():
    """d L_dis1 / d(W_L, W_E) through Eq. 10, 5 and 6, not detached (central differences in float32)."""
    gen = torch.Generator().manual_seed(6)
    features, logits, t = torch.randn(3, 4, 6, generator=gen), torch.randn(3, 4, 5, generator=gen), 3.0
    w_query = torch.randn(2, 6, generator=gen, requires_grad=True)
    w_key = torch.randn(2, 6, generator=gen, requires_grad=True)

    def loss(wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
        h = features.transpose(0, 1)
        alpha = attention_weights(h @ wq.t(), h @ wk.t())
        return group_kd_kl_div(logits, aggregate_targets(logits, alpha, t, "probs"), t)

    loss(w_query, w_key).backward()
    eps = 1e-2
    for weight, grad, other in ((w_query, w_query.grad, "q"), (w_key, w_key.grad, "k")):
        numeric = torch.zeros_like(weight)
        for index in range(weight.numel()):
            step = torch.zeros(weight.numel())
            step[index] = eps
            step = step.view_as(weight)
            with torch.no_grad():
                if other == "q":
                    up, down = loss(w_query + step, w_key), loss(w_query - step, w_key)
                else:
                    up, down = loss(w_query, w_key + step), loss(w_query, w_key - step)
            numeric.view(-1)[index] = (up - down) / (2 * eps)
        assert grad.abs().max() > 1e-3
        assert torch.allclose(grad, numeric, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": 2.0, "label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"temperature": 2.0, "ce_weight": -1.0}, "ce_weight and kd_weight must be >= 0"),
        ({"temperature": 2.0, "kd_weight": -1.0}, "ce_weight and kd_weight must be >= 0"),
    ],
)
def test_kd_settings_refuse_values_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDSettings(**kwargs)


def test_kd_settings_are_frozen_and_give_the_kd_factor():
    settings = KDSettings(3.0)
    assert settings.kd_factor == 9.0 and KDSettings(3.0, t2_scaling=False).kd_factor == 1.0
    with pytest.raises(AttributeError):
        settings.temperature = 2.0  # type: ignore[misc]
