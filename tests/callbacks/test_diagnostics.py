"""DistillDiagnostics: the pure statistics by hand, and both figures drawn, saved and logged after a tiny fit."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from kd_lightning import ClassifierModule, DistillDiagnostics, DistillModule
from kd_lightning.callbacks.diagnostics import class_correlation, spearman, superclass_contrast, superclass_order
from kd_lightning.data import SyntheticDataModule
from kd_lightning.models.registry import create_backbone
from tests.helpers import TINY_SYNTHETIC, fast_trainer, tiny_mlp_kwargs


def test_class_correlation_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    corr = class_correlation(probs)
    a, b = probs[:, 0] - probs[:, 0].mean(), probs[:, 2] - probs[:, 2].mean()
    assert corr[0, 2].item() == pytest.approx((a @ b / (a.norm() * b.norm())).item(), abs=1e-6)
    assert torch.allclose(corr.diagonal(), torch.ones(3))


def test_spearman_by_hand():
    a = torch.tensor([0.1, 0.4, 0.2, 0.9])
    assert spearman(a, a**3 + 100) == pytest.approx(1.0)  # monotone: rank correlation 1 whatever the outliers
    # ranks (0, 2, 1, 3) against (3, 2, 0, 1): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 14 / 60
    assert spearman(a, torch.tensor([5.0, 2.0, -1.0, 0.0])) == pytest.approx(1 - 6 * 14 / 60)


def test_superclass_order_and_contrast():
    superclass_map = torch.tensor([1, 0, 1, 0])
    assert superclass_order(superclass_map).tolist() == [1, 3, 0, 2]
    corr = torch.tensor([[1.0, -0.2, 0.8, 0.0], [-0.2, 1.0, 0.0, 0.6], [0.8, 0.0, 1.0, -0.4], [0.0, 0.6, -0.4, 1.0]])
    # within: pairs (0, 2) = 0.8 and (1, 3) = 0.6 -> 0.7; between: -0.2, 0, 0, -0.4 -> -0.15
    assert superclass_contrast(corr, superclass_map) == pytest.approx(0.85)


def test_draws_both_figures_after_fit(tmp_path, tiny_synthetic):
    torch.manual_seed(0)
    teacher = create_backbone("mlp", 6, in_features=TINY_SYNTHETIC["input_dim"], hidden=32)
    module = DistillModule(teacher=teacher, alpha=0.5, temperature=2.0, **tiny_mlp_kwargs())
    callback = DistillDiagnostics(temperatures=[1.0, 4.0], every_n_epochs=1, dirpath=str(tmp_path / "figs"))
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=CSVLogger(tmp_path))
    trainer.fit(module, datamodule=tiny_synthetic)
    names = sorted(p.name for p in (tmp_path / "figs").glob("*.png"))
    assert names == [
        f"{fig}_{tag}.png" for fig in ("gradient_rescaling", "teacher_correlation") for tag in ("epoch0", "final")
    ]
    assert (tmp_path / "figs" / names[0]).read_bytes()[:4] == b"\x89PNG"
    assert set(callback.stats) == {
        "diagnostics/superclass_contrast_T1",
        "diagnostics/superclass_contrast_T4",
        "diagnostics/rescaling_confidence_spearman",
    }
    assert -1.0 <= callback.stats["diagnostics/rescaling_confidence_spearman"] <= 1.0
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "diagnostics/rescaling_confidence_spearman" in logged
    module.train()
    callback.draw(trainer, module)
    assert module.training  # drawing puts the module back into the mode it was in


def test_a_teacher_run_draws_its_own_correlation_only(tmp_path, tiny_synthetic):
    callback = DistillDiagnostics(temperatures=[2.0], dirpath=str(tmp_path))
    trainer = fast_trainer(tmp_path, fast_dev_run=True, callbacks=[callback])
    trainer.fit(ClassifierModule(**tiny_mlp_kwargs()), datamodule=tiny_synthetic)
    assert [p.name for p in tmp_path.glob("*.png")] == ["teacher_correlation_final.png"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperatures": []}, "temperatures must be a non-empty list of values > 0"),
        ({"temperatures": [0.0]}, r"temperatures must be .*got \[0.0\]"),
        ({"every_n_epochs": -1}, "need every_n_epochs >= 0 and max_samples >= 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillDiagnostics(**kwargs)


def test_missing_matplotlib_fails_with_the_extra_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install 'kd-lightning\[figures\]'"):
        DistillDiagnostics()


def test_no_validation_data_warns(tmp_path):
    data = SyntheticDataModule(**{**TINY_SYNTHETIC, "num_val": 0})
    trainer = fast_trainer(tmp_path, fast_dev_run=True, callbacks=[DistillDiagnostics(dirpath=str(tmp_path))])
    with pytest.warns(UserWarning, match="DistillDiagnostics: no validation data to draw the figures from"):
        trainer.fit(ClassifierModule(**tiny_mlp_kwargs()), datamodule=data)
    assert not list(tmp_path.glob("*.png"))


def test_a_trainers_sharded_validation_loader_is_read_whole():
    """Without a datamodule the figures come from trainer.val_dataloaders, which carry Lightning's distributed
    sampler: rank 0 draws from every example, in order, as one process would."""
    x, y = torch.randn(9, TINY_SYNTHETIC["input_dim"]), torch.arange(9) % 6
    dataset = torch.utils.data.TensorDataset(x, y)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    trainer = SimpleNamespace(datamodule=None, val_dataloaders=torch.utils.data.DataLoader(dataset, 4, sampler=sampler))
    module = ClassifierModule(**tiny_mlp_kwargs())
    teacher_logits, _, labels = DistillDiagnostics(max_samples=100)._collect(trainer, module)
    assert torch.equal(labels, y)
    with torch.no_grad():
        torch.testing.assert_close(teacher_logits, module.eval()(x))
