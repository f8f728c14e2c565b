"""``kd-lightning report``: a sweep's results file as the table a paper prints, and the validation curves.

For each variant and metric: the mean ± standard deviation over seeds (sample std, n - 1), the number of seeds, the
paired difference to the baseline variant (per seed, over the seeds both have: mean ± std of the differences) and
the paper's number beside ours (with the paper's own difference to its baseline). Accuracies are shown in percent,
other metrics as they are (3 decimals for a metric below 1, such as a loss); a grid's ``paper:`` numbers are in these
units. When the records have wall times, a last column gives each variant's minutes per run and, against the
baseline, the per-seed ratio of the wall times (mean ± std): the method's overhead end to end, on this machine; a
resumed run counts only its last start, so it is left out of that column. Written next to the results file:
``report.md`` (Markdown), ``report.csv`` (one row per variant and metric) and ``curves.png``: the first metric's
validation counterpart (``val/ppl`` for ``test/ppl``) per variant against the epoch, mean over seeds (thick) and
each seed (thin), read from each run's TensorBoard event files or ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kd_lightning.grid import Grid, GridError, read_curve, validation_tag

__all__ = ["Cell", "ReportSpec", "cells", "main", "markdown", "read_results", "validation_curves", "write_report"]

REPORT_FILE = "report.md"
#: The wall-time column's name: minutes per run (``wall_s`` / 60 of the runs that ran in one go); its paired
#: "differences" are ratios (this run's time / the baseline's at the same seed).
WALL = "wall (min)"
TABLE_FILE = "report.csv"
CURVES_FILE = "curves.png"
CURVES_TABLE = "curves.csv"
#: report.csv's columns: one row per variant and metric.
CSV_COLUMNS = (
    "variant",
    "label",
    "metric",
    "unit",
    "n",
    "mean",
    "std",
    "diff_n",
    "diff_mean",
    "diff_std",
    "paper",
    "paper_diff",
)


@dataclass(frozen=True)
class ReportSpec:
    """What the table shows: its rows (variants, in order, with labels), metrics, each row's baseline (the variant
    its paired differences are to; none for a baseline) and the paper's numbers."""

    title: str
    variants: tuple[str, ...]
    metrics: tuple[str, ...]
    baselines: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    paper: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def of_grid(cls, grid: Grid) -> ReportSpec:
        """The grid's variants, metrics, baselines, labels and paper numbers."""
        baselines = {v.name: grid.baseline_of(v) for v in grid.variants}
        return cls(
            title=grid.title or grid.name,
            variants=tuple(v.name for v in grid.variants),
            metrics=grid.metrics,
            baselines={name: baseline for name, baseline in baselines.items() if baseline},
            labels={v.name: v.label for v in grid.variants},
            paper={v.name: v.paper for v in grid.variants},
        )

    @classmethod
    def of_records(cls, records: Sequence[Mapping[str, Any]], title: str) -> ReportSpec:
        """Without a grid: the variants in the order they appear, every ``test/`` metric they share."""
        variants = tuple(dict.fromkeys(r["variant"] for r in records))
        shared = set.intersection(*(set(r["metrics"]) for r in records)) if records else set()
        return cls(title=title, variants=variants, metrics=tuple(sorted(m for m in shared if m.startswith("test/"))))

    def with_baseline(self, baseline: str) -> ReportSpec:
        """Every other variant compared with ``baseline``."""
        return replace(self, baselines={v: baseline for v in self.variants if v != baseline})

    def label(self, variant: str) -> str:
        """The variant's name in the table."""
        return self.labels.get(variant, variant)


@dataclass(frozen=True)
class Cell:
    """One variant x metric of the table, in the report's unit (percent for accuracies).

    ``diffs``: the paired differences to the baseline (this variant minus the baseline, one per seed both have).
    """

    variant: str
    metric: str
    values: tuple[float, ...]
    diffs: tuple[float, ...] | None
    paper: float | None
    paper_diff: float | None


