"""OKDDip, DML, ONE, CL-ILR and Ind: losses against naive computations, gradients, ablations, export, errors."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
import torch.nn.functional as F

from kd_lightning import (
    ClassifierModule,
    CLILRModule,
    DMLModule,
    FrozenTeacher,
    OKDDipModule,
    ONEModule,
    StudentGroupModule,
    load_module,
)
from kd_lightning.data import SyntheticDataModule
from kd_lightning.metrics import peer_diversity
from kd_lightning.models.registry import create_backbone
from kd_lightning.modules.student_group import sigmoid_rampup
from tests.helpers import TINY_SYNTHETIC, fast_trainer

IN, C = TINY_SYNTHETIC["input_dim"], TINY_SYNTHETIC["num_classes"]
MLP = {"backbone": "mlp", "num_classes": C, "backbone_kwargs": {"in_features": IN, "hidden": 32}}
T = 3.0


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=gen), torch.randint(0, C, (n,), generator=gen)


def _make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(**{**MLP, **kwargs}).eval()  # eval: deterministic batch norm, so a second forward gives the same values


def _kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Naive T^2 * KL(target || softmax(logits / T)), batch mean."""
    log_p = (logits / T).log_softmax(-1)
    return T**2 * (target * (target.log() - log_p)).sum(-1).mean()


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(z, y) for z in logits)


# ------------------------------------------------------------------------------------------------- ramp-up
def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(80, 80) == sigmoid_rampup(300, 80) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


# -------------------------------------------------------------------------------------------------- OKDDip
@pytest.mark.parametrize("aggregate", ["logits", "probs"])
def test_okddip_loss_is_eq8(aggregate):
    module = _make(OKDDipModule, aggregate=aggregate)
    x, y = _batch()
    losses = module.training_losses((x, y))
    assert set(losses) == {"ce", "peer_kd", "leader_kd"}
    out = module.group(x)
    z, h = out.logits, out.features
    w = math.exp(-5)  # epoch 0 of an 80-epoch ramp-up
    assert losses["ce"].item() == pytest.approx(_ce_sum(z, y).item(), rel=1e-5)
    peer_kd = 0.0
    for i in range(3):  # peers 0..2; the leader is student 3
        for b in range(len(x)):
            energy = torch.stack([module.query(h[i, b]) @ module.key(h[j, b]) for j in range(3)])
            alpha = energy.softmax(0)
            if aggregate == "probs":
                target = sum(alpha[j] * (z[j, b] / T).softmax(-1) for j in range(3))
            else:
                target = (sum(alpha[j] * z[j, b] for j in range(3)) / T).softmax(-1)
            peer_kd = peer_kd + _kl(target[None], z[i, b][None]) / len(x)
    if aggregate == "probs":
        leader_target = sum((z[j] / T).softmax(-1) for j in range(3)) / 3
    else:
        leader_target = (sum(z[j] for j in range(3)) / 3 / T).softmax(-1)
    assert losses["peer_kd"].item() == pytest.approx(w * peer_kd.item(), rel=1e-4)
    assert losses["leader_kd"].item() == pytest.approx(w * _kl(leader_target, z[3]).item(), rel=1e-4)


def test_okddip_projections_are_shared_biasless_and_an_eighth_wide():
    module = _make(OKDDipModule)
    assert module.query.weight.shape == module.key.weight.shape == (4, 32)
    assert module.query.bias is None and module.key.bias is None


@pytest.mark.parametrize("detach", [False, True])
def test_projections_get_gradients_only_when_targets_are_not_detached(detach):
    module = _make(OKDDipModule, detach_targets=detach)
    x, y = _batch()
    losses = module.training_losses((x, y))
    losses["peer_kd"].backward()
    for projection in (module.query, module.key):
        if detach:
            assert not projection.weight.requires_grad and projection.weight.grad is None
        else:
            assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("detach", [False, True])
def test_leader_term_trains_the_peers_only_when_not_detached(detach):
    module = _make(OKDDipModule, detach_targets=detach)
    module.training_losses(_batch())["leader_kd"].backward()
    peer_grad = module.group.students[0].classifier.weight.grad
    leader_grad = module.group.students[3].classifier.weight.grad
    assert leader_grad.abs().sum() > 0
    assert (peer_grad.abs().sum() > 0) == (not detach)


