"""The loss of a DUPS distillation step alone: ``fused.cross_entropy_and_kd`` against plain ``F.cross_entropy``.

Each row runs an output layer (``(N, H) @ (H, C)``), its loss and the backward through both, on the same random
batch: ``ce`` (``F.cross_entropy``, the language model's own loss), ``fused_dense`` (CE + KD against the rows of a
dense ``C x C`` table) and ``fused_topk`` (against a top-k table's stored entries). Rows are interleaved for
``--repeats`` rounds; a row's ``ms`` is its median and ``ratio`` divides it by the ``ce`` row's. The defaults are
the language-model benchmark's shapes (700 tokens, 200 hidden units, 10k words, T 6, top-100)::

    python benchmarks/fused_loss.py [--rows 700] [--hidden 200] [--classes 10000] [--topk 100] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd_lightning.losses import KDSettings
from kd_lightning.modules.class_targets import ClassTargetTable, TopKClassTargetTable


def build_rows(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """The three timed functions, on one random batch and output layer; the tables' own ``ce_and_kd_loss``."""
    gen = torch.Generator().manual_seed(0)
    n, c, t = args.rows, args.classes, args.temperature
    dense = ClassTargetTable(c, KDSettings(t, ce_weight=0.8, kd_weight=0.2))
    dense.targets.copy_(torch.rand(c, c, generator=gen) ** 8)
    dense.targets /= dense.targets.sum(1, keepdim=True)
    topk = TopKClassTargetTable(c, dense.settings, args.topk)
    kept = dense.targets.topk(args.topk, dim=1)
    topk.values.copy_(kept.values)
    topk.indices.copy_(kept.indices)
    topk.rest.copy_((1 - topk.values.sum(1)) / (c - args.topk))
    hidden = torch.randn(n, args.hidden, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(c, args.hidden, generator=gen)).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=gen)

    def ce() -> None:
        F.cross_entropy(hidden @ weight.t(), labels).backward()

    def fused(table: ClassTargetTable | TopKClassTargetTable) -> Callable[[], None]:
        def run() -> None:
            sum(table.ce_and_kd_loss(hidden @ weight.t(), labels)).backward()

        return run

    return {"ce": ce, "fused_dense": fused(dense), "fused_topk": fused(topk)}


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=700, help="tokens (rows of the logits)")
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10000)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    functions = build_rows(args)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["ce"][1:])
    rows: list[dict[str, float | str]] = []
    for name, samples in times.items():
        median = statistics.median(samples[1:])
        rows.append({"row": name, "ms": round(1000 * median, 2), "ratio": round(median / reference, 3)})
        print(f"{name:12s} {1000 * median:8.2f} ms  {median / reference:.3f}")
    return rows


if __name__ == "__main__":
    main()
