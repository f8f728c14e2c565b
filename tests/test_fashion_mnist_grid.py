"""The Fashion-MNIST benchmark grid runs every method in one setting: the same data, optimizer and schedule."""

from __future__ import annotations

from pathlib import Path

import yaml

from kd_lightning.grid import Grid

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "fashion_mnist_benchmark.yaml"


def load(variant) -> dict:
    return yaml.safe_load((ROOT / variant.config).read_text())


def test_every_variant_shares_the_data_optimizer_and_schedule():
    grid = Grid.load(GRID)
    configs = {v.name: load(v) for v in grid.variants}
    base = configs["ce"]
    epochs = base["trainer"]["max_epochs"]
    for name, config in configs.items():
        data = dict(config["data"]["init_args"])
        assert data.pop("views", 1) == (2 if name in ("self_distill", "two_view_ce") else 1), name
        assert (config["data"]["class_path"], data) == (base["data"]["class_path"], base["data"]["init_args"]), name
        model = config["model"]["init_args"]
        assert model["optimizer"] == base["model"]["init_args"]["optimizer"], name
        assert "lr_scheduler" not in model and "schedule_epochs" not in model, name  # the default cosine
        assert model["backbone"] == ("resnet56" if name == "teacher" else "resnet20"), name
        trainer = dict(config["trainer"])
        callbacks = trainer.pop("callbacks", [])
        generations = [c["init_args"] for c in callbacks if c["class_path"] == "kd_lightning.GenerationalKD"]
        if generations:
            (gen,) = generations
            assert gen["epochs_per_generation"] == epochs and trainer["max_epochs"] == (gen["generations"] + 1) * epochs
        else:
            assert not callbacks and trainer["max_epochs"] == epochs, name
        assert trainer["check_val_every_n_epoch"] == base["trainer"]["check_val_every_n_epoch"], name
        if "num_stages" in model:
            assert epochs % model["num_stages"] == 0, name


def test_kd_students_of_every_seed_read_the_one_teacher():
    grid = Grid.load(GRID)
    assert grid.variant("teacher").seeds == (0,)
    teacher = load(grid.variant("teacher"))["model"]["init_args"]["backbone"]
    students = [v for v in grid.variants if load(v)["model"]["init_args"].get("teacher_backbone")]
    assert {v.name for v in students} == {"kd", "kd_pt", "kd_topk", "kd_store_r4"}
    for variant in students:
        assert load(variant)["model"]["init_args"]["teacher_backbone"] == teacher
        assert variant.needs == ("teacher",)
        assert variant.overrides[0] == "--model.init_args.teacher_checkpoint={root}/teacher/seed0/checkpoints/last.ckpt"
    assert grid.variant("kd_store_r4").overrides[1:] == (
        "--model.init_args.teacher_store={root}/stores/seed{seed}",
        "--model.init_args.store_draws=4",
        "--model.init_args.store_topk=10",
    )
