"""SelfDistillModule: Eq. 5 against references, the one-pass / per-view equivalences, two-view data, a short fit."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar as tv_cifar
from lightning.pytorch.callbacks import Callback
from torch import nn

from kd_lightning import CIFARDataModule, DigitsDataModule, SelfDistillModule, load_module
from kd_lightning.data.digits import DIGITS_MEAN, DIGITS_STD
from kd_lightning.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from kd_lightning.models.registry import Backbone
from tests.helpers import fast_trainer

C = 5
MLP = {"backbone": "mlp", "num_classes": C, "backbone_kwargs": {"in_features": 6, "hidden": 8, "normalized": False}}


class ConvNoBN(Backbone):
    """A small CNN without BatchNorm that honours the backbone contract (stem, stages, head, classifier)."""

    def __init__(self, num_classes: int = C) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(6, num_classes)


def _module_without_bn(seed: int = 0, **kwargs) -> SelfDistillModule:
    module = SelfDistillModule(**{**MLP, **kwargs})
    torch.manual_seed(seed)
    module.backbone = ConvNoBN()
    return module


def _views(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randn(n, 3, 8, 8, generator=gen), torch.arange(n) % C


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Naive batch-mean KL(p || q) of two probability tables."""
    return (p * (p / q).log()).sum(-1).mean()


# ------------------------------------------------------------------------------------------------------- loss
def test_both_kl_terms_by_hand():
    """D_KL(p_b || p_a) + D_KL(p_a || p_b) at T = 2 on one sample, written out with math."""
    z_a, z_b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p_a = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([1, 0])
    p_b = [0.5, 0.5]
    kl_ba = sum(pb * math.log(pb / pa) for pa, pb in zip(p_a, p_b, strict=True))
    kl_ab = sum(pa * math.log(pa / pb) for pa, pb in zip(p_a, p_b, strict=True))
    module = SelfDistillModule(**MLP, temperature=2.0)
    assert module.mutual_kl(z_a, z_b).item() == pytest.approx(kl_ba + kl_ab, rel=1e-6)
    scaled = SelfDistillModule(**MLP, temperature=2.0, t2_scaling=True)
    assert scaled.mutual_kl(z_a, z_b).item() == pytest.approx(4.0 * (kl_ba + kl_ab), rel=1e-6)
    assert kl_ba != pytest.approx(kl_ab)  # the two directions differ: both are needed


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_gradient_is_the_papers(temperature):
    """After Eq. 3: dD/dz_a = p_a - p_b on view a, p_b - p_a on view b (per sample; / T at temperature T, / n)."""
    torch.manual_seed(0)
    n = 4
    z_a, z_b = torch.randn(n, C, requires_grad=True), torch.randn(n, C, requires_grad=True)
    SelfDistillModule(**MLP, temperature=temperature).mutual_kl(z_a, z_b).backward()
    p_a, p_b = (z_a.detach() / temperature).softmax(-1), (z_b.detach() / temperature).softmax(-1)
    torch.testing.assert_close(z_a.grad, (p_a - p_b) / (temperature * n))
    torch.testing.assert_close(z_b.grad, (p_b - p_a) / (temperature * n))


def test_attached_targets_follow_the_full_gradient():
    torch.manual_seed(1)
    z_a, z_b = torch.randn(3, C, requires_grad=True), torch.randn(3, C, requires_grad=True)
    SelfDistillModule(**MLP, temperature=2.0, detach_targets=False).mutual_kl(z_a, z_b).backward()
    a, b = z_a.detach().clone().requires_grad_(), z_b.detach().clone().requires_grad_()
    p_a, p_b = (a / 2.0).softmax(-1), (b / 2.0).softmax(-1)
    (_kl(p_b, p_a) + _kl(p_a, p_b)).backward()
    torch.testing.assert_close(z_a.grad, a.grad)
    torch.testing.assert_close(z_b.grad, b.grad)
    p_a, p_b = p_a.detach(), p_b.detach()
    assert not torch.allclose(z_a.grad, (p_a - p_b) / 6)  # differs from the detached gradient


