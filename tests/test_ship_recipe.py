"""The recipe "from a pretrained teacher to a shipped student" (scripts/ship_a_student.py), in its smoke form."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_a_student.py"


@pytest.mark.slow
def test_the_recipe_ships_a_student(tmp_path):
    spec = importlib.util.spec_from_file_location("ship_a_student", SCRIPT)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    report = recipe.main(["--out", str(tmp_path), "--offline", "--smoke"])
    assert (tmp_path / "report.md").read_text().strip() == report
    for run in recipe.RUNS.values():
        assert run in report
    assert report.count("(shipped)") == 1 and "| 3.38M |" in report and "| 1.26M |" in report
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 250  # the digits' test images, one row each
    assert {row["prediction"] for row in rows} <= {str(digit) for digit in range(10)}
    assert (tmp_path / "best_student.onnx").is_file() and (tmp_path / "teacher.onnx").is_file()
