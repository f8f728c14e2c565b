"""examples/custom_project run as a user runs it: a copy of the project in a temporary directory, subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT / "examples" / "custom_project"
BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The example project copied out of the repository, as a user's own directory."""
    copy = tmp_path / "my_project"
    shutil.copytree(PROJECT, copy, ignore=shutil.ignore_patterns("runs", "lightning_logs", "__pycache__"))
    return copy


def run(command: list[str], cwd: Path, **env: str) -> str:
    """Run ``command`` in ``cwd`` with the virtual environment's ``bin`` first on PATH; its output on success."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # kd_lightning: the installed package
    environ.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", **env)
    result = subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_project_files_are_there():
    names = {p.name for p in PROJECT.iterdir()}
    assert {"README.md", "config.yaml", "train.py", "calibrated_dups.py", "digits8x8.py"} <= names


def test_train_py_trains_from_python(project):
    """``python train.py --fast``: 2 DUPS stages of 1 epoch; a checkpoint, the hook's metrics, far above chance."""
    out = run([sys.executable, "train.py", "--fast", "--root-dir", "runs/fast", "--accelerator", "cpu"], project)
    assert "test/acc1" in out
    run_dir = project / "runs" / "fast"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["kd_lightning"]["class_path"] == "calibrated_dups.CalibratedDUPS"
    assert int(checkpoint["state_dict"]["targets_stage"]) == 1  # DUPS's class targets were made and used
    assert checkpoint["state_dict"]["class_targets.has_target"].all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc1"] > 0.5  # 10 classes: chance is 0.1
    assert {"val/confidence", "val/overconfidence", "test/confidence", "test/overconfidence"} <= set(metrics)
    assert 0.1 <= metrics["test/confidence"] <= 1.0


def test_config_trains_through_the_cli(project):
    """``PYTHONPATH=. kd-lightning fit --config config.yaml``: the CLI imports the user's classes by class path."""
    tiny = ["--trainer.max_epochs=2", "--model.init_args.num_stages=2", "--trainer.enable_progress_bar=false"]
    out = run(["kd-lightning", "fit", "--config", "config.yaml", *tiny], project, PYTHONPATH=".")
    assert "final accuracies" in out
    accuracy = next(line for line in out.splitlines() if "test/acc1" in line)
    assert float(accuracy.split("│")[2].strip().rstrip("%")) > 50.0
    checkpoint = torch.load(
        project / "runs" / "cli" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert checkpoint["hyper_parameters"]["backbone"] == "tiny_digits_cnn"
    assert int(checkpoint["state_dict"]["targets_stage"]) == 1
