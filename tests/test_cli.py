"""The kd-lightning CLI, called in-process (importing Lightning costs seconds per process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: Every fit config (the experiment grids of ``configs/grids`` are tested by tests/test_sweep.py).
CONFIGS = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if "grids" not in c.relative_to(ROOT / "configs").parts)
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_progress_bar=false",
]


def test_there_are_configs():
    assert ROOT / "configs" / "quickstart.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: kd_lightning." in printed
    assert "optimizer:" in printed


def test_print_config_shows_real_optimizer_defaults(capsys):
    """A config that names no optimizer shows the default's real values (lr 0.1, Nesterov, wd 5e-4)."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "cifar10" / "baseline_resnet20.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    model = printed[printed.index("\nmodel:") : printed.index("\ndata:")]
    assert "class_path: kd_lightning.NesterovSGD" in model
    for line in ("lr: 0.1", "momentum: 0.9", "weight_decay: 0.0005", "nesterov: true"):
        assert line in model
    assert "\noptimizer:" not in printed  # no second, top-level optimizer that would silently win


def test_quickstart_fits_and_tests(tmp_path, capsys):
    cli = main(
        ["fit", "--config", QUICKSTART, *TINY_RUN, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    )
    assert cli.trainer.state.finished
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    printed = capsys.readouterr().out
    assert "final accuracies" in printed
    assert "test/acc1" in printed and "val/acc1" in printed


def test_backbones_subcommand_lists_registry(capsys):
    assert main(["backbones"]) is None
    names = capsys.readouterr().out.split()
    assert {"resnet20", "mlp", "wrn_28_10", "resnet50", "lstm_small", "awd_lstm"} <= set(names)


def test_malformed_yaml_value_is_reported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.init_args.num_classes=twenty"])
    assert exit_info.value.code != 0
    assert "num_classes" in capsys.readouterr().err


def test_unknown_backbone_lists_choices(tmp_path):
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet999'; registered backbones: .*resnet20"):
        main(
            [
                "fit",
                "--config",
                QUICKSTART,
                "--model.init_args.backbone=resnet999",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_mismatched_num_classes_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"model.num_classes=7 but the datamodule"):
        main(["fit", "--config", QUICKSTART, "--model.init_args.num_classes=7", *TINY_RUN,
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])  # fmt: skip
