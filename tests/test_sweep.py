"""``kd-lightning sweep`` and ``kd-lightning report``: grids run for real (local processes; the SLURM path through
submitit's DebugExecutor), resumed, skipped, reported; every grid file under ``configs/grids`` names existing
configs."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning import sweep
from kd_lightning.cli import main
from kd_lightning.grid import Grid, GridError, Outcome, Run, Variant
from kd_lightning.report import ReportSpec, cells, markdown, read_curve, unit_scale, validation_curves
from kd_lightning.run_folder import SUMMARY_FILE
from kd_lightning.sweep import run_grid
from tests.helpers import TINY_SYNTHETIC

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted((ROOT / "configs" / "grids").glob("*.yaml"))
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
#: The quickstart MLP on the tiny synthetic data, 2 epochs of 2 batches: seconds per run.
TINY = [
    *(f"--data.init_args.{key}={value}" for key, value in TINY_SYNTHETIC.items()),
    f"--model.init_args.num_classes={TINY_SYNTHETIC['num_classes']}",
    f"--model.init_args.backbone_kwargs={{in_features: {TINY_SYNTHETIC['input_dim']}, hidden: 32}}",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.enable_model_summary=false",
]
CE = {"name": "ce", "config": QUICKSTART, "overrides": TINY, "paper": 50.0}
LS = {"name": "ls", "label": "LS", "config": QUICKSTART, "overrides": [*TINY, "--model.init_args.label_smoothing=0.1"]}
BROKEN = {"name": "broken", "config": QUICKSTART, "overrides": [*TINY, "--model.init_args.num_classes=six"]}
CRASH = '--trainer.callbacks=[{"class_path": "tests.helpers.CrashAt", "init_args": {"epoch": 1}}]'


def write_grid(path: Path, *variants: dict, seeds=(1, 2), **spec) -> Path:
    content = {"name": "tiny", "root": "runs/tiny", "seeds": list(seeds), "metrics": ["test/acc1"], **spec}
    path.write_text(yaml.safe_dump({**content, "variants": list(variants)}, sort_keys=False))
    return path


@contextlib.contextmanager
def threads_of_a_run(jobs: int) -> Iterator[None]:
    """This process computes with the threads a sweep's run gets (bit-identical results need the same count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def records(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {f"{r['variant']}/seed{r['seed']}": r for r in lines}


# 1. Grid files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_grid_file_parses_and_names_existing_configs(path):
    grid = Grid.load(path)
    missing = [v.config for v in grid.variants if not (ROOT / v.config).is_file()]
    assert not missing, f"{path.name} names configs that do not exist: {missing}"
    malformed = [o for v in grid.variants for o in v.overrides if not re.fullmatch(r"--[\w.]+=\S+", o)]
    assert not malformed, f"{path.name}: overrides are --option=value, one word each: {malformed}"
    assert all(set(v.paper) <= set(grid.metrics) for v in grid.variants), "a paper number of a metric not reported"
    assert grid.root.parent == Path("runs", "sweeps") and grid.root.name in {g.stem for g in GRIDS}
    assert all(metric.startswith("test/") for metric in grid.metrics)


FASHION_GRIDS = ("fashion_mnist_benchmark", "teacher_store_fashion_mnist")


def test_grids_sharing_a_root_run_the_same_runs_under_the_same_names():
    by_root: dict[Path, dict[str, Variant]] = {}
    for path in GRIDS:
        grid = Grid.load(path)
        for variant in grid.variants:
            shared = by_root.setdefault(grid.root, {}).setdefault(variant.name, variant)
            same = (shared.config, shared.overrides, shared.seeds, shared.needs)
            assert same == (variant.config, variant.overrides, variant.seeds, variant.needs), (path.name, variant.name)
    benchmark, store = (Grid.load(ROOT / "configs" / "grids" / f"{name}.yaml") for name in FASHION_GRIDS)
    assert store.root == benchmark.root and {v.name for v in store.variants} <= {v.name for v in benchmark.variants}


def test_the_seed_tables_have_grid_files():
    names = {path.stem for path in GRIDS}
    papers = ("ptb_table5", "dups_table1", "tang_table3", "generations_table1", "okddip_table1", "self_distill_table1")
    assert all(any(name.startswith(paper) for name in names) for paper in papers), names


