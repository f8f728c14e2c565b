"""GenerationModule: Eq. 3 and Eq. 4 of Yang et al. against hand computations, the eta mapping, re-initialisation,
ensembles and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import GenerationModule, load_module
from kd_lightning.checkpoints import write_module_checkpoint
from kd_lightning.losses import score_difference
from kd_lightning.modules.generations import eta_from_confidence, generation_metric_prefix
from tests.helpers import TINY_SYNTHETIC, tiny_mlp_kwargs


def _module(**kwargs) -> GenerationModule:
    torch.manual_seed(0)
    return GenerationModule(**{**tiny_mlp_kwargs(), **kwargs})


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, TINY_SYNTHETIC["input_dim"], generator=generator)
    return x, torch.randint(0, TINY_SYNTHETIC["num_classes"], (n,), generator=generator)


# ---------------------------------------------------------------------------------------------- eta mapping
def test_eta_of_the_papers_settings():
    assert eta_from_confidence(0.6, 5) == pytest.approx(4 / 7)
    assert eta_from_confidence(1.0, 5) == 0.0
    assert eta_from_confidence(0.8, 3) == pytest.approx(2 / (2 + 2.4))


@pytest.mark.parametrize("confidence", [0.4, 0.6, 0.8])
def test_minimising_eq3_reaches_the_target_confidence(confidence):
    """Gradient descent on Eq. 3 over free logits (C = K = 5, label 0) ends with f_a1 at the mapped confidence."""
    k = 5
    eta = eta_from_confidence(confidence, k)
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    label = torch.tensor([0])
    optimizer = torch.optim.LBFGS([z], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (1 - eta) * F.cross_entropy(z, label) + eta * score_difference(z, k)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert z.softmax(-1)[0, 0].item() == pytest.approx(confidence, abs=1e-3)


@pytest.mark.parametrize(
    ("confidence", "k", "match"), [(0.1, 5, r"in \[1/K, 1\]"), (1.2, 5, r"in \[1/K, 1\]"), (0.6, 1, "K >= 2")]
)
def test_eta_rejects_bad_values(confidence, k, match):
    with pytest.raises(ValueError, match=match):
        eta_from_confidence(confidence, k)


# ------------------------------------------------------------------------------------------------- losses
def test_patriarch_loss_is_eq3_by_hand():
    module = _module(patriarch_confidence=0.6)
    x, y = _batch()
    losses = module.training_losses((x, y))
    probs = module(x).softmax(-1)
    eta = 4 / 7
    ce = -probs[torch.arange(len(y)), y].log().mean()
    sorted_probs = probs.sort(dim=-1, descending=True).values
    diff = (sorted_probs[:, 0] - sorted_probs[:, 1:5].sum(-1) / 4).mean()
    assert set(losses) == {"ce", "score_diff"}
    assert losses["ce"].item() == pytest.approx((1 - eta) * ce.item(), rel=1e-5)
    assert losses["score_diff"].item() == pytest.approx(eta * diff.item(), rel=1e-5)


def test_patriarch_without_tolerance_is_plain_cross_entropy():
    module = _module(patriarch_confidence=1.0)
    x, y = _batch()
    losses = module.training_losses((x, y))
    assert set(losses) == {"ce"}
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(module(x), y).item(), rel=1e-6)


def test_student_loss_is_eq4_by_hand():
    module = _module(alpha=0.7)
    x, y = _batch()
    module.start_next_generation(seed=5)
    teacher_probs = module.teacher(x).softmax(-1)  # generation 0, frozen, in eval mode
    losses = module.training_losses((x, y))
    student_log_probs = module(x).log_softmax(-1)
    ce = -student_log_probs[torch.arange(len(y)), y].mean()
    kl = (teacher_probs * (teacher_probs.log() - student_log_probs)).sum(-1).mean()
    assert set(losses) == {"ce", "kd"}
    assert losses["ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(0.7 * kl.item(), rel=1e-5)  # temperature 1, no T^2


@pytest.mark.parametrize(("confidence", "expected"), [(0.6, 0.6), (1.0, 1.0)])
def test_a_patriarch_trained_to_convergence_has_the_target_confidence(confidence, expected):
    """Eq. 3 through the module: fitting one batch drives the mean primary score to f_a1 (1 for plain CE)."""
    module = _module(patriarch_confidence=confidence, score_topk=TINY_SYNTHETIC["num_classes"])  # K = C: exact
    x, y = _batch(16)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        torch.stack(list(module.training_losses((x, y)).values())).sum().backward()
        optimizer.step()
    probs = module(x).softmax(-1)
    assert probs.amax(-1).mean().item() == pytest.approx(expected, abs=0.03)
    assert (probs.argmax(-1) == y).all()  # the primary class is the label once the batch is fitted


# --------------------------------------------------------------------------------------- re-initialisation
def test_start_next_generation_freezes_and_reinitialises():
    module = _module()
    module.backbone.train(False)
    old = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    rng = torch.get_rng_state()
    module.start_next_generation(seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    assert module.generation == 1 and module.teacher is module.finished[0]
    teacher_state = module.teacher.network.state_dict()
    assert all(torch.equal(teacher_state[k], v) for k, v in old.items())
    new = module.backbone.state_dict()
    floats = [k for k, v in old.items() if v.is_floating_point() and v.numel() > 1 and v.std() > 0]
    assert floats and all(not torch.equal(new[k], old[k]) for k in floats)
    fresh = module.fresh_backbone(seed=7).state_dict()
    assert all(torch.equal(new[k], fresh[k]) for k in new)  # exactly a fresh network of that seed
    assert module.backbone.training  # put back in train mode
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.backbone.parameters())


def test_reinitialisation_resets_batchnorm_statistics():
    module = _module()
    norms = [m for m in module.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    module.backbone.train()
    module(_batch(32)[0] * 5 + 3)
    assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    module.start_next_generation(seed=1)
    assert torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))
    assert int(norms[0].num_batches_tracked) == 0


# ------------------------------------------------------------------------------------------------ evaluation
def test_eval_outputs_and_ensemble():
    module = _module()
    x, _ = _batch()
    assert list(module.eval_outputs(x)) == ["main"]
    module.start_next_generation(seed=1)
    module.start_next_generation(seed=2)
    outputs = module.eval_outputs(x)
    assert list(outputs) == ["main", "ensemble"]
    with torch.no_grad():
        probs = [m(x).softmax(-1) for m in module.finished] + [module(x).softmax(-1)]
    mean = torch.stack(probs).mean(0)
    assert torch.allclose(outputs["ensemble"].exp(), mean, atol=1e-6)
    without = _module(ensemble_includes_patriarch=False)
    without.start_next_generation(seed=1)
    assert list(without.eval_outputs(x)) == ["main"]  # generation 1 alone: no ensemble yet
    without.start_next_generation(seed=2)
    with torch.no_grad():
        expected = torch.stack([without.finished[1](x).softmax(-1), without(x).softmax(-1)]).mean(0)
    assert torch.allclose(without.eval_outputs(x)["ensemble"].exp(), expected, atol=1e-6)


def test_confidence_is_the_mean_primary_score():
    module = _module()
    x, y = _batch()
    outputs = module.eval_outputs(x)
    extras = module.eval_extra_metrics(outputs, y)
    assert extras["confidence"].item() == pytest.approx(module(x).softmax(-1).max(-1).values.mean().item())
    assert module.eval_log_prefix("val") == "val/gen0/" and module.eval_log_prefix("test") == "test/"


# ----------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_every_generation(tmp_path):
    module = _module(patriarch_confidence=0.6)
    module.start_next_generation(seed=1)
    module.start_next_generation(seed=2)
    restored = load_module(write_module_checkpoint(tmp_path / "gen.ckpt", module))
    assert isinstance(restored, GenerationModule) and restored.generation == 2
    assert "teacher" not in restored.hparams  # no teacher option: the teachers are the generations
    x, _ = _batch()
    for a, b in zip(module.finished, restored.finished, strict=True):
        assert torch.equal(a(x), b(x))
    assert torch.equal(restored.eval_outputs(x)["ensemble"], module.eval_outputs(x)["ensemble"])


def test_a_checkpoint_of_the_earlier_layout_loads_every_generation(tmp_path):
    """Earlier versions saved the generations as ``kd_lightning.finished_generations`` and GenerationModule had
    teacher options (always None): :func:`~kd_lightning.checkpoints.upgrade` reads such a checkpoint."""
    module = _module(patriarch_confidence=0.6)
    module.start_next_generation(seed=1)
    path = write_module_checkpoint(tmp_path / "gen.ckpt", module)
    saved = torch.load(path, weights_only=False)
    saved["kd_lightning"]["finished_generations"] = saved["kd_lightning"].pop("frozen")["generations"]
    saved["hyper_parameters"].update(teacher=None, teacher_backbone=None, teacher_checkpoint=None, save_teacher=False)
    torch.save(saved, path)
    restored = load_module(path)
    x, _ = _batch()
    assert restored.generation == 1 and torch.equal(restored.teacher(x), module.teacher(x))


def test_no_teacher_option():
    with pytest.raises(TypeError, match="teacher"):
        GenerationModule(**tiny_mlp_kwargs(), teacher=torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patriarch_confidence": 0.6, "patriarch_eta": 0.5}, "not both"),
        ({"patriarch_eta": 1.0}, r"patriarch_eta must be in \[0, 1\)"),
        ({"patriarch_confidence": 0.05}, r"in \[1/K, 1\]"),
        ({"score_topk": 1}, "score_topk must be in"),
        ({"score_topk": 7}, "score_topk must be in"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationModule(**{**tiny_mlp_kwargs(), **kwargs})


def test_generation_metric_prefixes():
    """The names the module logs under and the GenerationalKD tables read, from one helper."""
    assert generation_metric_prefix("val", 2, 2) == "val/gen2/"
    assert generation_metric_prefix("val", 2, 2, ensemble=True) == "val/gen2/ensemble/"
    assert generation_metric_prefix("test", 2, 2) == "test/"
    assert generation_metric_prefix("test", 2, 2, ensemble=True) == "test/ensemble/"
    assert generation_metric_prefix("test", 1, 2) == "test/gen1/"
    assert generation_metric_prefix("test", 1, 2, ensemble=True) == "test/ensemble1/"
