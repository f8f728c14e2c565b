"""The overhead benchmark runs end to end on a tiny setting and writes the documented JSON rows."""

import json

import pytest

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
