"""A teacher store under DDP: 2 CPU processes (gloo) each write their share of the store, then each reads the rows of
the samples the distributed sampler deals it.

This file is also the 2-process script (``python tests/modules/test_stored_teacher_ddp.py OUT_DIR``; Lightning's
``ddp`` launcher re-runs it for rank 1): it builds the store during ``fit``'s start and trains one epoch from it, and
each rank saves the rows it wrote and the rows it trained on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning import DistillModule
from kd_lightning.data import SyntheticDataModule
from kd_lightning.models.registry import create_backbone
from kd_lightning.teacher_store import StoreSpec, TeacherStore
from tests.helpers import fast_trainer

ROOT = Path(__file__).resolve().parents[2]
DATA = {"num_classes": 6, "num_superclasses": 2, "input_dim": 16, "num_train": 192, "num_val": 0, "batch_size": 16}
DRAWS = 2


def teacher() -> torch.nn.Module:
    """The same teacher on every rank (a seeded MLP, passed as a network)."""
    torch.manual_seed(0)
    return create_backbone("mlp", 6, in_features=16, hidden=32)


class SaveRows(Callback):
    """Saves the rows the rank wrote into the store and the rows it trained on."""

    def __init__(self, out: Path, written: list[torch.Tensor]) -> None:
        self.out, self.written, self.read = out, written, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.read.append(batch[2].cpu())

    def on_train_end(self, trainer, pl_module) -> None:
        rows = {"written": torch.cat(self.written), "read": torch.cat(self.read)}
        torch.save(rows, self.out / f"rank{trainer.global_rank}.pt")


def fit(out: Path) -> None:
    written: list[torch.Tensor] = []
    write = TeacherStore.write
    TeacherStore.write = lambda store, rows, *args: written.append(rows.cpu()) or write(store, rows, *args)
    pl.seed_everything(0)
    module = DistillModule(
        teacher=teacher(),
        teacher_store=str(out / "store"),
        store_draws=DRAWS,
        store_topk=6,
        backbone="mlp",
        num_classes=6,
        backbone_kwargs={"in_features": 16, "hidden": 16},
    )
    trainer = fast_trainer(out, devices=2, strategy="ddp", callbacks=[SaveRows(out, written)])
    trainer.fit(module, datamodule=SyntheticDataModule(**DATA))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp_store")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=out, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_each_rank_writes_its_share_and_the_store_is_the_teachers(ranks):
    out, saved = ranks
    samples = DATA["num_train"]
    for rank, rows in enumerate(saved):  # rank r wrote the R draws of the samples r, r + 2, ...
        assert sorted((rows["written"] // DRAWS).unique().tolist()) == list(range(rank, samples, 2))
    data = SyntheticDataModule(**DATA)
    data.setup("fit")
    x = torch.stack([data.train_set[i][0] for i in range(samples)])
    with torch.no_grad():
        probs = (teacher().eval()(x) / 4.0).softmax(-1)
    store = TeacherStore(out / "store")
    store.open(StoreSpec.from_dict(store.metadata()["spec"]))
    values, indices, _ = store.targets(torch.arange(samples * DRAWS))
    stored = torch.zeros(samples * DRAWS, 6).scatter(1, indices, values)
    torch.testing.assert_close(stored, probs.repeat_interleave(DRAWS, 0), atol=1e-3, rtol=0)


def test_each_rank_reads_the_samples_it_is_dealt(ranks):
    _, saved = ranks
    read = [rows["read"] for rows in saved]
    samples = torch.cat(read) // DRAWS
    assert len(read[0]) == len(read[1]) == DATA["num_train"] // 2
    assert sorted(samples.tolist()) == list(range(DATA["num_train"]))  # every sample once, on one rank


if __name__ == "__main__":
    torch.set_num_threads(1)
    fit(Path(sys.argv[1]))
