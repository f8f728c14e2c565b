"""The loss of a DUPS distillation step alone: ``losses.cross_entropy_and_kd`` against plain ``F.cross_entropy``.

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

from kd_lightning.losses import cross_entropy_and_kd, sparse_neg_entropy


def build_rows(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """The three timed functions, on one random batch, table and output layer."""
    gen = torch.Generator().manual_seed(0)
    n, c, k, t = args.rows, args.classes, args.topk, args.temperature
    table = torch.rand(c, c, generator=gen) ** 8
    table /= table.sum(1, keepdim=True)
    neg_entropy, mass = torch.xlogy(table, table).sum(1), table.sum(1)
    top_values, top_indices = table.topk(k, dim=1)
    rest = (1 - top_values.sum(1)) / (c - k)
    hidden = torch.randn(n, args.hidden, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(c, args.hidden, generator=gen)).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=gen)

    def ce() -> None:
        F.cross_entropy(hidden @ weight.t(), labels).backward()

    def dense_rows(part: slice) -> torch.Tensor:
        return table.index_select(0, labels[part])

    def fused_dense() -> None:
        stats = neg_entropy[labels], mass[labels]
        loss = cross_entropy_and_kd(hidden @ weight.t(), labels, dense_rows, *stats, t, **weights)
        sum(loss).backward()

    def fused_topk() -> None:
        values, indices, kept_rest = top_values[labels], top_indices[labels], rest[labels]
        stats = sparse_neg_entropy(values, kept_rest, c), values.sum(1) + (c - k) * kept_rest
        loss = cross_entropy_and_kd(hidden @ weight.t(), labels, (values, indices, kept_rest), *stats, t, **weights)
        sum(loss).backward()

    weights = {"ce_weight": 0.8, "kd_weight": 0.2}
    return {"ce": ce, "fused_dense": fused_dense, "fused_topk": fused_topk}


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
