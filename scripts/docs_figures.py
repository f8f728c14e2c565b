"""The documentation site's figures, drawn from the committed results files (no figure is drawn by hand).

    .venv/bin/python scripts/docs_figures.py OUT_DIR             # write every figure into OUT_DIR
    .venv/bin/python scripts/docs_figures.py --collect-curves runs/sweeps/ptb_table5 results/ptb_table5

``mkdocs build`` calls :func:`make_figures` (``docs/hooks.py``), so the site always shows the files as committed.
Inputs:

- ``results/ptb_table5/results.jsonl`` (``kd-lightning sweep``'s records) and ``configs/grids/ptb_table5.yaml`` (the
  paper's numbers): test perplexity per variant and seed against the paper's.
- ``results/ptb_table5/curves.csv`` (variant, seed, epoch, val_ppl), written by ``--collect-curves`` from the runs'
  TensorBoard or CSV logs (``kd_lightning.report.read_curve``): the validation curves per epoch. Without it, the
  ``curves.png`` that ``kd-lightning report`` drew from the logs when they existed is used as it is.
- ``results/ptb_5epoch/results.json``: the 5-epoch runs' validation perplexity per epoch.
- ``benchmarks/history.json``: the overhead ratios per method (images) and the language-model rows over time.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PTB15 = ROOT / "results" / "ptb_table5"
PTB15_GRID = ROOT / "configs" / "grids" / "ptb_table5.yaml"
PTB5 = ROOT / "results" / "ptb_5epoch" / "results.json"
BENCH = ROOT / "benchmarks" / "history.json"
#: PNG metadata without the matplotlib version or a date, so a figure only changes when its data does.
PNG_META = {"Software": None}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _records(path: Path) -> list[dict]:
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["variant"], record["seed"])] = record
    return list(latest.values())


def ptb15_test_ppl(out: Path) -> Path:
    """Test perplexity of the final weights per variant: each seed, the mean, and the paper's number."""
    plt = _pyplot()
    grid = yaml.safe_load(PTB15_GRID.read_text())
    records = _records(PTB15 / "results.jsonl")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = []
    for i, variant in enumerate(grid["variants"]):
        values = [r["metrics"]["test/ppl"] for r in records if r["variant"] == variant["name"]]
        labels.append(f"{variant['label']}\n(n={len(values)})")
        color = f"C{i}"
        if values:
            ax.scatter(
                [i] * len(values),
                values,
                color=color,
                alpha=0.5,
                s=25,
                zorder=3,
                label="ours, each seed" if i == 0 else None,
            )
            ax.scatter(
                [i],
                [statistics.fmean(values)],
                color=color,
                marker="_",
                s=500,
                linewidths=2.5,
                zorder=4,
                label="ours, mean" if i == 0 else None,
            )
        if variant.get("paper") is not None:
            ax.scatter(
                [i + 0.18],
                [variant["paper"]],
                facecolors="none",
                edgecolors="k",
                marker="D",
                s=40,
                zorder=4,
                label="paper" if i == 0 else None,
            )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(grid.get("title", "PTB Table 5"), fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = out / "ptb_table5_test_ppl.png"
    fig.savefig(path, metadata=PNG_META)
    plt.close(fig)
    return path


def read_curves_csv(path: Path) -> dict[str, dict[int, dict[int, float]]]:
    """variant -> seed -> epoch -> value from a ``curves.csv`` (``kd-lightning report``'s columns)."""
    curves: dict[str, dict[int, dict[int, float]]] = {}
    with path.open(newline="") as rows:
        for row in csv.DictReader(rows):
            curves.setdefault(row["variant"], {}).setdefault(int(row["seed"]), {})[int(row["epoch"])] = float(
                row["value"]
            )
    return curves


def ptb15_curves(out: Path) -> Path:
    """Validation perplexity per epoch of the 15-epoch runs (``curves.csv``, once it has the baseline's curves), else
    the report's ``curves.png``."""
    path = out / "ptb_table5_curves.png"
    source = PTB15 / "curves.csv"
    grid = yaml.safe_load(PTB15_GRID.read_text())
    curves = read_curves_csv(source) if source.is_file() else {}
    if grid["baseline"] not in curves:
        shutil.copyfile(PTB15 / "curves.png", path)
        return path
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, variant in enumerate(v for v in grid["variants"] if v["name"] in curves):
        seeds = curves[variant["name"]]
        for curve in seeds.values():
            ax.plot(list(curve), list(curve.values()), color=f"C{i}", alpha=0.3, linewidth=0.8)
        epochs = sorted({e for c in seeds.values() for e in c})
        mean = [statistics.fmean(c[e] for c in seeds.values() if e in c) for e in epochs]
        ax.plot(epochs, mean, color=f"C{i}", linewidth=2, label=f"{variant['label']} (n={len(seeds)})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity")
    ax.set_title(grid.get("title", "PTB Table 5"), fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata=PNG_META)
    plt.close(fig)
    return path


def ptb5_curves(out: Path) -> Path:
    """Validation perplexity per epoch of the 5-epoch runs (seed 1), with seed 2's last value."""
    plt = _pyplot()
    data = json.loads(PTB5.read_text())
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, variant in enumerate(data["variants"]):
        epochs = list(range(1, len(variant["val_ppl_seed1"]) + 1))
        ax.plot(epochs, variant["val_ppl_seed1"], marker="o", color=f"C{i}", label=f"{variant['label']}, seed 1")
        ax.scatter(
            [epochs[-1] + 0.08],
            [variant["val_ppl_seed2_last"]],
            color=f"C{i}",
            marker="x",
            label="seed 2, last epoch" if i == 0 else None,
        )
    ax.set_yscale("log")
    ax.set_xticks(range(1, 6))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Small LSTM on Penn Treebank, 5 epochs (5 DUPS stages)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ptb_5epoch_curves.png"
    fig.savefig(path, metadata=PNG_META)
    plt.close(fig)
    return path


def overhead_images(out: Path) -> Path:
    """Step time of every method relative to plain CE, from the latest full run of the image rows."""
    plt = _pyplot()
    history = json.loads(BENCH.read_text())
    full = [run for run in history["runs"] if run["kind"] == "images" and len(run["rows"]) > 8][-1]
    rows = [r for r in full["rows"] if not r["method"].startswith("augment")]
    later = [run for run in history["runs"] if run["kind"] == "images" and run is not full]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    names = [r["method"] for r in rows]
    ax.barh(
        range(len(rows)),
        [r["ratio"] for r in rows],
        color="C0",
        alpha=0.8,
        label=f"{full['date']} ({full['commit']}), every row",
    )
    for j, run in enumerate(later):
        points = [(names.index(r["method"]), r["ratio"]) for r in run["rows"] if r["method"] in names]
        ax.scatter(
            [p[1] for p in points],
            [p[0] for p in points],
            marker="o",
            color=f"C{j + 1}",
            zorder=3,
            label=f"{run['date']} ({run['commit']}), re-measured rows",
        )
    for i, row in enumerate(rows):
        if "target" in row:
            ax.plot(
                [row["target"]] * 2,
                [i - 0.4, i + 0.4],
                color="k",
                linewidth=1.5,
                label="target" if "target" not in [r.get("target") for r in rows[:i]] else None,
            )
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("step time / plain CE step (resnet20, batch 128, CPU)")
    ax.set_title("Training-step overhead per method (benchmarks/overhead.py)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="center right")
    fig.tight_layout()
    path = out / "overhead_images.png"
    fig.savefig(path, metadata=PNG_META)
    plt.close(fig)
    return path


def overhead_lm(out: Path) -> Path:
    """The language-model DUPS rows' ratio to the LM step, run by run, with their targets."""
    plt = _pyplot()
    history = json.loads(BENCH.read_text())
    runs = [run for run in history["runs"] if run["kind"] == "language-model"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = list(range(len(runs)))
    for i, (method, target) in enumerate((("lm_dups_dense", 1.10), ("lm_dups_topk", 1.05))):
        values = [next((r["ratio"] for r in run["rows"] if r["method"] == method), None) for run in runs]
        ax.plot(x, values, marker="o", color=f"C{i}", label=method)
        ax.axhline(target, color=f"C{i}", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xticks(x, [f"{run['commit']}\n{run['setting'].split(';')[0][:22]}" for run in runs], fontsize=7)
    ax.set_ylabel("step / LM CE step")
    ax.set_title("DUPS for language models: step overhead run by run (lstm_small, 10k words, CPU)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = out / "overhead_lm.png"
    fig.savefig(path, metadata=PNG_META)
    plt.close(fig)
    return path


FIGURES = (ptb15_test_ppl, ptb15_curves, ptb5_curves, overhead_images, overhead_lm)


def make_figures(out: Path) -> list[Path]:
    """Draw every figure into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    return [figure(out) for figure in FIGURES]


def collect_curves(runs: Path, results: Path) -> Path:
    """Write ``results/curves.csv`` from the logs of the runs under ``runs`` (``<variant>/seed<seed>/``), keeping the
    rows of runs whose logs are gone."""
    from kd_lightning.report import read_curve

    path = results / "curves.csv"
    curves = read_curves_csv(path) if path.is_file() else {}
    for folder in sorted(runs.glob("*/seed*")):
        curve = read_curve(folder, "val/ppl")
        if curve:
            curves.setdefault(folder.parent.name, {})[int(folder.name.removeprefix("seed"))] = curve
    with path.open("w", newline="") as rows:
        writer = csv.writer(rows)
        writer.writerow(["variant", "seed", "epoch", "value"])
        for variant, seeds in sorted(curves.items()):
            for seed, curve in sorted(seeds.items()):
                writer.writerows([variant, seed, epoch, round(value, 4)] for epoch, value in sorted(curve.items()))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "build" / "figures", help="output folder")
    parser.add_argument(
        "--collect-curves",
        nargs=2,
        type=Path,
        metavar=("RUNS", "RESULTS"),
        help="write RESULTS/curves.csv from the runs' logs under RUNS, then stop",
    )
    options = parser.parse_args(argv)
    if options.collect_curves:
        print(collect_curves(*options.collect_curves))
        return 0
    for path in make_figures(options.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
