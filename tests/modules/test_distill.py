"""DistillModule and FrozenTeacher: the loss, the frozen teacher, checkpoints, resume and every error message."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning import ClassifierModule, DistillModule, FrozenTeacher, RNGStateCheckpoint, load_module
from kd_lightning.checkpoints import frozen_states
from kd_lightning.data import SyntheticDataModule
from kd_lightning.losses import kd_kl_div
from kd_lightning.models.registry import create_backbone
from kd_lightning.modules.teacher_cache import TeacherOutputCache
from kd_lightning.targets import TARGET_KINDS, TEACHER_FORWARD_KINDS, pt_target, rel_table, sim_table, topk_target
from tests.helpers import TINY_SYNTHETIC, CrashAt, fast_trainer

IN, C = TINY_SYNTHETIC["input_dim"], TINY_SYNTHETIC["num_classes"]
TEACHER_KWARGS = {"in_features": IN, "hidden": 32}
STUDENT = {"backbone": "mlp", "num_classes": C, "backbone_kwargs": {"in_features": IN, "hidden": 16}}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A Lightning checkpoint of a ClassifierModule teacher trained for one epoch on the tiny synthetic data."""
    root = tmp_path_factory.mktemp("teacher")
    pl.seed_everything(0)
    module = ClassifierModule(backbone="mlp", num_classes=C, backbone_kwargs=TEACHER_KWARGS)
    trainer = fast_trainer(root, max_epochs=1)
    trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC))
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _student(teacher_ckpt: str, **kwargs) -> DistillModule:
    return DistillModule(teacher_backbone="mlp", teacher_checkpoint=teacher_ckpt, **{**STUDENT, **kwargs})


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=gen), torch.randint(0, C, (n,), generator=gen)


def _teacher_state(module: DistillModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.teacher.state_dict().items()}


# ------------------------------------------------------------------------------------------------------- loss
def test_loss_is_eq2_with_t2(teacher_ckpt):
    module = _student(teacher_ckpt, alpha=0.7, temperature=3.0).eval()
    x, y = _batch()
    losses = module.training_losses((x, y))
    logits, teacher_logits = module(x), module.teacher.network(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    p_teacher = (teacher_logits / 3.0).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (logits / 3.0).log_softmax(-1))).sum(-1).mean()
    assert losses["ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    assert losses["kd"].item() == pytest.approx(0.7 * 9.0 * kl.item(), rel=1e-5)


def test_pt_loss_uses_the_teachers_ground_truth_mass(teacher_ckpt):
    module = _student(teacher_ckpt, target_kind="pt", alpha=0.5, temperature=2.0).eval()
    x, y = _batch()
    rho = pt_target((module.teacher.network(x) / 2.0).softmax(-1), y)
    expected = 0.5 * kd_kl_div(module(x), rho, 2.0)
    assert module.training_losses((x, y))["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_sim_table_is_built_once_from_the_teachers_classifier(teacher_ckpt):
    module = _student(teacher_ckpt, target_kind="sim", sim_power=2.0, sim_temperature=0.2)
    expected = sim_table(module.teacher.network.classifier.weight, 2.0, 0.2)
    assert torch.allclose(module.class_table, expected)
    assert "class_table" not in module.state_dict()


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_teacher_runs_only_for_kinds_that_need_it(teacher_ckpt, tiny_synthetic, kind):
    module = _student(teacher_ckpt, target_kind=kind, topk=2)
    if kind.endswith("rel"):
        module.class_table = rel_table(tiny_synthetic.superclass_map, 0.6, 0.3)
    calls = []
    module.teacher.network.register_forward_pre_hook(lambda *_: calls.append(1))
    losses = module.training_losses(_batch())
    assert len(calls) == (1 if kind in TEACHER_FORWARD_KINDS else 0)
    assert set(losses) == {"ce", "kd"} and torch.isfinite(losses["kd"])
    losses["kd"].backward()
    assert module.backbone.classifier.weight.grad is not None


def test_no_teacher_trains_with_cross_entropy_and_warns(tmp_path, tiny_synthetic):
    module = DistillModule(**STUDENT)
    with pytest.warns(UserWarning, match=r"has no teacher: it trains with cross-entropy only until set_teacher"):
        fast_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=tiny_synthetic)
    assert set(module.training_losses(_batch())) == {"ce"}
    module.set_teacher(create_backbone("mlp", C, **TEACHER_KWARGS))
    assert set(module.training_losses(_batch())) == {"ce", "kd"}
    assert module.teacher_from_python and "teacher" not in module.hparams


def test_rel_without_superclass_map_fails(tmp_path):
    class FlatSynthetic(SyntheticDataModule):
        superclass_map = None

    module = DistillModule(target_kind="rel", **STUDENT)
    with pytest.raises(ValueError, match=r"needs the datamodule's superclass_map .* but FlatSynthetic has none"):
        fast_trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=FlatSynthetic(**TINY_SYNTHETIC))