def test_mean_random_and_symmetric_weights():
    features = torch.randn(3, 5, 32)
    mean = _make(OKDDipModule, aggregation="mean")
    assert torch.allclose(mean.peer_weights(features), torch.full((3, 3), 1 / 3))
    random = _make(OKDDipModule, aggregation="random")
    first, second = random.peer_weights(features), random.peer_weights(features)
    assert first.shape == (5, 3, 3) and torch.allclose(first.sum(-1), torch.ones(5, 3))
    assert not torch.equal(first, second)  # fresh weights at every step
    symmetric = _make(OKDDipModule, aggregation="symmetric")
    h = features.transpose(0, 1)
    assert torch.allclose(symmetric.peer_weights(features), (h @ h.transpose(1, 2)).softmax(-1))
    for module in (mean, random, symmetric):
        assert not hasattr(module, "query") and not hasattr(module, "key")


def test_self_aggregation_is_the_entropy():
    module = _make(OKDDipModule, aggregation="self")
    x, y = _batch()
    z = module.group(x).logits
    p = (z[:3] / T).softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean(-1).sum()
    assert module.training_losses((x, y))["peer_kd"].item() == pytest.approx(
        math.exp(-5) * T**2 * entropy.item(), rel=1e-5
    )


def test_without_leader_a_random_peer_is_recorded_and_used_for_inference():
    module = _make(OKDDipModule, leader=False)
    peer = module.hparams.inference_peer
    assert 0 <= peer < 4 and module.inference_index == peer
    names = module.eval_output_names()
    assert names[0] == f"peer{peer}" and "leader" not in names and len(names) == 5
    x, y = _batch()
    assert "leader_kd" not in module.training_losses((x, y))
    assert torch.allclose(module(x), module.group(x).logits[peer], atol=1e-6)
    assert _make(OKDDipModule, leader=False, inference_peer=2).inference_index == 2


def test_okddip_eval_outputs_and_metrics():
    module = _make(OKDDipModule)
    x, y = _batch(16)
    outputs = module.eval_outputs(x)
    assert list(outputs) == module.eval_output_names() == ["leader", "peer0", "peer1", "peer2", "ensemble"]
    z = module.group(x).logits
    assert torch.allclose(outputs["leader"], z[3], atol=1e-6) and torch.allclose(module(x), z[3], atol=1e-6)
    mean_probs = z[:3].softmax(-1).mean(0)  # the ensemble of the peers only
    assert torch.allclose(outputs["ensemble"].exp(), mean_probs, atol=1e-6)
    extras = module.eval_extra_metrics(outputs, y)
    assert extras["diversity"].item() == pytest.approx(peer_diversity(z[:3]).item(), rel=1e-5)
    accuracies = [(z[i].argmax(-1) == y).float().mean() for i in range(3)]
    assert extras["mean_acc1"].item() == pytest.approx(sum(accuracies).item() / 3, rel=1e-6)


