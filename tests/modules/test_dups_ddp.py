"""DUPS under DDP: 2 CPU processes (gloo) hold identical targets, equal to the 1-process ones when n is all.

The training set has an odd number of samples, so the distributed sampler pads rank 1's shard with a repeat of a
sample rank 0 has: the statistics must count it once (:class:`~kd_lightning.modules.distributed.ShardPadding`).
This file is also the 2-process script (``python tests/modules/test_dups_ddp.py OUT_DIR``; Lightning's ``ddp``
launcher re-runs it for rank 1), which fits once per entry of :data:`PEERS` in the same processes; the module and the
trainer are those of ``dups_ddp_run.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning import DUPSModule
from kd_lightning.data import SyntheticDataModule
from tests.modules.dups_ddp_run import DATA, build, trainer

ROOT = Path(__file__).resolve().parents[2]
#: 191 samples: rank 0 gets 96, rank 1 95 and the repeat of one of rank 0's.
UNEVEN = {**DATA, "num_train": DATA["num_train"] - 1}
#: ``num_peers`` of the fits: every sample, and a quota above every class's size (the quota path, counting all).
PEERS = {"all": None, "quota": UNEVEN["num_train"]}


def build_uneven(num_peers: int | None) -> tuple[DUPSModule, SyntheticDataModule]:
    """The module of ``dups_ddp_run.build`` with the uneven training set."""
    module, _ = build(num_peers)
    return module, SyntheticDataModule(**UNEVEN)


@pytest.fixture(scope="module")
def ddp_tables(tmp_path_factory) -> dict[str, list[dict]]:
    """Each fit's saved state of rank 0 and rank 1 (one 2-process launch for all the fits)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=out, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: [torch.load(out / name / f"rank{r}.pt") for r in range(2)] for name in PEERS}


@pytest.mark.parametrize("name", list(PEERS))
def test_two_processes_hold_the_one_process_targets(tmp_path, ddp_tables, name):
    ranks = ddp_tables[name]
    assert torch.equal(ranks[0]["targets"], ranks[1]["targets"])
    assert ranks[0]["has_target"].all()
    # each rank counted its own samples of the distributed sampler's shard (96 and 95), not rank 1's padded repeat
    assert [int(rank["local_counts"].sum()) for rank in ranks] == [96, 95]
    module, data = build_uneven(PEERS[name])
    trainer(tmp_path, devices=1).fit(module, datamodule=data)
    torch.testing.assert_close(module.class_targets.targets, ranks[0]["targets"], atol=1e-6, rtol=0)
    # and both are the naive per-class means of the (fixed) model's softened outputs
    x, y = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=UNEVEN["num_train"])))
    with torch.no_grad():
        probs = (module(x) / module.hparams.temperature).softmax(-1)
    naive = torch.stack([probs[y == c].mean(0) for c in range(DATA["num_classes"])])
    torch.testing.assert_close(ranks[0]["targets"], naive, atol=1e-6, rtol=0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, num_peers in PEERS.items():
        (Path(sys.argv[1]) / name).mkdir(exist_ok=True)
        module, data = build_uneven(num_peers)
        trainer(Path(sys.argv[1]) / name, devices=2).fit(module, datamodule=data)