def test_ptb_table5_is_the_running_experiment():
    grid = Grid.load(ROOT / "configs" / "grids" / "ptb_table5.yaml")
    assert [v.name for v in grid.variants] == ["sgd", "ls", "dups", "dups_topk"]
    assert grid.seeds == (1, 2) and grid.metrics == ("test/ppl",) and grid.baseline == "sgd"
    assert {v.name: v.paper.get("test/ppl") for v in grid.variants} == {
        "sgd": 129.7,
        "ls": 129.1,
        "dups": 125.4,
        "dups_topk": None,
    }
    assert Run(grid, grid.variant("dups"), 1).folder == Path("runs/sweeps/ptb_table5/dups/seed1")


BAD_GRIDS = [
    ({"name": "g", "seeds": [1], "metrics": ["test/acc1"]}, r"missing key\(s\) variants"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [], "bogus": 1}, r"unknown key\(s\) bogus; the keys:"),
    ({"name": "g", "seeds": ["one"], "metrics": ["m"], "variants": [CE]}, r"seeds must be a non-empty list of integ"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [CE, CE]}, r"two variants are called 'ce'"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [CE], "baseline": "x"}, r"baseline 'x' is not a var"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "needs": ["ls"]}, LS]}, r"needs ls, which is"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "name": "a/b"}]}, r"must be a plain folder"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "paper": "high"}]}, r"paper must be a number"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "conf": 1}]}, r"variant ce: unknown key\(s\)"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "baseline": "y"}]}, r"variant ce: baseline 'y'"),
    ({"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "seeds": [2]}]}, r"ce: seeds \[2\] are not all"),
    (
        {"name": "g", "seeds": [1], "metrics": ["m"], "variants": [{**CE, "seeds": []}]},
        r"ce: seeds must be a non-empty",
    ),
    (
        {
            "name": "g",
            "seeds": [1, 2, 3],
            "metrics": ["m"],
            "variants": [{**CE, "seeds": [1, 2]}, {**LS, "needs": ["ce"]}],
        },
        r"variant ls: needs ce, which runs at seeds \[1, 2\] only",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_GRIDS, ids=[m.split("(")[0][:24] for _, m in BAD_GRIDS])
def test_a_wrong_grid_names_the_mistake(spec, message):
    with pytest.raises(GridError, match=message):
        Grid.from_dict(spec)


def test_no_grid_file_and_no_results_file_are_errors(tmp_path):
    with pytest.raises(GridError, match=r"no grid file .*nothing\.yaml"):
        Grid.load(tmp_path / "nothing.yaml")
    with pytest.raises(GridError, match=r"no results file .*none\.jsonl \(kd-lightning sweep writes it"):
        main(["report", str(tmp_path / "none.jsonl")])


# 2. Runs and their commands ----------------------------------------------------------------------------------------


def test_a_run_resumes_an_interrupted_start_and_replaces_one_without_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = {**CE, "name": "teacher"}
    student = {**LS, "needs": ["teacher"], "overrides": ["--teacher={root}/teacher/seed{seed}/checkpoints/last.ckpt"]}
    grid = Grid.load(write_grid(tmp_path / "grid.yaml", teacher, student, seeds=[3]))
    run = Run(grid, grid.variant("ls"), 3)
    command = run.command(["--extra=1"])
    assert command[1:5] == ["-m", "kd_lightning", "fit", "--config"]
    assert command[6:] == [
        "--teacher=runs/tiny/teacher/seed3/checkpoints/last.ckpt",
        "--extra=1",
        *("--seed_everything", "3", "--trainer.default_root_dir", "runs/tiny/ls/seed3"),
        *("--test_after_fit", "true", "--trainer.enable_progress_bar", "false"),
    ]
    assert run.start_command() == run.command()  # a new run
    (run.folder / "checkpoints").mkdir(parents=True)
    (run.folder / "config.yaml").write_text("a: 1\n")
    assert run.start_command()[-2:] == ["--overwrite", "true"]  # died before its first checkpoint
    (run.folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert run.interrupted and run.start_command()[-2:] == ["--ckpt_path", "last"]
    (run.folder / SUMMARY_FILE).write_text("{}")
    assert run.finished and not run.interrupted
    assert [r.name for r in run.needed] == ["teacher/seed3"]


def test_needs_wait_for_the_same_seed_and_a_failure_stops_only_its_dependants(tmp_path, monkeypatch, capsys):
    """The scheduling, with a launcher that 'runs' a run by writing its summary (the teacher of seed 2 fails)."""
    monkeypatch.chdir(tmp_path)
    teacher, student = {**CE, "name": "teacher"}, {**LS, "name": "student", "needs": ["teacher"]}
    grid = Grid.load(write_grid(tmp_path / "grid.yaml", teacher, student, {**CE, "name": "alone"}))
    started: list[str] = []

    def launch(batch):
        futures = []
        for run, _ in batch:
            assert all(needed.finished for needed in run.needed), f"{run.name} started before what it needs"
            started.append(run.name)
            fails = run.name == "teacher/seed2"
            if not fails:
                run.folder.mkdir(parents=True)
                (run.folder / SUMMARY_FILE).write_text(json.dumps({"metrics": {"test/acc1": 0.5}}))
            future: Future = Future()
            future.set_result(Outcome(1 if fails else 0, 0.1, 10.0))
            futures.append(future)
        return futures

    failed = run_grid(grid, launch, capacity=2, results=tmp_path / "results.jsonl")
    assert sorted(run.name for run in failed) == ["student/seed2", "teacher/seed2"]
    assert started.index("student/seed1") > started.index("teacher/seed1")
    assert "student/seed2" not in started and {"alone/seed1", "alone/seed2"} <= set(started)
    out = capsys.readouterr().out
    assert "FAILED teacher/seed2" in out and "exit status 1" in out
    assert "not started student/seed2: it needs teacher/seed2, not finished" in out
    assert set(records(tmp_path / "results.jsonl")) == {"teacher/seed1", "student/seed1", "alone/seed1", "alone/seed2"}


def test_a_variant_of_one_seed_is_needed_by_every_seed(tmp_path, monkeypatch):
    """One teacher (seed 0) for the students of every seed: it runs once, and each student waits for that run."""
    monkeypatch.chdir(tmp_path)
    teacher = {**CE, "name": "teacher", "seeds": [0]}
    student = {**LS, "needs": ["teacher"], "overrides": ["--teacher={root}/teacher/seed0/checkpoints/last.ckpt"]}
    grid = Grid.load(write_grid(tmp_path / "grid.yaml", teacher, student, CE, seeds=[0, 1, 2]))
    assert [run.name for run in grid.runs()] == [
        *("teacher/seed0", "ls/seed0", "ce/seed0", "ls/seed1", "ce/seed1", "ls/seed2", "ce/seed2"),
    ]
    assert [run.name for run in grid.runs(["teacher", "ce"])] == ["teacher/seed0", "ce/seed0", "ce/seed1", "ce/seed2"]
    # the order given (a long run first), some seeds only; a seed or variant the grid lacks is named
    assert [run.name for run in grid.runs(["ce", "ls", "ce"], seeds=[2, 0])] == [
        *("ce/seed2", "ls/seed2", "ce/seed0", "ls/seed0"),
    ]
    assert [run.name for run in grid.runs(seeds=[1])] == ["ls/seed1", "ce/seed1"]
    with pytest.raises(GridError, match=r"no seed 3, 4; the seeds: 0, 1, 2"):
        grid.runs(seeds=[3, 1, 4])
    assert [r.name for seed in (0, 1, 2) for r in Run(grid, grid.variant("ls"), seed).needed] == ["teacher/seed0"] * 3
    both = Grid.from_dict(
        {"name": "g", "seeds": [1, 2], "metrics": ["m"], "variants": [{**CE, "seeds": [1, 2]}, {**LS, "needs": ["ce"]}]}
    )
    assert [r.name for r in Run(both, both.variant("ls"), 2).needed] == ["ce/seed2"]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(tmp_path / "grid.yaml", CE, LS)
    monkeypatch.setattr(sweep, "execute", None)  # nothing may start
    assert main(["sweep", str(grid), "--dry-run", "--", "--trainer.max_epochs=3"]) is None
    lines = capsys.readouterr().out.splitlines()
    names = ["ce/seed1", "ls/seed1", "ce/seed2", "ls/seed2"]
    assert [line.split()[:2] for line in lines] == [[name, "new"] for name in names]
    assert all("--trainer.max_epochs=3 --seed_everything" in line for line in lines)
    assert main(["sweep", str(grid), "--dry-run", "--variants", "ls", "ce", "--seeds", "2"]) is None
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["ls/seed2", "ce/seed2"]
    assert not (tmp_path / "runs").exists()


def test_provenance_is_the_commit_of_the_working_directory(monkeypatch):
    monkeypatch.chdir(ROOT)
    provenance = sweep._provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]) and isinstance(provenance["dirty"], bool)


# 3. Sweeps for real ------------------------------------------------------------------------------------------------


def test_local_sweep_runs_resumes_and_skips(tmp_path, monkeypatch, capsys):
    """2 variants x 2 seeds, 2 processes at a time; ls/seed2 crashed after its first epoch and is resumed to the
    uninterrupted run's numbers; a second sweep starts nothing (and rebuilds a lost results file from the runs'
    summaries); the report reads the curves. (A failing run: the next test.)"""
    monkeypatch.chdir(tmp_path)
    grid = Grid.load(write_grid(tmp_path / "grid.yaml", CE, LS, baseline="ce"))
    crashed = Run(grid, grid.variant("ls"), 2)
    args = crashed.command()[3:]  # after `python -m kd_lightning`
    with threads_of_a_run(jobs=2):
        main([*args, "--trainer.default_root_dir=uninterrupted"])
        with pytest.raises(RuntimeError, match="simulated crash"):
            main([*args, CRASH])
    assert crashed.interrupted
    capsys.readouterr()

    assert main(["sweep", str(grid.path), "--jobs", "2"]) is None
    out = capsys.readouterr().out
    assert "started ls/seed2 (resumes its last.ckpt)" in out
    assert re.search(r"finished ce/seed1 in \d+:\d\d:\d\d \(\d/4\): test/acc1 0\.\d+", out)
    done = records(grid.results_file)
    assert set(done) == {"ce/seed1", "ls/seed1", "ce/seed2", "ls/seed2"}
    for record in done.values():
        assert record["epochs"] == 2 and record["wall_s"] > 0 and record["peak_rss_mb"] > 50 and not record["rebuilt"]
        assert record["command"].startswith(f"{sys.executable} -m kd_lightning fit --config {QUICKSTART}")
        assert Path(record["folder"], "run.log").is_file() and "commit" in record and "date" in record
        assert list(record["curves"]["val/acc1"]) == ["1", "2"]  # the curve travels with the results file
    resumed = done["ls/seed2"]
    assert resumed["resumed"] and resumed["command"].endswith("--ckpt_path last")
    uninterrupted = json.loads((tmp_path / "uninterrupted" / SUMMARY_FILE).read_text())["metrics"]
    assert {key: resumed["metrics"][key] for key in uninterrupted} == uninterrupted  # bit-identical resume
    assert done["ce/seed1"]["metrics"] != done["ce/seed2"]["metrics"]

    # again: nothing starts; the lost results file is rebuilt from the runs' summaries
    grid.results_file.unlink()
    monkeypatch.setattr(sweep, "execute", None)
    assert main(["sweep", str(grid.path), "--jobs", "2"]) is None
    assert "4 runs, 4 finished before, 0 to run" in capsys.readouterr().out
    rebuilt = records(grid.results_file)
    assert set(rebuilt) == set(done) and all(record["rebuilt"] for record in rebuilt.values())
    assert rebuilt["ls/seed2"]["metrics"] == resumed["metrics"]

    # the report, its curves read from the runs' TensorBoard files (the resumed run has one per start)
    assert main(["report", str(grid.path)]) is None
    curves = validation_curves(rebuilt.values(), "val/acc1")
    assert {variant: len(seeds) for variant, seeds in curves.items()} == {"ce": 2, "ls": 2}
    assert all(list(curve) == [1, 2] for seeds in curves.values() for curve in seeds.values())
    assert (tmp_path / "runs" / "tiny" / "curves.png").is_file()
    assert "| LS | 2 |" in (tmp_path / "runs" / "tiny" / "report.md").read_text()


def test_the_slurm_path_runs_a_job_array_and_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    """``--executor slurm`` with submitit's DebugExecutor in SLURM's place: the job array of the ready runs is built
    and waited for as on a cluster; each job (the task function) runs in this process, one after the other (a debug
    job swaps this process's environment while it runs), its ``kd-lightning fit`` as a subprocess. A broken run
    fails, with the end of its log, and the other finishes; the sweep exits 1. What a cluster job carries (the task
    function, its arguments, its outcome) survives cloudpickle."""
    submitit = pytest.importorskip("submitit")
    cloudpickle = pytest.importorskip("cloudpickle")
    monkeypatch.chdir(tmp_path)
    clusters, autoexecutor = [], submitit.AutoExecutor

    def debug_executor(folder, cluster):
        clusters.append(cluster)
        return autoexecutor(folder=folder, cluster="debug")

    monkeypatch.setattr(submitit, "AutoExecutor", debug_executor)
    monkeypatch.setattr(sweep, "WAITERS", 1)
    grid = write_grid(tmp_path / "grid.yaml", BROKEN, CE, seeds=[1])
    options = ["--partition", "gpu", "--gpus-per-node", "1", "--cpus-per-task", "1", "--timeout-min", "10"]
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(grid), "--executor", "slurm", *options])
    assert exit_info.value.code == 1 and clusters == ["slurm"]
    out = capsys.readouterr().out
    assert re.search(r"submitted broken/seed1 as job DEBUG_\d+\n.*submitted ce/seed1 as job DEBUG_\d+", out)
    assert re.search(r"FAILED broken/seed1 after \S+ \(1/2\): exit status 2; the end of .*run\.log:", out)
    assert "num_classes" in out.split("FAILED broken/seed1", 1)[1]  # the end of its log says why
    assert "finished ce/seed1" in out and "1 run(s) failed or did not start: broken/seed1" in out
    (record,) = records(tmp_path / "runs" / "tiny" / "results.jsonl").values()
    assert record["epochs"] == 2 and record["peak_rss_mb"] > 50 and "test/acc1" in record["metrics"]
    assert (tmp_path / "runs" / "tiny" / "ce" / "seed1" / "run.log").is_file()
    assert (tmp_path / "runs" / "tiny" / "submitit").is_dir()
    job = submitit.helpers.DelayedSubmission(sweep._slurm_task, ["true"], "run.log", str(tmp_path), {})
    assert cloudpickle.loads(cloudpickle.dumps(job)).function is sweep._slurm_task
    assert cloudpickle.loads(cloudpickle.dumps(Outcome(0, 1.5, 100.0))) == Outcome(0, 1.5, 100.0)


