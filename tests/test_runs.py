"""What a user meets on re-runs, resumes and mistakes, through the CLI as they run it (issue "trustworthy runs").

In-process (``kd_lightning.cli.main`` / ``console_main``, the console script's functions) except where the user
experience is the process itself (exit status, what a log file receives): those run ``kd-lightning`` in a subprocess.
The default logger is on (TensorBoard, as a ``make demo`` install has it) unless a test says otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer

from kd_lightning.callbacks.progress import EpochProgressBar
from kd_lightning.checkpoints import CheckpointError, read_checkpoint
from kd_lightning.cli import console_main, final_weights, main
from kd_lightning.errors import TRACEBACK_ENV, ConfigError
from kd_lightning.run_folder import RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
DUPS = str(CONFIGS / "synthetic" / "dups.yaml")
STUDENT = str(CONFIGS / "synthetic" / "kd_mlp16.yaml")
SMALL_DATA = ["--data.init_args.num_train=256", "--data.init_args.num_val=64", "--data.init_args.num_test=64"]
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    *SMALL_DATA,
]


def fit(config: str, root: Path, *extra: str):
    return main(["fit", "--config", config, *TINY, f"--trainer.default_root_dir={root}", *extra])


# 1. One run per folder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logger", [[], ["--trainer.logger=false"]], ids=["tensorboard", "no-logger"])
def test_a_second_fit_into_a_run_folder_is_refused_and_overwrite_replaces_the_run(tmp_path, logger):
    fit(QUICKSTART, tmp_path, *logger)
    first = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunFolderError, match=r"already holds a run.*\n.*--ckpt_path last.*\n.*--overwrite true"):
        fit(QUICKSTART, tmp_path, *logger, "--trainer.max_epochs=2")
    fit(QUICKSTART, tmp_path, *logger, "--trainer.max_epochs=2", "--overwrite=true")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 1  # run 2's, not run 1's
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["max_epochs"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 2
    assert len(sorted(p.name for p in tmp_path.iterdir())) == len(first)  # run 1's logs are gone, not kept beside
    assert not list(tmp_path.rglob("lightning_logs")) and not list(tmp_path.rglob("last-v*.ckpt"))


def test_resuming_keeps_the_folder_and_continues_its_run(tmp_path):
    fit(QUICKSTART, tmp_path)
    cli = fit(QUICKSTART, tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert cli.trainer.current_epoch == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    explicit = tmp_path / "checkpoints" / "last.ckpt"
    assert fit(QUICKSTART, tmp_path, "--trainer.max_epochs=3", f"--ckpt_path={explicit}").trainer.current_epoch == 3


def test_run_folder_claims(tmp_path):
    folder = RunFolder.of(tmp_path / "run", None)
    assert folder.claim(None, overwrite=False) == []  # nothing there yet
    folder.checkpoint_dir.mkdir(parents=True)
    (folder.checkpoint_dir / "last.ckpt").write_bytes(b"x")
    (folder.root / "config.yaml").write_text("a: 1\n")
    assert folder.claim("last", overwrite=False) == []
    assert folder.claim(str(folder.checkpoint_dir / "last.ckpt"), overwrite=False) == []
    with pytest.raises(RunFolderError, match=r"\(--ckpt_path .*other.ckpt is not one of its checkpoints\)"):
        folder.claim(str(tmp_path / "other.ckpt"), overwrite=False)
    assert len(folder.claim(None, overwrite=True)) == 2 and folder.existing_files() == []


def test_student_configs_read_the_last_checkpoint_of_a_teacher_config():
    """Every teacher path of a config is ``<a config's run folder>/checkpoints/last.ckpt`` (or a user's own file)."""
    paths = sorted(p for p in CONFIGS.rglob("*.yaml") if "grids" not in p.relative_to(CONFIGS).parts)
    configs = [yaml.safe_load(p.read_text()) for p in paths]
    folders = {c["trainer"]["default_root_dir"] for c in configs if (c.get("trainer") or {}).get("default_root_dir")}
    teachers = [c["model"]["init_args"].get("teacher_checkpoint") for c in configs]
    runs = [t for t in teachers if t and t.startswith("runs/")]
    assert len(runs) >= 15
    for path in runs:
        assert path.endswith("/checkpoints/last.ckpt") and path.removesuffix("/checkpoints/last.ckpt") in folders, path
    assert all(not (c.get("checkpoint") or {}).get("dirpath") for c in configs)  # follows default_root_dir


# 2. --ckpt_path never replaces the options given ----------------------------------------------------------------


def test_resuming_with_other_options_lists_them(tmp_path):
    stages = ["--trainer.max_epochs=3", "--model.init_args.num_stages=3"]
    fit(DUPS, tmp_path, *stages)
    with pytest.raises(ConfigError, match=r"model\.init_args\.num_stages: 2 given, 3 in the checkpoint"):
        fit(DUPS, tmp_path, "--trainer.max_epochs=2", "--model.init_args.num_stages=2", "--ckpt_path=last")
    with pytest.raises(ConfigError, match=r"optimizer\.init_args\.lr: 0\.01 given, 0\.003 in the checkpoint"):
        fit(DUPS, tmp_path, *stages, "--model.init_args.optimizer.init_args.lr=0.01", "--ckpt_path=last")
    with pytest.raises(ConfigError, match=r"model\.class_path: 'kd_lightning\.ClassifierModule' given"):
        fit(QUICKSTART, tmp_path, "--ckpt_path=last")
    with pytest.raises(ConfigError, match=r"Give the options the checkpoint was trained with \(its config: --config"):
        main(["test", "--config", QUICKSTART, *TINY, f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    assert fit(DUPS, tmp_path, *stages, "--ckpt_path=last").trainer.state.finished  # the same options: silent


def test_a_checkpoint_that_is_not_one_names_its_path(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(text))} \(17 bytes\) is not readable"):
        fit(QUICKSTART, tmp_path / "run", f"--ckpt_path={text}")


# 4. One message per mistake ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A finished quickstart run: a teacher of 10 classes for the synthetic students."""
    root = tmp_path_factory.mktemp("teacher")
    fit(QUICKSTART, root, "--trainer.logger=false")
    return root / "checkpoints" / "last.ckpt"


