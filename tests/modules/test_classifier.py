import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from kd_lightning import ClassifierModule, load_module
from kd_lightning.data import DigitsDataModule, SyntheticDataModule
from tests.helpers import TINY_SYNTHETIC, fast_trainer, tiny_mlp_kwargs


def test_ce_with_label_smoothing_matches_hand_computation():
    module = ClassifierModule(**tiny_mlp_kwargs(), label_smoothing=0.2)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, 0.0, 1.0]])
    y = torch.tensor([0])
    log_p = logits.log_softmax(-1)[0]
    eps, c = 0.2, 6
    expected = -((1 - eps) * log_p[0] + eps / c * log_p.sum())
    assert module.cross_entropy(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_losses_is_ce_of_forward():
    torch.manual_seed(0)
    module = ClassifierModule(**tiny_mlp_kwargs())
    x, y = torch.randn(8, TINY_SYNTHETIC["input_dim"]), torch.randint(0, 6, (8,))
    module.eval()
    losses = module.training_losses((x, y))
    assert set(losses) == {"ce"}
    assert torch.allclose(losses["ce"], F.cross_entropy(module(x), y))


def test_fit_logs_metrics_and_schedule(tmp_path, tiny_synthetic):
    module = ClassifierModule(**tiny_mlp_kwargs())
    trainer = fast_trainer(tmp_path, max_epochs=3)
    trainer.fit(module, datamodule=tiny_synthetic)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "val/acc1", "val/acc5", "val/loss"):
        assert key in metrics, key
    # cosine over max_epochs=3, stepped per epoch: after 3 steps the lr is back at eta_min = 0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    trainer.test(module, datamodule=tiny_synthetic, verbose=False)
    assert 0.0 <= trainer.callback_metrics["test/acc1"] <= 1.0


def test_learns_the_synthetic_task(tmp_path):
    pl.seed_everything(0)
    data = SyntheticDataModule(**{**TINY_SYNTHETIC, "num_train": 1024, "difficulty": 0})
    module = ClassifierModule(**tiny_mlp_kwargs(), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = fast_trainer(tmp_path, max_epochs=8)
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["val/acc1"] > 0.6  # chance is 1/6


def test_top5_is_clamped_to_num_classes(tmp_path):
    data = SyntheticDataModule(**{**TINY_SYNTHETIC, "num_classes": 3, "num_superclasses": 1})
    module = ClassifierModule(**{**tiny_mlp_kwargs(), "num_classes": 3})
    fast_trainer(tmp_path, fast_dev_run=True).validate(module, datamodule=data, verbose=False)
    assert "val/acc3" in module.trainer.callback_metrics


def test_num_classes_mismatch_fails_at_setup(tmp_path, tiny_synthetic):
    module = ClassifierModule(**{**tiny_mlp_kwargs(), "num_classes": 7})
    with pytest.raises(ValueError, match=r"model.num_classes=7 but the datamodule SyntheticDataModule has 6"):
        fast_trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=tiny_synthetic)


def test_two_view_data_fails_clearly(tmp_path):
    data = DigitsDataModule(views=2, batch_size=16)
    module = ClassifierModule(backbone="resnet20", num_classes=10)
    with pytest.raises(ValueError, match=r"ClassifierModule trains on views=\[1\] but the datamodule yields views=2"):
        fast_trainer(tmp_path, fast_dev_run=True).fit(module, datamodule=data)


def test_two_view_batch_fails_clearly():
    module = ClassifierModule(**tiny_mlp_kwargs())
    x = torch.randn(2, TINY_SYNTHETIC["input_dim"])
    with pytest.raises(ValueError, match="trains on single-view batches"):
        module.training_losses(((x, x), torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "resnet21"}, r"unknown backbone 'resnet21'; registered backbones: .*resnet20"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"schedule_epochs": 0}, "schedule_epochs must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassifierModule(**{**tiny_mlp_kwargs(), **kwargs})


def test_default_schedule_needs_max_epochs(tmp_path, tiny_synthetic):
    module = ClassifierModule(**tiny_mlp_kwargs())
    trainer = fast_trainer(tmp_path, max_epochs=-1, max_steps=2)
    with pytest.raises(ValueError, match=r"needs trainer\.max_epochs >= 1"):
        trainer.fit(module, datamodule=tiny_synthetic)


class WiderClassifier(ClassifierModule):
    """A user's subclass with an argument of its own."""

    def __init__(self, extra_weight: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extra_weight = extra_weight


def test_load_module_restores_the_subclass_and_its_arguments(tmp_path, tiny_synthetic):
    module = WiderClassifier(extra_weight=0.25, **tiny_mlp_kwargs())
    trainer = fast_trainer(tmp_path, fast_dev_run=True)
    trainer.fit(module, datamodule=tiny_synthetic)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_module(path)
    assert type(loaded) is WiderClassifier
    assert loaded.extra_weight == 0.25
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_load_module_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_module(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint written by a kd_lightning module"):
        load_module(tmp_path / "plain.ckpt")


def test_bf16_mixed_precision_code_path(tmp_path, tiny_synthetic):
    """Exercises the bf16 path (never benchmarked on CPU, where bf16 autocast is much slower)."""
    module = ClassifierModule(**tiny_mlp_kwargs())
    trainer = fast_trainer(tmp_path, fast_dev_run=True, precision="bf16-mixed")
    trainer.fit(module, datamodule=tiny_synthetic)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_predict_returns_probabilities(tmp_path, tiny_synthetic):
    module = ClassifierModule(**tiny_mlp_kwargs())
    probs = fast_trainer(tmp_path, fast_dev_run=True).predict(module, datamodule=tiny_synthetic)
    assert probs[0].shape == (TINY_SYNTHETIC["batch_size"], 6)
    assert torch.allclose(probs[0].sum(-1), torch.ones(TINY_SYNTHETIC["batch_size"]))
