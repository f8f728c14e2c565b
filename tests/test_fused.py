"""The fused CE + KD kernel against the plain terms, by hand and in its gradients."""

import math

import pytest
import torch

from kd_lightning.fused import cross_entropy_and_kd, expand_sparse_targets, sparse_neg_entropy
from kd_lightning.losses import KDSettings, kd_kl_div


def _ce_and_kd_case(num_classes: int = 30, batch: int = 23):
    """A table with a zero row (class 4: no target) and labels that hit it."""
    generator = torch.Generator().manual_seed(3)
    table = torch.softmax(2 * torch.randn(num_classes, num_classes, generator=generator), dim=-1)
    table[4] = 0
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    labels[:2] = 4
    logits = 3 * torch.randn(batch, num_classes, generator=generator)
    return table, labels, logits


def _reference(z, y, table, t, t2_scaling=True, label_smoothing=0.0):
    ce = torch.nn.functional.cross_entropy(z, y, label_smoothing=label_smoothing)
    return ce, kd_kl_div(z, table[y], t, t2_scaling)


def sparse_kd_kl_div(
    logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KD against sparse targets, with the entropy term from the stored entries (the fused kernel's)."""
    target = expand_sparse_targets(values, indices, rest, logits.shape[-1])
    cross_entropy = torch.nn.functional.cross_entropy(logits / temperature, target)
    return (cross_entropy + sparse_neg_entropy(values, rest, logits.shape[-1]).mean()) * temperature**2


def test_sparse_targets_by_hand_and_against_the_dense_kl():
    """Target (0.6, r, r, 0.2) over 4 classes with k = 2 stored entries (0.6 at class 0, 0.2 at class 3), r = 0.1:
    the rows they stand for, and their entropy term from the stored entries alone."""
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    values, indices, rest = torch.tensor([[0.6, 0.2]]), torch.tensor([[0, 3]]), torch.tensor([0.1])
    norm = math.e + 3
    p = [math.e / norm, 1 / norm, 1 / norm, 1 / norm]
    q = [0.6, 0.1, 0.1, 0.2]
    expected = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    loss = sparse_kd_kl_div(z, values, indices, rest, temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # float32
    torch.manual_seed(0)
    z = torch.randn(6, 9, requires_grad=True)
    values = torch.rand(6, 3)
    values = 0.8 * values / values.sum(-1, keepdim=True)
    indices = torch.stack([torch.randperm(9)[:3] for _ in range(6)])
    rest = torch.full((6,), 0.2 / 6)
    dense = rest[:, None].expand(6, 9).scatter(1, indices, values)
    sparse = sparse_kd_kl_div(z, values, indices, rest, temperature=3.0)
    torch.testing.assert_close(sparse, kd_kl_div(z, dense, 3.0))
    (grad,) = torch.autograd.grad(sparse, z)
    torch.testing.assert_close(grad, 3.0 * (torch.softmax(z.detach() / 3.0, -1) - dense) / 6)


def _fused(z, y, table, t, weights=(1.0, 1.0), chunk_elements=None, **settings):
    """cross_entropy_and_kd against the rows of a dense table."""
    stats = torch.xlogy(table, table).sum(-1)[y], table.sum(-1)[y]
    settings = KDSettings(t, ce_weight=weights[0], kd_weight=weights[1], **settings)
    return cross_entropy_and_kd(z, y, lambda rows: table[y[rows]], *stats, settings, chunk_elements)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("t2_scaling", [True, False])
@pytest.mark.parametrize("chunk_elements", [1, 100, 10**6])  # one row per chunk, several rows, the whole batch
@pytest.mark.parametrize("temperature", [3.0, 2.5, 20.0])  # by squaring, by a second exponential (twice)
def test_cross_entropy_and_kd_equals_the_two_terms_and_their_gradients(
    label_smoothing, t2_scaling, chunk_elements, temperature
):
    table, y, z0 = _ce_and_kd_case()
    settings = {"t2_scaling": t2_scaling, "label_smoothing": label_smoothing}
    z = z0.clone().requires_grad_()
    ce, kd = _fused(z, y, table, temperature, (0.3, 0.7), chunk_elements=chunk_elements, **settings)
    (ce + kd).backward()  # the forward's gradient, handed on
    z_ref = z0.clone().requires_grad_()
    ce_ref, kd_ref = _reference(z_ref, y, table, temperature, **settings)
    (0.3 * ce_ref + 0.7 * kd_ref).backward()
    torch.testing.assert_close(ce, 0.3 * ce_ref)
    torch.testing.assert_close(kd, 0.7 * kd_ref)
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_cross_entropy_and_kd_other_combinations_get_their_own_gradient():
    """Terms weighted apart after the call, and a second backward through the same graph: exact gradients."""
    table, y, z0 = _ce_and_kd_case()
    z = z0.clone().requires_grad_()
    ce, kd = _fused(z, y, table, 3.0, (2.0, 1.0))
    (0.15 * ce + 0.7 * kd).backward(retain_graph=True)
    first = z.grad.clone()
    (0.5 * (ce + kd)).backward()  # the forward's buffer was handed on: one more pass
    z_ref = z0.clone().requires_grad_()
    ce_ref, kd_ref = _reference(z_ref, y, table, 3.0)
    (0.3 * ce_ref + 0.7 * kd_ref).backward(retain_graph=True)
    torch.testing.assert_close(first, z_ref.grad)
    (ce_ref + 0.5 * kd_ref).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_cross_entropy_and_kd_gradient_is_the_stated_one():
    """dCE/dz = (s - onehot)/B, dKD/dz = T (|rho| softmax(z/T) - rho)/B; a sample without a target gets CE's only."""
    table, y, z0 = _ce_and_kd_case(num_classes=6, batch=5)
    t = 2.0

    def gradient(weights: tuple[float, float]) -> torch.Tensor:
        z = z0.clone().requires_grad_()
        (grad,) = torch.autograd.grad(sum(_fused(z, y, table, t, weights)), z)
        return grad

    g_ce, g_kd = gradient((1.0, 0.0)), gradient((0.0, 1.0))
    one_hot = torch.nn.functional.one_hot(y, 6).float()
    torch.testing.assert_close(g_ce, (z0.softmax(-1) - one_hot) / 5)
    rho = table[y]
    torch.testing.assert_close(g_kd, t * (rho.sum(-1, keepdim=True) * (z0 / t).softmax(-1) - rho) / 5)
    assert (g_kd[:2] == 0).all()  # class 4 has no target


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_and_kd_with_sparse_targets_equals_their_dense_rows(label_smoothing):
    """Targets given as (values, indices, rest): the same terms and gradient as the rows they stand for."""
    table, y, z0 = _ce_and_kd_case()
    values, indices = table.topk(4, dim=-1)
    rest = (1 - values.sum(-1)) / 26
    rest[4] = 0  # no target
    dense = expand_sparse_targets(values, indices, rest, 30)
    z = z0.clone().requires_grad_()
    v, i, r = values[y], indices[y], rest[y]
    ce, kd = cross_entropy_and_kd(
        z,
        y,
        (v, i, r),
        sparse_neg_entropy(v, r, 30),
        v.sum(-1) + 26 * r,
        KDSettings(3.0, label_smoothing=label_smoothing, ce_weight=0.8, kd_weight=0.2),
        chunk_elements=100,
    )
    (ce + kd).backward()
    z_ref = z0.clone().requires_grad_()
    ce_ref, kd_ref = _reference(z_ref, y, dense, 3.0, label_smoothing=label_smoothing)
    (0.8 * ce_ref + 0.2 * kd_ref).backward()
    torch.testing.assert_close(kd, 0.2 * kd_ref)
    torch.testing.assert_close(ce, 0.8 * ce_ref)
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_cross_entropy_and_kd_under_bf16_logits():
    table, y, z0 = _ce_and_kd_case()
    z = z0.bfloat16().requires_grad_()
    ce, kd = _fused(z, y, table, 3.0)
    (ce + kd).backward()
    assert ce.dtype == kd.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(kd, kd_kl_div(z.detach().float(), table[y], 3.0))