def broken_files(folder: Path, checkpoint: Path) -> dict[str, Path]:
    files = {"text": folder / "teacher.txt", "bytes": folder / "teacher.bin", "truncated": folder / "teacher.ckpt"}
    files["text"].write_text("weights: see the shared drive\n")
    files["bytes"].write_bytes(bytes(range(256)) * 8)
    files["truncated"].write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    return files


ERRORS = {
    "unknown backbone": (QUICKSTART, ["--model.init_args.backbone=resnet999"], r"model.init_args.backbone"),
    "temperature": (DUPS, ["--model.init_args.temperature=-1"], r"model.init_args.temperature \(now -1.0\)"),
    "batch size": (QUICKSTART, ["--data.init_args.batch_size=0"], r"data.init_args.batch_size \(now 0\)"),
    "strategy": (QUICKSTART, ["--trainer.strategy=ddpx"], r"trainer.strategy \(now 'ddpx'\)"),
    "no teacher": (STUDENT, ["--model.init_args.teacher_checkpoint=missing.ckpt"], r"no teacher checkpoint at"),
    "teacher classes": (STUDENT, ["--model.init_args.num_classes=5"], r"num_classes=10, but .* num_classes=5"),
    "text teacher": (STUDENT, ["text"], r"teacher.txt \(\d+ bytes\) is not readable by torch.load; expected"),
    "bytes teacher": (STUDENT, ["bytes"], r"teacher.bin \(2048 bytes\) is not readable by torch.load; expected"),
    "truncated teacher": (STUDENT, ["truncated"], r"teacher.ckpt \(\d+ bytes\) is not readable by torch.load"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_mistake_ends_in_its_message(case, tmp_path, teacher, capsys):
    config, extra, expected = ERRORS[case]
    files = broken_files(tmp_path, teacher)
    extra = [f"--model.init_args.teacher_checkpoint={files[e]}" if e in files else e for e in extra]
    if config == STUDENT and not any("teacher_checkpoint" in e for e in extra):
        extra.append(f"--model.init_args.teacher_checkpoint={teacher}")
    with pytest.raises(SystemExit) as exit_info:
        console_main(["fit", "--config", config, *TINY, f"--trainer.default_root_dir={tmp_path / 'run'}", *extra])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Namespace(" not in err and "Given value" not in err
    assert err.splitlines()[-1].startswith("  the option") or "error:" in err.splitlines()[-1]
    assert re.search(expected, "\n".join(err.splitlines()[-3:])), err


def test_the_traceback_on_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit):
        console_main(
            ["fit", "--config", DUPS, "--model.init_args.temperature=-1", f"--trainer.default_root_dir={tmp_path}"]
        )
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "temperature must be > 0, got -1.0" in err.splitlines()[-2]


def test_a_parse_error_is_its_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.init_args.num_classes=twenty"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Expected a <class 'int'>. Got value: twenty" in err
    assert "NoneType" not in err and "[--trainer.max_epochs" not in err and len(err.splitlines()) < 10


def test_the_process_prints_the_message_last_and_exits_1(tmp_path):
    """As a user's shell sees it: exit status 1 and the check's sentence as the last line."""
    command = [sys.executable, "-m", "kd_lightning.cli", "fit", "--config", DUPS, "--model.init_args.temperature=0"]
    environ = {**os.environ, TRACEBACK_ENV: ""}
    result = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == "kd-lightning fit: error: model (kd_lightning.DUPSModule): temperature must be > 0, got 0.0"
    assert "model.init_args.temperature (now 0.0)" in lines[-1] and len(lines) < 8, result.stderr


# 6. Help ---------------------------------------------------------------------------------------------------------


def test_help_lists_the_commands_of_kd_lightning(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "kd-lightning backbones" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["backbone"])
    assert exit_info.value.code == 2
    assert (
        "unknown command 'backbone'; the commands: fit, validate, test, predict, backbones" in capsys.readouterr().err
    )
    assert main(["backbones", "--help"]) is None
    assert "usage: kd-lightning backbones" in capsys.readouterr().out


# 9. What the user sees -----------------------------------------------------------------------------------------


def test_the_bar_counts_epochs_from_one():
    bar = EpochProgressBar()
    bar._trainer = type("T", (), {"max_epochs": 2})()
    assert bar._get_train_description(1).strip() == "Epoch 2/2"


def test_a_log_file_gets_one_line_per_epoch_and_no_noise(tmp_path):
    """``kd-lightning fit ... > log``: one line per epoch, what informs, nothing that does not."""
    command = [sys.executable, "-m", "kd_lightning.cli", "fit", "--config", QUICKSTART, *TINY]
    command += ["--trainer.max_epochs=2", "--data.init_args.batch_size=32"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    epochs = re.findall(r"^epoch (\d)/2  \d+\.\d s  train/loss \S+  val/acc1 \S+  val/acc5 \S+$", output, re.M)
    assert epochs == ["1", "2"], output
    for noise in ("GPU available", "TPU available", "Tip:", "FLOPs", "log_every_n_steps", "v_num", "Epoch 1/1"):
        assert noise not in output, noise
    assert "params: 72.2 K trainable" in output and "final accuracies" in output
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()  # the README's path
    assert (tmp_path / "runs" / "quickstart" / "summary.json").is_file()


@pytest.mark.parametrize("strategy", ["ddp_spawn", "auto"])
def test_test_ckpt_final_after_a_spawned_fit_is_the_last_checkpoint(tmp_path, strategy):
    """Under ``ddp_spawn`` only the weights come back from the workers (not a GenerationModule's finished
    generations): ``--test_ckpt final`` then tests the run's last checkpoint; otherwise the module as it is."""
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=2 if strategy == "ddp_spawn" else 1, logger=False)
    folder = RunFolder.of(tmp_path, None)
    expected = str(tmp_path / "checkpoints" / "last.ckpt") if strategy == "ddp_spawn" else None
    assert final_weights(trainer, folder) == expected
