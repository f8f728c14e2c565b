"""Language-model DUPS under DDP (2 CPU processes, gloo): each rank reads its own contiguous slice of the stream
(no distributed sampler), and the top-k word table merged over the ranks is the one-process table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from kd_lightning.data.ptb import batchify
from tests.modules.lm_ddp_run import ROWS_PER_RANK, run

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("lm_ddp_run.py")


def _run(out: Path, devices: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"devices{devices}_rank{r}.pt") for r in range(devices)]


def test_ranks_read_contiguous_slices_and_share_the_one_process_table(tmp_path):
    ranks = _run(tmp_path, devices=2)
    rows = batchify(ranks[0]["stream"], 2 * ROWS_PER_RANK)
    for rank, saved in enumerate(ranks):
        expected = rows[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK, : saved["first_batch"].shape[1]]
        assert torch.equal(saved["first_batch"], expected)
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])
    run(tmp_path, devices=1)  # in this process: no second interpreter start
    single = torch.load(tmp_path / "devices1_rank0.pt")
    torch.testing.assert_close(ranks[0]["table"], single["table"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ranks[0]["table"].sum(-1), torch.ones(len(single["table"])))