def unit_scale(metric: str) -> float:
    """100 for accuracies (``.../acc1``, ``.../acc5``, ``.../mean_acc1``), shown in percent; 1 otherwise."""
    name = metric.rsplit("/", 1)[-1]
    return 100.0 if name.startswith("acc") or "_acc" in name else 1.0


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (``None`` for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results file, the last one of each (variant, seed) (a run done again replaces its record).

    Raises:
        GridError: no such file.
    """
    if not path.is_file():
        raise GridError(f"no results file {path} (kd-lightning sweep writes it when a run finishes)")
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["variant"], record["seed"])] = record
    return list(latest.values())


def cells(records: Sequence[Mapping[str, Any]], spec: ReportSpec) -> list[Cell]:
    """The table's cells, variant by variant, metric by metric (and :data:`WALL` last when a record has a wall
    time)."""
    by_variant: dict[str, dict[int, Mapping[str, float]]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], {})[record["seed"]] = _with_wall(record)
    metrics = spec.metrics + ((WALL,) if any(WALL in m for runs in by_variant.values() for m in runs.values()) else ())
    table = []
    for variant in spec.variants:
        runs, baseline = by_variant.get(variant, {}), spec.baselines.get(variant)
        base = by_variant.get(baseline, {}) if baseline else {}
        for metric in metrics:
            scale = unit_scale(metric)
            values = tuple(scale * m[metric] for m in runs.values() if metric in m)
            paired = sorted(seed for seed in runs if seed in base and metric in runs[seed] and metric in base[seed])
            diffs = (
                tuple(_paired(metric, runs[seed][metric], base[seed][metric]) for seed in paired) if baseline else None
            )
            paper = spec.paper.get(variant, {}).get(metric)
            paper_base = spec.paper.get(baseline, {}).get(metric) if baseline else None
            paper_diff = None if paper is None or paper_base is None else paper - paper_base
            table.append(Cell(variant, metric, values, diffs, paper, paper_diff))
    return table


def _paired(metric: str, value: float, base: float) -> float:
    """A seed's paired comparison: the difference in the metric's unit, the ratio of the times for :data:`WALL`."""
    return value / base if metric == WALL else unit_scale(metric) * (value - base)


def _with_wall(record: Mapping[str, Any]) -> Mapping[str, float]:
    """The record's metrics, with :data:`WALL` when it has a wall time that covers the whole run (not resumed)."""
    wall_s = record.get("wall_s")
    if wall_s is None or record.get("resumed"):
        return record["metrics"]
    return {**record["metrics"], WALL: wall_s / 60.0}


def decimals(table: Sequence[Cell], metric: str) -> int:
    """How many decimals a metric's column shows: 1 for :data:`WALL`, 3 when every value is below 1 in magnitude (a
    loss), else 2."""
    if metric == WALL:
        return 1
    values = [v for c in table if c.metric == metric for v in c.values]
    return 3 if values and max(map(abs, values)) < 1.0 else 2


def _number(values: Sequence[float], signed: bool = False, digits: int = 2, suffix: str = "") -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{text}{suffix}" if std is None else f"{text}{suffix} ± {std:.{digits}f}"


def _plain(value: float | None, signed: bool = False, digits: int = 2) -> str:
    return "-" if value is None else (f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}")


def _difference(cell: Cell, digits: int) -> str:
    """A cell's paired differences (ratios for :data:`WALL`, as ``1.65x``)."""
    if cell.diffs is None:
        return "-"
    if cell.metric == WALL:
        return _number(cell.diffs, suffix="x")
    return _number(cell.diffs, signed=True, digits=digits)


def markdown(table: Sequence[Cell], spec: ReportSpec, records: Sequence[Mapping[str, Any]]) -> str:
    """The table as Markdown, with a heading and a note on what the numbers are.

    With one baseline the difference column says which ("Δ vs SGD"); with one per row, a "vs" column names each.
    """
    metrics = tuple(dict.fromkeys(c.metric for c in table))
    with_paper = {m for m in metrics if any(c.paper is not None for c in table if c.metric == m)}
    shared = set(spec.baselines.values())
    one_baseline = spec.label(next(iter(shared))) if len(shared) == 1 else None
    header = ["variant", "n"] + ([] if one_baseline or not shared else ["vs"])
    for metric in metrics:
        header.append(f"{metric} (%)" if unit_scale(metric) != 1 else metric)
        header += [_difference_header(metric, one_baseline)] if shared else []
        header += (["paper", "paper Δ"] if shared else ["paper"]) if metric in with_paper else []
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    digits = {metric: decimals(table, metric) for metric in metrics}
    for variant in spec.variants:
        row = [c for c in table if c.variant == variant]
        values = [spec.label(variant), str(max(len(c.values) for c in row if c.metric != WALL))]
        if shared and not one_baseline:
            values.append(spec.label(spec.baselines[variant]) if variant in spec.baselines else "-")
        for cell in row:
            values.append(_number(cell.values, digits=digits[cell.metric]))
            if shared:
                values.append(_difference(cell, digits[cell.metric]))
            if cell.metric in with_paper:
                values.append(_plain(cell.paper, digits=digits[cell.metric]))
                if shared:
                    values.append(_plain(cell.paper_diff, signed=True, digits=digits[cell.metric]))
        lines.append(f"| {' | '.join(values)} |")
    return "\n".join([f"## {spec.title}", "", *lines, "", _note(spec, records, WALL in metrics), ""])