def test_rel_reads_the_superclass_map_at_setup(tmp_path, tiny_synthetic):
    module = DistillModule(target_kind="rel", rel_gt_mass=0.5, rel_superclass_mass=0.2, **STUDENT)
    fast_trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=tiny_synthetic)
    # 6 classes in 2 super-classes of 3: class 0's siblings are 1 and 2
    expected = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert torch.allclose(module.class_table[0], expected)


# ---------------------------------------------------------------------------------------------- frozen teacher
def test_teacher_never_changes_across_fit_and_validation(tmp_path, teacher_ckpt, tiny_synthetic):
    module = _student(teacher_ckpt)
    before = _teacher_state(module)
    assert any("running_mean" in k for k in before)
    trainer = fast_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=tiny_synthetic)
    assert trainer.global_step > 0
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not module.teacher.training and not any(m.training for m in module.teacher.modules())
    module.train()  # the guard: a module-wide train() leaves the teacher in eval mode
    assert not any(m.training for m in module.teacher.modules())
    teacher_params = {id(p) for p in module.teacher.parameters()}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not teacher_params & optimized


def test_teacher_is_out_of_the_module_tree_but_moves_with_it(teacher_ckpt):
    module = _student(teacher_ckpt)
    assert not any(k.startswith("teacher") for k in module.state_dict())
    assert all(not name.startswith("teacher") for name, _ in module.named_modules())
    module.to(torch.float64)
    assert module.teacher.network.classifier.weight.dtype == torch.float64


def test_frozen_teacher_forward_has_no_graph():
    teacher = FrozenTeacher(create_backbone("mlp", C, **TEACHER_KWARGS))
    out = teacher(torch.randn(4, IN))
    assert not out.requires_grad
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()  # the guard: a frozen teacher cannot be switched to training
    assert not any(m.training for m in teacher.modules())


