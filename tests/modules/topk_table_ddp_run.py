"""Two gloo processes each fill a TopKClassTargetTable with half of the samples and finalize; each saves its table.

Run by tests/modules/test_topk_table.py as ``python tests/modules/topk_table_ddp_run.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.losses import KDSettings
from kd_lightning.modules.class_targets import TopKClassTargetTable
from kd_lightning.modules.distributed import RankGroup
from tests.modules.test_topk_table import fill, structured_logits


def worker(rank: int, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ["TOPK_PORT"]})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, labels = structured_logits(40, 2000)
    table = TopKClassTargetTable(40, KDSettings(2.0), k=5)
    table.ranks = RankGroup(rank, 2, _all_reduce_sum)
    fill(table, logits[rank::2], labels[rank::2])
    counts = table.finalize()
    assert int(counts.sum()) == 2000  # both halves counted on every rank
    torch.save({"values": table.values, "indices": table.indices}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["TOPK_PORT"] = str(s.getsockname()[1])
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