def test_training_losses_are_eq5_against_a_two_pass_reference():
    """Eq. 5 term by term: each view through the backbone on its own, CE / KL / MMD written out naively."""
    module = _module_without_bn(temperature=3.0, kl_weight=0.7, mmd_weight=0.1)
    x_a, x_b, y = _views()
    losses = module.training_losses(((x_a, x_b), y))
    assert list(losses) == ["ce", "kl", "mmd"]
    net = module.backbone
    h_a, h_b = net.forward_features(x_a), net.forward_features(x_b)
    z_a, z_b = net(x_a), net(x_b)
    p_a, p_b = (z_a / 3.0).softmax(-1), (z_b / 3.0).softmax(-1)
    ce = -(z_a.log_softmax(-1)[range(6), y].mean() + z_b.log_softmax(-1)[range(6), y].mean())
    mmd = sum((h_a[:, d].mean() - h_b[:, d].mean()) ** 2 for d in range(h_a.shape[1]))
    torch.testing.assert_close(losses["ce"], ce)
    torch.testing.assert_close(losses["kl"], 0.7 * (_kl(p_b, p_a) + _kl(p_a, p_b)))
    torch.testing.assert_close(losses["mmd"], 0.1 * mmd)


def _loss_and_grads(module: SelfDistillModule, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    total = sum(module.training_losses(batch).values())
    total.backward()
    return total.detach(), [p.grad.clone() for p in module.parameters()]


def test_one_pass_equals_two_passes_without_batchnorm():
    x_a, x_b, y = _views()
    joint_loss, joint_grads = _loss_and_grads(_module_without_bn(), ((x_a, x_b), y))
    per_view_loss, per_view_grads = _loss_and_grads(_module_without_bn(batch_stats="per_view"), ((x_a, x_b), y))
    torch.testing.assert_close(joint_loss, per_view_loss)
    for joint, per_view in zip(joint_grads, per_view_grads, strict=True):
        torch.testing.assert_close(joint, per_view)


def test_batchnorm_statistics_joint_or_per_view():
    """With BatchNorm (training mode), per-view outputs of view a do not depend on view b; joint ones do."""
    gen = torch.Generator().manual_seed(0)
    x_a, x_b, other_b = (torch.randn(8, 6, generator=gen) for _ in range(3))
    for batch_stats, depends in (("per_view", False), ("joint", True)):
        torch.manual_seed(0)
        module = SelfDistillModule(**MLP, batch_stats=batch_stats).train()
        _, _, z_a, _ = module.two_view_outputs(x_a, x_b)
        _, _, z_a_other, _ = module.two_view_outputs(x_a, other_b)
        assert torch.allclose(z_a, z_a_other) is not depends, batch_stats
        if batch_stats == "per_view":
            torch.testing.assert_close(z_a, module.backbone(x_a))


def test_features_and_logits_follow_the_backbone_contract():
    module = SelfDistillModule(**MLP).eval()
    x = torch.randn(4, 6)
    features, logits = module.features_and_logits(x)
    torch.testing.assert_close(features, module.backbone.forward_features(x))
    torch.testing.assert_close(logits, module(x))


@pytest.mark.parametrize(
    ("terms", "names"),
    [("ce", ["ce"]), ("ce+mmd", ["ce", "mmd"]), ("ce+kl", ["ce", "kl"]), ("ce+kl+mmd", ["ce", "kl", "mmd"])],
)
def test_table6_ablations(terms, names):
    x_a, x_b, y = _views()
    full = _module_without_bn().training_losses(((x_a, x_b), y))
    losses = _module_without_bn(terms=terms).training_losses(((x_a, x_b), y))
    assert list(losses) == names
    for name in names:
        torch.testing.assert_close(losses[name], full[name])


def test_errors():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        SelfDistillModule(**MLP, temperature=0)
    with pytest.raises(ValueError, match="kl_weight must be >= 0, got -1"):
        SelfDistillModule(**MLP, kl_weight=-1)
    with pytest.raises(ValueError, match=r"mmd_weight must be >= 0, got -0\.1"):
        SelfDistillModule(**MLP, mmd_weight=-0.1)
    with pytest.raises(
        ValueError, match=r"unknown terms='kl'; choose one of \['ce', 'ce\+mmd', 'ce\+kl', 'ce\+kl\+mmd'\]"
    ):
        SelfDistillModule(**MLP, terms="kl")
    with pytest.raises(ValueError, match=r"unknown batch_stats='ghost'; choose one of \['joint', 'per_view'\]"):
        SelfDistillModule(**MLP, batch_stats="ghost")
    module = SelfDistillModule(**MLP)
    with pytest.raises(ValueError, match=r"trains on two-view batches \(\(x_a, x_b\), y\) but got a single view"):
        module.training_losses((torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))
    three = tuple(torch.randn(4, 6) for _ in range(3))
    with pytest.raises(ValueError, match="but got 3 views: set the datamodule's views=2"):
        module.training_losses((three, torch.zeros(4, dtype=torch.long)))


def test_single_view_datamodule_is_refused_at_setup(tmp_path):
    module = SelfDistillModule(backbone="resnet20", num_classes=10)
    trainer = fast_trainer(tmp_path, max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match=r"SelfDistillModule trains on views=\[2\] but the datamodule yields views=1"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))