def test_teacher_from_plain_state_dict(tmp_path):
    net = create_backbone("mlp", C, **TEACHER_KWARGS)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    teacher = FrozenTeacher.from_checkpoint("mlp", C, tmp_path / "plain.pt", TEACHER_KWARGS)
    for a, b in zip(net.state_dict().values(), teacher.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_wrong_teacher_checkpoint_fails_at_startup_naming_both(tmp_path, teacher_ckpt):
    with pytest.raises(ValueError, match=r"holds backbone 'mlp' with num_classes=6, but the teacher is configured as "):
        DistillModule(teacher_backbone="resnet20", teacher_checkpoint=teacher_ckpt, **STUDENT)
    with pytest.raises(ValueError, match=r"backbone 'mlp' with num_classes=6, .* as backbone 'mlp' with num_classes=4"):
        DistillModule(teacher_backbone="mlp", teacher_checkpoint=teacher_ckpt, **{**STUDENT, "num_classes": 4})
    torch.save(create_backbone("mlp", 4, **TEACHER_KWARGS).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"(?s)does not fit backbone 'mlp' with num_classes=6 .*size mismatch"):
        FrozenTeacher.from_checkpoint("mlp", C, tmp_path / "plain.pt", TEACHER_KWARGS)
    with pytest.raises(FileNotFoundError, match="no teacher checkpoint at"):
        FrozenTeacher.from_checkpoint("mlp", C, tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_kind": "kd_pt"}, r"unknown target kind 'kd_pt'; valid kinds: kd, ls"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"target_kind": "topk", "topk": 6}, r"topk must be in \[1, num_classes=6\)"),
        ({"pt_weight": -0.1}, r"pt_weight must be in \[0, 1\]"),
        ({"teacher_backbone": "mlp"}, "teacher_backbone and teacher_checkpoint go together"),
        (
            {"teacher": torch.nn.Linear(2, 2), "teacher_backbone": "mlp", "teacher_checkpoint": "x.ckpt"},
            "either as an nn.Module or as teacher_backbone",
        ),
        (
            {"target_kind": "sim", "teacher": create_backbone("mlp", 4, **TEACHER_KWARGS)},
            "the teacher's classifier has 4 classes but the student has num_classes=6",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillModule(**{**STUDENT, **kwargs})


# ----------------------------------------------------------------------------------------------- checkpoints
def test_student_checkpoint_leaves_the_teacher_out_and_reloads_from_hparams(tmp_path, teacher_ckpt, tiny_synthetic):
    module = _student(teacher_ckpt, target_kind="pt+sim", alpha=0.3)
    trainer = fast_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=tiny_synthetic)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert saved["hyper_parameters"]["teacher_checkpoint"] == teacher_ckpt
    loaded = load_module(tmp_path / "student.ckpt")
    assert type(loaded) is DistillModule and loaded.hparams.target_kind == "pt+sim" and loaded.hparams.alpha == 0.3
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.allclose(loaded.class_table, module.class_table)


def test_save_teacher_writes_its_weights(tmp_path, teacher_ckpt, tiny_synthetic):
    module = _student(teacher_ckpt, save_teacher=True)
    trainer = fast_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=tiny_synthetic)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    (teacher_state,) = frozen_states(saved, "teacher")
    assert teacher_state.keys() == module.teacher.network.state_dict().keys()
    # the saved weights replace those of the teacher given at load time
    fresh = create_backbone("mlp", C, **TEACHER_KWARGS)
    loaded = load_module(tmp_path / "student.ckpt", teacher=fresh, teacher_backbone=None, teacher_checkpoint=None)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(loaded.teacher.state_dict()[key], value), key


def test_a_checkpoint_of_the_earlier_layout_loads_its_saved_teacher(tmp_path, teacher_ckpt, tiny_synthetic):
    """Earlier versions saved the teacher as ``teacher.network.*`` keys of the state_dict and recorded a teacher
    object as a string in the hyperparameters: :func:`~kd_lightning.checkpoints.upgrade` reads both."""
    module = _student(teacher_ckpt, save_teacher=True)
    trainer = fast_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=tiny_synthetic)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    saved = torch.load(tmp_path / "student.ckpt", weights_only=False)
    (teacher_state,) = saved["kd_lightning"].pop("frozen")["teacher"]
    saved["state_dict"].update({f"teacher.network.{key}": value for key, value in teacher_state.items()})
    saved["hyper_parameters"].update(teacher="<nn.Module passed from Python>", teacher_backbone=None)
    saved["hyper_parameters"]["teacher_checkpoint"] = None
    torch.save(saved, tmp_path / "earlier.ckpt")
    with pytest.raises(ValueError, match=r"teacher passed as an nn.Module"):
        load_module(tmp_path / "earlier.ckpt")
    loaded = load_module(tmp_path / "earlier.ckpt", teacher=create_backbone("mlp", C, **TEACHER_KWARGS))
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(loaded.teacher.state_dict()[key], value), key