# 4. Report ---------------------------------------------------------------------------------------------------------

HAND = {  # test/acc1 per variant and seed; "m" has no seed 3
    ("base", 1): 0.70,
    ("base", 2): 0.72,
    ("base", 3): 0.74,
    ("m", 1): 0.73,
    ("m", 2): 0.76,
}


def test_report_matches_hand_computation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = {**CE, "name": "base", "paper": 70.0}
    method = {**CE, "name": "m", "label": "Method", "paper": {"test/acc1": 71.5}}
    grid = write_grid(tmp_path / "grid.yaml", base, method, seeds=[1, 2, 3], baseline="base")
    results = tmp_path / "runs" / "tiny" / "results.jsonl"
    results.parent.mkdir(parents=True)
    lines = [{"variant": v, "seed": s, "grid": "tiny", "metrics": {"test/acc1": a}} for (v, s), a in HAND.items()]
    stale = {"variant": "m", "seed": 1, "grid": "tiny", "metrics": {"test/acc1": 0.10}}  # replaced by a later line
    results.write_text("".join(json.dumps(line) + "\n" for line in [stale, *lines]))
    assert main(["report", str(grid)]) is None
    table = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    # base: 70, 72, 74 -> 72.00 ± 2.00; m: 73, 76 -> 74.50 ± 2.12; paired (seeds 1, 2): +3, +4 -> +3.50 ± 0.71
    assert "| variant | n | test/acc1 (%) | Δ vs base | paper | paper Δ |" in table
    assert "| base | 3 | 72.00 ± 2.00 | - | 70.00 | - |" in table
    assert "| Method | 2 | 74.50 ± 2.12 | +3.50 ± 0.71 | 71.50 | +1.50 |" in table
    assert "; accuracies in %." in table
    assert table in capsys.readouterr().out
    with (tmp_path / "runs" / "tiny" / "report.csv").open() as rows:
        row = {r["variant"]: r for r in csv.DictReader(rows)}["m"]
    assert row["n"] == "2" and row["diff_n"] == "2" and row["unit"] == "%" and row["label"] == "Method"
    assert float(row["mean"]) == pytest.approx(74.5) and float(row["std"]) == pytest.approx(2.1213203)
    assert float(row["diff_mean"]) == pytest.approx(3.5) and float(row["diff_std"]) == pytest.approx(0.7071068)
    assert float(row["paper_diff"]) == pytest.approx(1.5)


