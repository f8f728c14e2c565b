"""A 2-process generational run that saves each rank's student right after the hand-over (and the teacher).

Every rank seeds its global RNG differently before building the module, so a re-initialisation drawn from the
global RNG would differ across ranks; GenerationalKD's shared seed must give identical weights. Run by
tests/callbacks/test_generational_ddp.py as ``python tests/callbacks/generational_ddp_run.py OUT_DIR`` (gloo;
Lightning's ``ddp`` launcher re-runs this script for rank 1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning import GenerationalKD, GenerationModule
from kd_lightning.data import SyntheticDataModule

DATA = {"num_classes": 6, "num_superclasses": 2, "input_dim": 16, "num_train": 128, "num_val": 32, "batch_size": 16}


class SaveAfterHandOver(Callback):
    """At the first epoch of generation 1: the rank's student (and whether it is in train mode) and teacher."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        if trainer.current_epoch == 1:
            state = {
                "student": {k: v.clone() for k, v in pl_module.backbone.state_dict().items()},
                "teacher": {k: v.clone() for k, v in pl_module.teacher.network.state_dict().items()},
                "training": pl_module.backbone.training,
                "generation": pl_module.generation,
            }
            torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))  # a different global RNG on every rank
    module = GenerationModule(
        backbone="mlp", num_classes=6, backbone_kwargs={"in_features": 16, "hidden": 32}, patriarch_eta=0.3
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GenerationalKD(1, print_tables=False), SaveAfterHandOver(out)],
    )
    trainer.fit(module, datamodule=SyntheticDataModule(**DATA))