def test_teacher_object_must_be_passed_again_to_load(tmp_path, tiny_synthetic):
    net = create_backbone("mlp", C, **TEACHER_KWARGS)
    module = DistillModule(teacher=net, **STUDENT)
    trainer = fast_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=tiny_synthetic)
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    with pytest.raises(ValueError, match=r"teacher passed as an nn.Module.*load_module\(path, teacher=teacher_net\)"):
        load_module(tmp_path / "student.ckpt")
    loaded = load_module(tmp_path / "student.ckpt", teacher=net)
    assert loaded.teacher.network is net


def _run(root, teacher_ckpt, seed, ckpt_path=None, crash_at=None) -> DistillModule:
    pl.seed_everything(seed)
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True), RNGStateCheckpoint()]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    module = _student(teacher_ckpt, target_kind="topk", topk=2)
    trainer = fast_trainer(root, max_epochs=3, deterministic=True, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC), ckpt_path=ckpt_path)
    return module


def test_crash_and_resume_is_bit_identical(tmp_path, teacher_ckpt):
    reference = _run(tmp_path / "full", teacher_ckpt, seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crashed", teacher_ckpt, seed=0, crash_at=2)
    resumed = _run(tmp_path / "crashed", teacher_ckpt, seed=7, ckpt_path=tmp_path / "crashed" / "last.ckpt")
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ teacher cache
def test_teacher_cache_roundtrip_and_lookup():
    torch.manual_seed(0)
    x, probs = torch.randn(20, IN), torch.randn(20, C).softmax(-1)
    cache = TeacherOutputCache(k=C)
    for rows in (slice(0, 8), slice(8, 20)):
        cache.add(x[rows], *cache.encode(probs[rows]))
    cache.finalize()
    perm = torch.randperm(20)
    decoded = cache.decode(*cache.lookup(x[perm]), C)
    assert torch.allclose(decoded, probs[perm], atol=1e-3)  # float16
    topk = TeacherOutputCache(k=2)
    assert torch.allclose(topk.decode(*topk.encode(probs), C), topk_target(probs, 2), atol=1e-3)
    with pytest.raises(KeyError, match="not in the teacher cache: the training inputs must be the same every epoch"):
        cache.lookup(x[:2] + 1e-3)
    with pytest.raises(ValueError, match="keeps k >= 1 probabilities per input, got k=0"):
        TeacherOutputCache(k=0)


def test_teacher_cache_stores_a_repeated_input_harmlessly():
    """A distributed sampler's padding hands an input over twice: both copies are stored, either is found."""
    torch.manual_seed(0)
    x, probs = torch.randn(9, IN), torch.randn(9, C).softmax(-1)
    cache = TeacherOutputCache(k=C)
    cache.add(x, *cache.encode(probs))
    cache.add(x[:1], *cache.encode(probs[:1]))  # the padding: the epoch's first sample again
    cache.finalize()
    assert len(cache.keys) == 10
    assert torch.allclose(cache.decode(*cache.lookup(x), C), probs, atol=1e-3)


def test_teacher_cache_runs_the_teacher_in_the_first_epoch_only(tmp_path, teacher_ckpt, tiny_synthetic):
    with pytest.warns(FutureWarning, match="cache_teacher_topk is deprecated .* use DistillModule's teacher_store"):
        module = _student(teacher_ckpt, cache_teacher_topk=C)
    calls = []
    module.teacher.network.register_forward_pre_hook(lambda *_: calls.append(1))
    trainer = fast_trainer(tmp_path, max_epochs=3, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_synthetic)
    batches_per_epoch = TINY_SYNTHETIC["num_train"] // TINY_SYNTHETIC["batch_size"]
    assert trainer.global_step == 3 * batches_per_epoch and len(calls) == batches_per_epoch
    assert module.teacher_cache.ready and len(module.teacher_cache.keys) == TINY_SYNTHETIC["num_train"]
    # the cached target is the teacher's (float16)
    x, y = next(iter(tiny_synthetic.train_dataloader()))
    cached = module.teacher_targets(x, y)
    assert torch.allclose(cached, (module.teacher(x) / module.hparams.temperature).softmax(-1), atol=1e-3)
    assert "teacher_cache.keys" not in module.state_dict()