def test_okddip_with_teacher(tmp_path):
    torch.manual_seed(1)
    teacher = create_backbone("mlp", C, in_features=IN, hidden=16)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    kwargs = {"teacher_backbone": "mlp", "teacher_checkpoint": str(path), "teacher_weight": 0.5}
    module = _make(OKDDipModule, **kwargs, teacher_backbone_kwargs={"in_features": IN, "hidden": 16})
    x, y = _batch()
    losses = module.training_losses((x, y))
    teacher.eval()
    rho = (teacher(x) / T).softmax(-1).detach()
    z = module.group(x).logits
    expected = 0.5 * sum(_kl(rho, z[i]) for i in range(4))
    assert losses["teacher_kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(key.startswith("teacher") or "_teacher" in key for key in module.state_dict())
    assert module.double().teacher.network.classifier.weight.dtype == torch.float64  # moved with the module


# ------------------------------------------------------------------------------------------------ baselines
def test_ind_is_the_sum_of_cross_entropies():
    module = _make(StudentGroupModule, num_students=3)
    x, y = _batch()
    assert module.training_losses((x, y))["ce"].item() == pytest.approx(_ce_sum(module.group(x).logits, y).item())
    assert module.eval_output_names() == ["student0", "student1", "student2", "ensemble"]


def test_dml_loss_by_hand():
    module = _make(DMLModule, num_students=3)
    assert module.group.trunk is None  # network-based by default
    x, y = _batch()
    losses = module.training_losses((x, y))
    z = module.group(x).logits
    expected = sum(_kl((z[j] / T).softmax(-1), z[i]) / 2 for i in range(3) for j in range(3) if i != j)
    assert losses["kd"].item() == pytest.approx(expected.item(), rel=1e-5)  # no ramp-up: weight 1


def test_clilr_loss_by_hand_and_trunk_gradient_divided_by_m():
    module = _make(CLILRModule, num_students=3)
    x, y = _batch()
    losses = module.training_losses((x, y))
    z = module.group(x).logits
    targets = [((sum(z) - z[i]) / 2 / T).softmax(-1) for i in range(3)]
    expected = math.exp(-5) * sum(_kl(targets[i], z[i]) for i in range(3))
    assert losses["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    sum(losses.values()).backward()
    scaled = [p.grad.clone() for p in module.group.trunk.parameters()]
    module.zero_grad()
    z = module.group(x).logits  # the same loss without rescaling
    targets = [((sum(z.detach()) - z[i].detach()) / 2 / T).softmax(-1) for i in range(3)]
    (_ce_sum(z, y) + math.exp(-5) * sum(_kl(targets[i], z[i]) for i in range(3))).backward()
    for grad, param in zip(scaled, module.group.trunk.parameters(), strict=True):
        assert torch.allclose(grad, param.grad / 3, atol=1e-6)


def test_one_loss_by_hand_and_what_trains_the_gate():
    module = _make(ONEModule, num_students=3)
    x, y = _batch()
    losses = module.training_losses((x, y))
    out = module.group(x)
    gate = module.gate(out.trunk).softmax(-1)  # the MLP trunk output is already (B, D)
    ensemble = sum(gate[:, i : i + 1] * out.logits[i] for i in range(3))
    assert losses["ce_ensemble"].item() == pytest.approx(F.cross_entropy(ensemble, y).item(), rel=1e-5)
    expected = math.exp(-5) * sum(_kl((ensemble / T).softmax(-1), out.logits[i]) for i in range(3))
    assert losses["kd"].item() == pytest.approx(expected.item(), rel=1e-5)
    losses["kd"].backward(retain_graph=True)  # the target is detached: the KL term does not reach the gate
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.gate.parameters())
    losses["ce_ensemble"].backward()
    assert module.gate[0].weight.grad.abs().sum() > 0
    assert module.eval_output_names()[-1] == "gated_ensemble"


# ------------------------------------------------------------------------------ DDP: no unused parameters
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (StudentGroupModule, {}),
        (DMLModule, {}),
        (CLILRModule, {}),
        (ONEModule, {}),
        (OKDDipModule, {}),
        (OKDDipModule, {"detach_targets": True}),
        (OKDDipModule, {"network_based": True, "aggregate": "probs"}),
        (OKDDipModule, {"aggregation": "self"}),
        (OKDDipModule, {"aggregation": "random", "leader": False}),
        (OKDDipModule, {"aggregation": "symmetric"}),
        (OKDDipModule, {"aggregation": "mean", "detach_targets": True}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(f"{k}={w}" for k, w in v.items()) or "default",
)
def test_every_trainable_parameter_gets_a_gradient(cls, kwargs):
    """What DDP (find_unused_parameters=False) needs: no trainable parameter left without a gradient."""
    module = _make(cls, **kwargs).train()
    losses = module.training_losses(_batch())
    torch.stack(list(losses.values())).sum().backward()
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert not hasattr(module, "backbone")  # ClassifierModule's single network is not kept


# ------------------------------------------------------------------------------------ training and export
def test_fit_logs_every_output_and_exports_the_leader(tmp_path):
    torch.manual_seed(0)
    module = OKDDipModule(**MLP)
    trainer = fast_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC))
    logged = trainer.callback_metrics
    for key in ("val/acc1", "val/peer0/acc1", "val/ensemble/acc1", "val/diversity", "val/mean_acc1", "train/peer_kd"):
        assert key in logged
    path = module.save_backbone_checkpoint(tmp_path / "leader.ckpt")
    leader = load_module(path).eval()
    assert type(leader) is ClassifierModule
    module.eval()
    x, _ = _batch()
    assert torch.allclose(leader(x), module(x), atol=1e-6)
    teacher = FrozenTeacher.from_checkpoint("mlp", C, path)
    assert torch.allclose(teacher(x), module(x), atol=1e-6)
    full = tmp_path / "full.ckpt"
    trainer.save_checkpoint(full)
    restored = load_module(full).eval()
    assert type(restored) is OKDDipModule and torch.allclose(restored(x), module(x), atol=1e-6)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (StudentGroupModule, {"num_students": 1}, r"num_students must be >= 2, got 1"),
        (StudentGroupModule, {"network_based": True, "shared_stages": 1}, r"network-based group shares nothing"),
        (StudentGroupModule, {"shared_stages": 2}, r"shared_stages must be in \[0, 1\] for backbone 'mlp'"),
        (DMLModule, {"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        (DMLModule, {"rampup_epochs": -1.0}, r"rampup_epochs must be >= 0, got -1.0"),
        (OKDDipModule, {"aggregation": "max"}, r"unknown aggregation 'max'; choose among \['attention', 'mean'"),
        (OKDDipModule, {"aggregate": "features"}, r"aggregate must be 'probs' or 'logits', got 'features'"),
        (OKDDipModule, {"aggregation": "self", "detach_targets": True}, r"aggregation='self' with detach_targets"),
        (OKDDipModule, {"num_students": 2}, r"num_students must be >= 3 with a leader, got 2"),
        (OKDDipModule, {"num_students": 1, "leader": False}, r"num_students must be >= 2, got 1"),
        (OKDDipModule, {"inference_peer": 0}, r"inference_peer is for leader=False"),
        (OKDDipModule, {"leader": False, "inference_peer": 4}, r"inference_peer must be in \[0, 3\], got 4"),
        (OKDDipModule, {"teacher_backbone": "mlp"}, r"teacher_backbone and teacher_checkpoint go together"),
        (OKDDipModule, {"teacher_weight": -1.0}, r"teacher_weight must be >= 0, got -1.0"),
    ],
)
def test_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**{**MLP, **kwargs})