def test_a_table_with_a_baseline_per_row_names_each(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [
        {**CE, "name": "r_base", "paper": 68.99},
        {**CE, "name": "r_sd", "paper": 71.78, "baseline": "r_base"},
        {**CE, "name": "w_base", "paper": 79.57},
        {**CE, "name": "w_sd", "paper": 80.67, "baseline": "w_base"},
    ]
    grid = write_grid(tmp_path / "grid.yaml", *rows, seeds=[1])
    values = {"r_base": 0.69, "r_sd": 0.715, "w_base": 0.80, "w_sd": 0.81}
    results = tmp_path / "runs" / "tiny" / "results.jsonl"
    results.parent.mkdir(parents=True)
    lines = [{"variant": v, "seed": 1, "grid": "tiny", "metrics": {"test/acc1": a}} for v, a in values.items()]
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["report", str(grid)]) is None
    table = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "| variant | n | vs | test/acc1 (%) | Δ | paper | paper Δ |" in table
    assert "| r_base | 1 | - | 69.00 | - | 68.99 | - |" in table
    assert "| w_sd | 1 | w_base | 81.00 | +1.00 | 80.67 | +1.10 |" in table
    records = [{"variant": "sgd", "seed": 1, "metrics": {"test/ppl": 130.0}}]
    perplexity = ReportSpec("PTB", ("sgd",), ("test/ppl",))
    assert "accuracies" not in markdown(cells(records, perplexity), perplexity, records)
    assert main(["report", str(grid), "--baseline", "r_base", "--out", "all"]) is None
    assert "| w_sd | 1 | 81.00 | +12.00 | 80.67 | +11.68 |" in (tmp_path / "all" / "report.md").read_text()
    with pytest.raises(GridError, match=r"--baseline nope is not a variant; the variants: r_base, r_sd"):
        main(["report", str(grid), "--baseline", "nope"])