# ------------------------------------------------------------------------------------------ two-view data
def _write_cifar10(root: Path, per_batch: int = 8) -> None:
    """Tiny CIFAR-10 in the official pickle format: 5 training batches and a test batch of random images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, entry: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))

    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        dump(name, {"batch_label": name, "data": data, "labels": ((np.arange(per_batch) + i) % 10).tolist()})
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())  # no md5
    _write_cifar10(tmp_path)
    return tmp_path


def _is_distortion_of(view: torch.Tensor, raw: torch.Tensor, mean, std, flips: bool, padding: int = 4) -> bool:
    """Whether the normalised ``view`` is a zero-padded random crop (and, with ``flips``, mirror) of ``raw`` uint8."""
    pixels = (view * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)) * 255
    padded = F.pad(raw.float(), (padding,) * 4)
    size = raw.shape[-1]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + size, dx : dx + size]
            if any(torch.allclose(pixels, c, atol=0.5) for c in ((crop, crop.flip(-1)) if flips else (crop,))):
                return True
    return False


def test_cifar_views_are_two_distortions_of_one_image_with_one_label(cifar10_dir):
    dm = CIFARDataModule(data_dir=str(cifar10_dir), val_size=0, batch_size=8, num_workers=0, views=2)
    dm.setup("fit")
    pool = dm.train_set.dataset
    differ = 0
    for i in range(8):
        (a, b), y = dm.train_set[i]
        index = dm.train_set.indices[i]
        raw = torch.from_numpy(pool.data[index]).permute(2, 0, 1)
        assert y == pool.targets[index]
        assert _is_distortion_of(a, raw, CIFAR10_MEAN, CIFAR10_STD, flips=True)
        assert _is_distortion_of(b, raw, CIFAR10_MEAN, CIFAR10_STD, flips=True)
        differ += not torch.equal(a, b)
    assert differ >= 6  # 162 distortions per image: two equal draws are rare
    (a, b), y = next(iter(dm.train_dataloader()))
    assert a.shape == b.shape == (8, 3, 32, 32) and y.shape == (8,) and not torch.equal(a, b)


def test_cifar_on_device_views(cifar10_dir):
    dm = CIFARDataModule(
        data_dir=str(cifar10_dir), val_size=0, batch_size=8, num_workers=0, views=2, augment_on_device=True
    )
    x, y = next(iter(dm.train_dataloader()))
    (a, b), labels = dm.device_transform((x, y), train=True)
    assert labels is y and not torch.equal(a, b)
    for i in range(8):
        assert _is_distortion_of(a[i], x[i], CIFAR10_MEAN, CIFAR10_STD, flips=True)
        assert _is_distortion_of(b[i], x[i], CIFAR10_MEAN, CIFAR10_STD, flips=True)


def test_digits_views_are_two_translations_of_one_image():
    dm = DigitsDataModule(batch_size=8, views=2)
    dm.setup("fit")
    pool = dm.train_set.dataset
    differ = 0
    for i in range(8):
        (a, b), y = dm.train_set[i]
        raw, label = pool[dm.train_set.indices[i]]
        assert y == label
        assert _is_distortion_of(a, raw, DIGITS_MEAN, DIGITS_STD, flips=False)
        assert _is_distortion_of(b, raw, DIGITS_MEAN, DIGITS_STD, flips=False)
        differ += not torch.equal(a, b)
    assert differ >= 5  # 81 translations (fewer distinct ones near blank borders)


# ---------------------------------------------------------------------------------------------------- fit
class _BatchRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch)


def test_short_fit_on_tiny_cifar(cifar10_dir, tmp_path):
    pl.seed_everything(0)
    dm = CIFARDataModule(data_dir=str(cifar10_dir), val_size=8, batch_size=8, num_workers=0, views=2)
    module = SelfDistillModule(backbone="resnet20", num_classes=10)
    before = [p.detach().clone() for p in module.parameters()]
    recorder = _BatchRecorder()
    trainer = fast_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[recorder])
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    for name in ("train/ce", "train/kl", "train/mmd", "train/loss", "val/acc1"):
        assert torch.isfinite(metrics[name]), name
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
    (a, b), y = recorder.batches[0]
    assert a.shape == b.shape == (8, 3, 32, 32) and y.shape == (8,) and not torch.equal(a, b)
    trainer.test(module, datamodule=dm, verbose=False)
    assert 0.0 <= trainer.callback_metrics["test/acc1"] <= 1.0
    trainer.save_checkpoint(tmp_path / "sd.ckpt")
    loaded = load_module(tmp_path / "sd.ckpt")
    assert isinstance(loaded, SelfDistillModule)
    assert (loaded.hparams.temperature, loaded.hparams.terms) == (3.0, "ce+kl+mmd")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), module.eval()(x))


def test_short_fit_with_on_device_views(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=8, augment_on_device=True, views=2, val_size=0)
    module = SelfDistillModule(backbone="resnet20", num_classes=10, batch_stats="per_view")
    recorder = _BatchRecorder()
    trainer = fast_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[recorder])
    trainer.fit(module, datamodule=dm)
    (a, b), y = recorder.batches[0]
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b) and y.shape == (8,)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_compile_compiles_the_features_path(monkeypatch):
    """``compile=True`` also compiles the features-and-logits path training uses (the backbone's __call__ is not it)."""
    calls = []

    def fake_compile(fn, *args, **kwargs):
        def compiled(*inputs, **kw):
            calls.append(getattr(fn, "__name__", ""))
            return fn(*inputs, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    module = SelfDistillModule(**MLP, compile=True)
    x_a, y = torch.randn(4, 6), torch.arange(4)
    module.training_losses(((x_a, x_a + 1), y))
    assert calls == ["features_and_logits"]
    module.eval_outputs(x_a)
    assert calls[1:] == ["_call_impl"]  # evaluation: ClassifierModule's compiled backbone


def test_benchmark_row_trains_from_plain_loaders(tmp_path):
    """The ``self_distill`` row: two-view batches from a plain loader (no datamodule, so no views check)."""
    from benchmarks.overhead import main

    rows = main(
        [
            "--methods",
            "ce,self_distill",
            "--backbone",
            "mlp",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
        ]
    )
    assert [r["method"] for r in rows] == ["ce", "self_distill"] and rows[1]["step_ms"] > 0


def test_detach_target_is_a_deprecated_name_of_detach_targets():
    with pytest.warns(FutureWarning, match="detach_target is deprecated: use detach_targets"):
        module = SelfDistillModule(**MLP, detach_target=False)
    assert module.hparams.detach_targets is False and "detach_target" not in module.hparams