def _difference_header(metric: str, baseline: str | None) -> str:
    if metric == WALL:
        return f"x {baseline}" if baseline else "x"
    return f"Δ vs {baseline}" if baseline else "Δ"


def _note(spec: ReportSpec, records: Sequence[Mapping[str, Any]], wall: bool) -> str:
    seeds = sorted({r["seed"] for r in records})
    commits = sorted(
        {f"{r['commit'][:10]}{' (modified)' if r.get('dirty') else ''}" for r in records if r.get("commit")}
    )
    paired = (
        "; Δ: the paired difference to the baseline over the seeds both have (mean ± std of the per-seed "
        "differences); paper Δ: the paper's own difference"
        if spec.baselines
        else ""
    )
    percent = "; accuracies in %" if any(unit_scale(metric) == 100.0 for metric in spec.metrics) else ""
    timing = (
        f"; {WALL}: minutes per run, start to end (validation and test included), of the runs that ran in one go (a "
        "resumed run is left out), with the runs that shared the machine at the time; x: the paired ratio to the "
        "baseline's time"
        if wall
        else ""
    )
    return (
        f"Mean ± sample std over seeds {', '.join(map(str, seeds)) or '-'} (n: seeds per variant){paired}{percent}"
        f"{timing}. Commit(s): {', '.join(commits) or 'unknown'}."
    )


def write_csv(path: Path, table: Sequence[Cell], spec: ReportSpec) -> None:
    """One row per variant and metric (:data:`CSV_COLUMNS`): the seeds' n, mean and std, the paired differences'
    n, mean and std (for :data:`WALL`, unit ``min``: the ratios to the baseline's time), the paper's number and its
    difference to the paper's baseline; empty where there is none."""
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for cell in table:
            mean, std = mean_std(cell.values) if cell.values else (None, None)
            diff_mean, diff_std = mean_std(cell.diffs) if cell.diffs else (None, None)
            row = {"variant": cell.variant, "label": spec.label(cell.variant), "metric": cell.metric}
            row |= {"unit": _unit(cell.metric), "n": len(cell.values)}
            row |= {"mean": mean, "std": std, "diff_n": None if cell.diffs is None else len(cell.diffs)}
            row |= {"diff_mean": diff_mean, "diff_std": diff_std, "paper": cell.paper, "paper_diff": cell.paper_diff}
            writer.writerow({key: _csv(value) for key, value in row.items()})


def _unit(metric: str) -> str:
    return "min" if metric == WALL else "%" if unit_scale(metric) != 1 else ""


def _csv(value: Any) -> Any:
    return "" if value is None else round(value, 6) if isinstance(value, float) else value


def validation_curves(
    records: Iterable[Mapping[str, Any]], tag: str, root: Path | None = None
) -> dict[str, dict[int, dict[int, float]]]:
    """variant -> seed -> epoch -> ``tag``: the record's own ``curves`` (the sweep stores the first metric's), else
    from the logs of the run's folder: the record's ``folder`` (relative to the directory the sweep ran in), else
    ``root/<variant>/seed<seed>`` (``root``: the results file's folder)."""
    curves: dict[str, dict[int, dict[int, float]]] = {}
    for record in records:
        curve = {int(epoch): value for epoch, value in record.get("curves", {}).get(tag, {}).items()}
        folder = Path(record["folder"]) if record.get("folder") else None
        if (folder is None or not folder.is_dir()) and root is not None:
            folder = root / record["variant"] / f"seed{record['seed']}"
        if not curve and folder is not None and folder.is_dir():
            curve = read_curve(folder, tag)
        if curve:
            curves.setdefault(record["variant"], {})[record["seed"]] = curve
    return curves


