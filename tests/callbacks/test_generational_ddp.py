"""GenerationalKD under DDP (2 CPU processes, gloo): the hand-over leaves the same weights on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("generational_ddp_run.py")


def test_hand_over_gives_every_rank_the_same_student(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["generation"] == 1 and r["training"] for r in ranks)
    for key, value in ranks[0]["student"].items():
        assert torch.equal(value, ranks[1]["student"][key]), key
        assert torch.equal(ranks[0]["teacher"][key], ranks[1]["teacher"][key]), key
    # the student really was re-initialised: its weights are not the teacher's
    weights = [k for k, v in ranks[0]["student"].items() if v.is_floating_point() and v.dim() == 2]
    assert all(not torch.equal(ranks[0]["student"][k], ranks[0]["teacher"][k]) for k in weights)
