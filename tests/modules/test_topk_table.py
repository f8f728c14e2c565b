"""TopKClassTargetTable: rows of the stored distribution, its KL against the dense one, the bounded statistics
against the dense table, peers, errors; under 2 processes (gloo) the ranks' statistics merge into one table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.losses import KDSettings, kd_kl_div
from kd_lightning.modules.class_targets import ClassTargetTable, TopKClassTargetTable

ROOT = Path(__file__).resolve().parents[2]


def structured_logits(num_classes: int, num_samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model whose predictions depend on the class (a class prototype plus noise), and labels."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = 3 * torch.randn(num_classes, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return prototypes[labels] + 0.5 * torch.randn(num_samples, num_classes, generator=generator), labels


def fill(table, logits: torch.Tensor, labels: torch.Tensor, batch: int = 16) -> None:
    for start in range(0, len(labels), batch):
        table.update(logits[start : start + batch], labels[start : start + batch])


def test_rows_sum_to_one_and_its_kl_is_the_dense_kl_of_the_same_distribution():
    torch.manual_seed(0)
    table = TopKClassTargetTable(12, KDSettings(2.0), k=3)
    fill(table, *structured_logits(12, 200))
    table.finalize()
    dense = table.dense()
    torch.testing.assert_close(dense.sum(-1), torch.ones(12))
    assert (dense >= 0).all() and table.has_target.all()
    logits, labels = torch.randn(40, 12), torch.randint(0, 12, (40,))
    for t2 in (True, False):
        expected = kd_kl_div(logits, dense[labels], 2.0, t2)
        table.settings = KDSettings(2.0, t2)
        ce, kd = table.ce_and_kd_loss(logits, labels)  # the fused path of DUPS's stages >= 1
        torch.testing.assert_close(kd, expected)
        torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, labels))


def test_bounded_statistics_keep_the_dense_tables_top_k():
    logits, labels = structured_logits(40, 2000)
    dense, topk = ClassTargetTable(40, KDSettings(2.0)), TopKClassTargetTable(40, KDSettings(2.0), k=5)
    fill(dense, logits, labels)
    fill(topk, logits, labels)
    assert topk.stat_values.shape == (40, 10)  # the working width m = 2k, whatever the number of samples
    dense.finalize()
    topk.finalize()
    best = dense.targets.topk(5, dim=-1)
    # the kept words are the dense table's top 5 (a near-tie at the 5th place may swap: compare the dense masses)
    assert (topk.indices == best.indices).float().mean() > 0.95
    torch.testing.assert_close(dense.targets.gather(1, topk.indices), best.values, atol=3e-3, rtol=0)
    # kept sums are lower bounds (a sample's mass outside its own top-m goes to the uniform rest)
    assert (topk.values <= best.values + 1e-6).all()
    torch.testing.assert_close(topk.values, best.values, atol=0.02, rtol=0.05)


def test_exact_when_the_working_width_covers_every_class():
    logits, labels = structured_logits(6, 300)
    dense, topk = ClassTargetTable(6, KDSettings(3.0)), TopKClassTargetTable(6, KDSettings(3.0), k=3)
    fill(dense, logits, labels)
    fill(topk, logits, labels)
    dense.finalize()
    topk.finalize()
    best = dense.targets.topk(3, dim=-1)
    torch.testing.assert_close(topk.values, best.values)
    rest = (1 - best.values.sum(-1)) / 3
    torch.testing.assert_close(topk.rest, rest)


def test_unseen_classes_give_no_kd_term_and_keep_their_previous_row():
    table = TopKClassTargetTable(5, KDSettings(1.0), k=2)
    table.update(torch.randn(4, 5), torch.tensor([0, 0, 1, 1]))
    counts = table.finalize()
    assert counts.tolist() == [2, 2, 0, 0, 0] and table.has_target.tolist() == [True, True, False, False, False]
    assert table.ce_and_kd_loss(torch.randn(3, 5), torch.tensor([2, 3, 4]))[1] == 0
    row = table.dense()[0].clone()
    table.update(torch.randn(2, 5), torch.tensor([1, 1]))
    table.finalize()
    torch.testing.assert_close(table.dense()[0], row)


def test_num_peers_quota_counts_as_the_dense_table():
    torch.manual_seed(0)
    table = TopKClassTargetTable(4, KDSettings(1.0), k=2, peers_per_class=3)
    fill(table, *structured_logits(4, 64), batch=8)
    assert table.counts.tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("num_peers", [None, 3])
def test_masked_samples_are_not_counted(num_peers):
    """A distributed sampler's padding (``mask`` False) adds nothing and takes no place in its class's quota."""
    logits, labels = structured_logits(6, 40)
    mask = torch.arange(40) < 33
    masked, subset = (TopKClassTargetTable(6, KDSettings(2.0), k=2, peers_per_class=num_peers) for _ in range(2))
    masked.update(logits, labels, mask=mask)
    subset.update(logits[:33], labels[:33])
    assert torch.equal(masked.counts, subset.counts)
    if num_peers is None:
        masked.finalize()
        subset.finalize()
        assert torch.equal(masked.values, subset.values) and torch.equal(masked.indices, subset.indices)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "1 <= k < num_classes=5"),
        ({"k": 5}, "1 <= k < num_classes=5"),
        ({"k": 2, "peers_per_class": 0}, ">= 1 or None"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKClassTargetTable(**{"num_classes": 5, "settings": KDSettings(1.0), **kwargs})


def test_two_processes_merge_their_statistics_into_the_one_process_table(tmp_path):
    script = Path(__file__).with_name("topk_table_ddp_run.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    logits, labels = structured_logits(40, 2000)
    single = TopKClassTargetTable(40, KDSettings(2.0), k=5)
    fill(single, logits, labels)
    single.finalize()
    for rank in ranks:
        assert torch.equal(rank["indices"], single.indices)
        torch.testing.assert_close(rank["values"], single.values, atol=1e-4, rtol=1e-3)
    assert torch.equal(ranks[0]["values"], ranks[1]["values"])