def plot_curves(
    curves: Mapping[str, Mapping[int, Mapping[int, float]]], spec: ReportSpec, tag: str, path: Path
) -> None:
    """Each variant's mean curve over seeds (thick) and its seeds (thin) in one figure, in the table's unit (log scale
    for perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scale = unit_scale(tag)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, variant in enumerate(v for v in spec.variants if v in curves):
        color = f"C{index % 10}"
        seeds = curves[variant]
        for curve in seeds.values():
            axes.plot(list(curve), [scale * v for v in curve.values()], color=color, alpha=0.3, linewidth=0.8)
        epochs = sorted({epoch for curve in seeds.values() for epoch in curve})
        mean = [scale * statistics.fmean(c[e] for c in seeds.values() if e in c) for e in epochs]
        axes.plot(epochs, mean, color=color, linewidth=2, label=f"{spec.label(variant)} (n={len(seeds)})")
    if "ppl" in tag:
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{tag} (%)" if scale != 1 else tag)
    axes.set_title(spec.title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_curves_csv(path: Path, curves: Mapping[str, Mapping[int, Mapping[int, float]]]) -> None:
    """The curves as ``variant,seed,epoch,value`` rows (what the figure shows, as numbers)."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["variant", "seed", "epoch", "value"])
        for variant, seeds in curves.items():
            for seed, curve in sorted(seeds.items()):
                writer.writerows([variant, seed, epoch, value] for epoch, value in sorted(curve.items()))


def write_report(results: Path, spec: ReportSpec, out: Path) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and (when the records or the runs' logs have the curves) ``curves.csv`` and
    ``curves.png`` into ``out``.

    Returns:
        The files written.
    """
    records = read_results(results)
    out.mkdir(parents=True, exist_ok=True)
    table = cells(records, spec)
    text = markdown(table, spec, records)
    (out / REPORT_FILE).write_text(text)
    write_csv(out / TABLE_FILE, table, spec)
    written = [out / REPORT_FILE, out / TABLE_FILE]
    tag = validation_tag(spec.metrics[0]) if spec.metrics else ""
    curves = validation_curves(records, tag, results.parent) if tag else {}
    drawable = bool(curves) and _has_matplotlib()
    if curves:
        write_curves_csv(out / CURVES_TABLE, curves)
        written.append(out / CURVES_TABLE)
    if drawable:
        plot_curves(curves, spec, tag, out / CURVES_FILE)
        written.append(out / CURVES_FILE)
    print(text)
    if not curves:
        print(f"(no curves of {tag or 'a metric'} in the runs' logs: no {CURVES_FILE})")
    elif not drawable:
        print(f"(no {CURVES_FILE}: the figure needs matplotlib, pip install 'kd-lightning[sweep]')")
    return written


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def spec_and_results(source: Path) -> tuple[ReportSpec, Path]:
    """The table's spec and the results file of a grid file, or of a results file (its grid's, when the file it
    was made from is still there; else the variants and ``test/`` metrics of its records)."""
    if source.suffix in (".yaml", ".yml"):
        grid = Grid.load(source)
        return ReportSpec.of_grid(grid), grid.results_file
    records = read_results(source)
    grid_file = next((r.get("grid_file") for r in records if r.get("grid_file")), None)
    if grid_file and Path(grid_file).is_file():
        return ReportSpec.of_grid(Grid.load(grid_file)), source
    return ReportSpec.of_records(records, title=records[0]["grid"] if records else source.stem), source


def build_parser() -> argparse.ArgumentParser:
    """The ``kd-lightning report`` options."""
    parser = argparse.ArgumentParser(
        prog="kd-lightning report",
        description="Turn a sweep's results file into the paper's table: mean ± std over seeds per variant, paired "
        "differences to the baseline, the paper's numbers; written as report.md and report.csv next to the results "
        "file, with curves.png (the validation curve of the first metric per variant, mean over seeds).",
    )
    parser.add_argument("source", type=Path, help="a results file (JSON lines) or the grid file (YAML) that made it")
    parser.add_argument("--out", type=Path, help="folder for the report files (default: the results file's folder)")
    parser.add_argument("--baseline", help="the variant all differences are to (default: the grid's baselines)")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC", help="the metrics (default: the grid's)")
    return parser


def main(argv: Sequence[str]) -> int:
    """``kd-lightning report``: returns the exit status.

    Raises:
        GridError: no results file, or ``--baseline`` names no variant.
    """
    options = build_parser().parse_args(list(argv))
    spec, results = spec_and_results(options.source)
    if options.baseline is not None:
        if options.baseline not in spec.variants:
            raise GridError(f"--baseline {options.baseline} is not a variant; the variants: {', '.join(spec.variants)}")
        spec = spec.with_baseline(options.baseline)
    spec = replace(spec, metrics=tuple(options.metrics or spec.metrics))
    written = write_report(results, spec, options.out or results.parent)
    print("written: " + ", ".join(map(str, written)))
    return 0
