"""The overhead benchmark runs end to end on a tiny setting and writes the documented JSON rows."""

import json

import pytest

from benchmarks.fused_loss import main as fused_loss_main
from benchmarks.overhead import main


def test_benchmark_rows(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["--methods", "ce,raw_loop,augment:batch,augment:per_image", "--backbone", "mlp", "--batch-size", "8"]
    main([*args, "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == ["ce", "raw_loop", "augment:batch", "augment:per_image"]
    for row in rows:
        assert {"method", "backbone", "batch_size", "step_ms", "ratio"} <= set(row)
        assert row["step_ms"] > 0 and row["batch_size"] == 8
    assert rows[0]["ratio"] == 1.0
    assert "ratio vs ce" in capsys.readouterr().out


def test_benchmark_rejects_unknown_method():
    with pytest.raises(SystemExit):
        main(["--methods", "ce,nope"])


def test_fused_loss_benchmark_rows(capsys):
    rows = fused_loss_main(["--rows", "30", "--hidden", "8", "--classes", "50", "--topk", "5", "--repeats", "2"])
    assert [r["row"] for r in rows] == ["ce", "fused_dense", "fused_topk"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms"] > 0 for r in rows)
    assert "fused_topk" in capsys.readouterr().out
