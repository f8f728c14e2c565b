"""Tiny data and fast trainers shared by the tests, so every test runs in seconds on 2 CPU cores."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

TINY_SYNTHETIC = {
    "num_classes": 6,
    "num_superclasses": 2,
    "input_dim": 16,
    "num_train": 192,
    "num_val": 64,
    "num_test": 64,
    "batch_size": 32,
}


def tiny_mlp_kwargs() -> dict[str, Any]:
    """ClassifierModule arguments of a small MLP matching :data:`TINY_SYNTHETIC`."""
    return {
        "backbone": "mlp",
        "num_classes": TINY_SYNTHETIC["num_classes"],
        "backbone_kwargs": {"in_features": TINY_SYNTHETIC["input_dim"], "hidden": 32},
    }


def fast_trainer(tmp_path, **overrides: Any) -> pl.Trainer:
    """A CPU trainer without logger, progress bar or model summary, writing under ``tmp_path``."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "enable_checkpointing": False,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class CrashAt(Callback):
    """Raises an ordinary exception at the start of ``epoch`` (a crash; KeyboardInterrupt would end pytest)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")