def test_report_gives_wall_minutes_and_their_ratio_and_three_decimals_for_a_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(
        tmp_path / "grid.yaml",
        *({**CE, "name": n, "label": lab, "paper": {}} for n, lab in (("base", "base"), ("m", "Method"))),
        seeds=[1, 2, 3],
    )
    runs = {  # (variant, seed): accuracy, loss, wall time (s), resumed
        ("base", 1): (0.70, 0.05, 600.0, False),
        ("base", 2): (0.72, 0.07, 720.0, False),
        ("base", 3): (0.74, 0.06, 900.0, False),
        ("m", 1): (0.73, 0.30, 1200.0, False),
        ("m", 2): (0.74, 0.34, 1800.0, False),
        ("m", 3): (0.75, 0.32, 99.0, True),  # resumed: its wall time is only its last start's
    }
    results = tmp_path / "runs" / "tiny" / "results.jsonl"
    results.parent.mkdir(parents=True)
    lines = [
        {"variant": v, "seed": s, "metrics": {"test/acc1": a, "train/loss": loss}, "wall_s": w, "resumed": r}
        for (v, s), (a, loss, w, r) in runs.items()
    ]
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["report", str(grid), "--baseline", "base", "--metrics", "test/acc1", "train/loss"]) is None
    table = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    # wall: base 10, 12, 15 min -> 12.3 ± 2.5; m 20, 30 -> 25.0 ± 7.1, ratios 2.0, 2.5 -> 2.25 ± 0.35
    # loss: base 0.060 ± 0.010; m 0.320 ± 0.020; paired +0.25, +0.27, +0.26 -> +0.260 ± 0.010
    header = "| variant | n | test/acc1 (%) | Δ vs base | train/loss | Δ vs base | wall (min) | x base |"
    assert header in table
    assert "| base | 3 | 72.00 ± 2.00 | - | 0.060 ± 0.010 | - | 12.3 ± 2.5 | - |" in table
    assert (
        "| Method | 3 | 74.00 ± 1.00 | +2.00 ± 1.00 | 0.320 ± 0.020 | +0.260 ± 0.010 | 25.0 ± 7.1 | 2.25x ± 0.35 |"
        in table
    )
    assert "a resumed run is left out" in table
    with (tmp_path / "runs" / "tiny" / "report.csv").open() as rows:
        wall = {r["variant"]: r for r in csv.DictReader(rows) if r["metric"] == "wall (min)"}
    assert wall["m"]["unit"] == "min" and wall["m"]["n"] == "2" and wall["m"]["diff_n"] == "2"
    assert float(wall["m"]["mean"]) == pytest.approx(25.0) and float(wall["m"]["diff_mean"]) == pytest.approx(2.25)
    without = [{k: v for k, v in line.items() if k != "wall_s"} for line in lines]
    spec = ReportSpec("no times", ("base", "m"), ("test/acc1",))
    assert "wall" not in markdown(cells(without, spec), spec, without)


