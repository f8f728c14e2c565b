"""A language-model DUPS run under DDP (2 CPU processes, gloo); each rank saves its first batch and its word table.

With lr 0 and no dropout the logits of a token depend only on its row of the stream, so 2 ranks of ``B`` rows must
give the word table of 1 process of ``2B`` rows (the same rows). Run by tests/modules/test_language_model_ddp.py as
``python tests/modules/lm_ddp_run.py OUT_DIR DEVICES`` (Lightning's ``ddp`` launcher re-runs it for rank 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning import LanguageModelDUPSModule, PTBDataModule
from tests.data.ptb_fakes import WORDS, write_ptb

ROWS_PER_RANK = 3


def frozen_sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.0)


class Record(Callback):
    """Keeps the rank's first training batch and its word table once stage 1 has started."""

    def __init__(self) -> None:
        self.first_batch: torch.Tensor | None = None
        self.table: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].clone()
        if trainer.current_epoch == 1 and self.table is None:
            self.table = pl_module.class_targets.dense().clone()


def run(out: Path, devices: int) -> None:
    pl.seed_everything(0)
    data = PTBDataModule(str(write_ptb(out / "ptb")), batch_size=ROWS_PER_RANK * (2 // devices), bptt=5)
    module = LanguageModelDUPSModule(
        backbone="lstm_small",
        num_classes=len(WORDS) + 1,
        backbone_kwargs={"hidden_size": 8},
        num_stages=2,
        table_topk=4,
        optimizer=frozen_sgd,
    )
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=data)
    torch.save(
        {"first_batch": record.first_batch, "table": record.table, "stream": data.streams["train"]},
        out / f"devices{devices}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))