def test_one_needs_a_trunk():
    with pytest.raises(ValueError, match=r"ONE is branch-based only: its gate reads the shared trunk"):
        ONEModule(**MLP, network_based=True)


def test_one_has_no_network_based_option_and_ignores_a_false_one_with_a_warning():
    assert "network_based" not in _make(ONEModule).hparams
    with pytest.warns(FutureWarning, match=r"ONEModule has no network_based option any more"):
        module = _make(ONEModule, network_based=False)  # as in checkpoints and configs of earlier versions
    assert module.group.trunk is not None and "network_based" not in module.hparams


def test_a_one_checkpoint_of_an_earlier_version_loads(tmp_path):
    """Earlier versions recorded ``kd_lightning.modules.okddip.ONEModule`` and ``network_based=False``."""
    module = _make(ONEModule, num_students=3)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {**module.hparams, "network_based": False},
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["kd_lightning"]["class_path"] = "kd_lightning.modules.okddip.ONEModule"
    torch.save(checkpoint, tmp_path / "one.ckpt")
    with pytest.warns(FutureWarning):
        loaded = load_module(tmp_path / "one.ckpt").eval()
    x, _ = _batch()
    assert type(loaded) is ONEModule and torch.allclose(loaded(x), module(x), atol=1e-6)


@pytest.mark.parametrize("name", ["StudentGroupModule", "DMLModule", "ONEModule", "CLILRModule", "sigmoid_rampup"])
def test_moved_names_are_still_found_in_okddip_with_a_warning(name):
    """The class paths recorded by earlier checkpoints and configs (``kd_lightning.modules.okddip.DMLModule`` ...)."""
    from kd_lightning.modules import group_baselines, okddip, student_group

    with pytest.warns(FutureWarning, match=rf"kd_lightning\.modules\.okddip\.{name} moved to kd_lightning\.modules\."):
        moved = getattr(okddip, name)
    assert moved is getattr(student_group, name, None) or moved is getattr(group_baselines, name)
    with pytest.raises(AttributeError, match=r"module 'kd_lightning.modules.okddip' has no attribute 'Nothing'"):
        okddip.Nothing  # noqa: B018


def test_benchmark_rows_build_the_groups_they_compare():
    from benchmarks.overhead import METHODS, BenchConfig, time_lightning

    cfg = BenchConfig(backbone="mlp", batch_size=8, num_classes=C, steps=1, warmup=1)
    for name, cls, trunk in (
        ("okddip_branch", OKDDipModule, True),
        ("ind_branch", StudentGroupModule, True),
        ("okddip_net", OKDDipModule, False),
        ("ind_net", StudentGroupModule, False),
    ):
        module, (x, _) = METHODS[name](cfg)
        assert type(module) is cls and module.num_students == 4 and (module.group.trunk is not None) == trunk
        assert x.shape == (8, *module.group.input_shape)
    assert time_lightning(METHODS["okddip_branch"], cfg) > 0