def test_report_reads_csv_logs_and_draws_the_curves(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    lines = []
    for variant, offset in (("a", 0.0), ("b", 5.0)):
        for seed in (1, 2):
            folder = tmp_path / variant / f"seed{seed}"
            folder.mkdir(parents=True)
            rows = ["epoch,step,train/loss,val/ppl"] + [f"{e},{10 * e},1.0," for e in range(3)]
            rows += [f"{e},{10 * e + 9},,{200 - 50 * e + offset + seed}" for e in range(3)]
            (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
            metrics = {"test/ppl": 100.0 + offset + seed, "val/ppl": 101.0}
            lines.append({"grid": "g", "variant": variant, "seed": seed, "metrics": metrics})
            if variant == "a":  # b's records have no folder: found beside the results file, as a sweep leaves them
                lines[-1]["folder"] = str(folder)
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_curve(tmp_path / "b" / "seed2", "val/ppl") == {1: 207.0, 2: 157.0, 3: 107.0}
    assert set(validation_curves(lines, "val/ppl")) == {"a"}
    assert set(validation_curves(lines, "val/ppl", root=tmp_path)) == {"a", "b"}
    assert main(["report", str(results), "--out", str(out), "--baseline", "a"]) is None
    assert (out / "curves.png").stat().st_size > 10_000
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0] == "variant,seed,epoch,value" and "b,2,3,107.0" in rows and len(rows) == 1 + 4 * 3
    # a record that carries its curve needs no run folder
    kept = {**lines[0], "folder": str(tmp_path / "gone"), "curves": {"val/ppl": {"1": 9.0, "2": 8.0}}}
    assert validation_curves([kept], "val/ppl") == {"a": {1: {1: 9.0, 2: 8.0}}}
    assert "| b | 2 | 106.50 ± 0.71 | +5.00 ± 0.00 |" in (out / "report.md").read_text()


# 5. Help -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "sweep",
            [
                "--jobs",
                "--executor {local,slurm,submitit-local}",
                "--dry-run",
                "--seeds",
                "--partition",
                "--gpus-per-node",
            ],
        ),
        ("report", ["--out", "--baseline", "results file (JSON lines) or the grid file"]),
    ],
)
def test_help_of_the_commands(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: kd-lightning {command}")
    assert all(option in text for option in expected), text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"kd-lightning {command}" in " ".join(capsys.readouterr().out.split())


def test_accuracies_are_shown_in_percent():
    assert [unit_scale(m) for m in ("test/acc1", "test/mean_acc1", "test/ensemble/acc5", "test/ppl")] == [
        100,
        100,
        100,
        1,
    ]
