"""DUPS under DDP: 2 CPU processes (gloo) hold identical targets, equal to the 1-process ones when n is all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.modules.dups_ddp_run import DATA, build, trainer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("dups_ddp_run.py")


def _run_ddp(out: Path, num_peers: int | None) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, str(SCRIPT), str(out)] + ([] if num_peers is None else [str(num_peers)])
    result = subprocess.run(args, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_processes_hold_the_one_process_targets(tmp_path):
    ranks = _run_ddp(tmp_path, num_peers=None)
    assert torch.equal(ranks[0]["targets"], ranks[1]["targets"])
    assert ranks[0]["has_target"].all()
    # each rank counted its half of the data (the distributed sampler's shard), and the sums were reduced
    assert ranks[0]["local_counts"].sum() == ranks[1]["local_counts"].sum() == DATA["num_train"] // 2
    (tmp_path / "single").mkdir()
    module, data = build()
    trainer(tmp_path / "single", devices=1).fit(module, datamodule=data)
    assert torch.allclose(module.class_targets.targets, ranks[0]["targets"], atol=1e-6)
    # and both are the naive per-class means of the (fixed) model's softened outputs
    x, y = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=DATA["num_train"])))
    with torch.no_grad():
        probs = (module(x) / module.hparams.temperature).softmax(-1)
    naive = torch.stack([probs[y == c].mean(0) for c in range(DATA["num_classes"])])
    assert torch.allclose(ranks[0]["targets"], naive, atol=1e-6)
