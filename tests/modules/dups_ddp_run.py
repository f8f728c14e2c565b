"""A DUPS run whose class targets can be compared across process counts; each rank saves its table.

The backbone's batch norms are removed and the learning rate is 0, so every sample's logits are the same in any
batch and any epoch: the targets then depend only on which samples are counted, and a 2-process run must give the
1-process targets. tests/modules/test_dups_ddp.py builds its 1- and 2-process runs from these pieces.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from kd_lightning import DUPSModule
from kd_lightning.data import SyntheticDataModule

DATA = {"num_classes": 6, "num_superclasses": 2, "input_dim": 16, "num_train": 192, "num_val": 0, "batch_size": 16}


def strip_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm in ``module`` by the identity, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_batchnorm(child)


def frozen_sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.0)


def build(num_peers: int | None = None) -> tuple[DUPSModule, SyntheticDataModule]:
    """The module (statistics in epoch 0, targets from epoch 1) and the data, seeded identically on every rank."""
    pl.seed_everything(0)
    module = DUPSModule(
        backbone="mlp",
        num_classes=6,
        backbone_kwargs={"in_features": 16, "hidden": 32},
        num_stages=2,
        peers_per_class=num_peers,
        optimizer=frozen_sgd,
    )
    strip_batchnorm(module.backbone)
    return module, SyntheticDataModule(**DATA)


class SaveTable(Callback):
    """Saves the rank's class targets and its own peer counts of the statistics epoch."""

    def __init__(self, out: Path) -> None:
        self.out, self.local_counts = out, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: DUPSModule) -> None:
        if trainer.current_epoch == 0:
            self.local_counts = pl_module.class_targets.counts.clone()

    def on_train_end(self, trainer: pl.Trainer, pl_module: DUPSModule) -> None:
        table = pl_module.class_targets
        state = {"targets": table.targets, "has_target": table.has_target, "local_counts": self.local_counts}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def trainer(out: Path, devices: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveTable(out)],
    )
