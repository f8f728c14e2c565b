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


def test_teacher_store_rows(tmp_path):
    path = tmp_path / "bench.json"
    methods = "ce,kd,kd_cached,store_build,augment:replay_per_image"
    args = ["--methods", methods, "--backbone", "mlp", "--teacher", "mlp", "--batch-size", "8", "--num-classes", "10"]
    main([*args, "--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [r["method"] for r in rows] == methods.split(",") and all(r["step_ms"] > 0 for r in rows)


def test_language_model_store_row_reads_its_windows_rows():
    from benchmarks.overhead import LM_BPTT, LM_ROWS, METHODS, BenchConfig

    module, (x, y, rows) = METHODS["lm_kd_cached"](BenchConfig())
    module.stored_teacher = module._opened  # what its on_fit_start does
    assert rows.shape == x.shape == (LM_ROWS, LM_BPTT)
    assert set(module.training_losses((x, y, rows))) == {"ce", "kd"}


def test_benchmark_rejects_unknown_method():
    with pytest.raises(SystemExit):
        main(["--methods", "ce,nope"])


def test_fused_loss_benchmark_rows(capsys):
    rows = fused_loss_main(["--rows", "30", "--hidden", "8", "--classes", "50", "--topk", "5", "--repeats", "2"])
    assert [r["row"] for r in rows] == ["ce", "fused_dense", "fused_topk"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms"] > 0 for r in rows)
    assert "fused_topk" in capsys.readouterr().out
