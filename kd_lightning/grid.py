"""An experiment grid: its file, its variants and seeds, and each run's folder, command and results record.

A grid file names the variants of a table (a config and its command-line overrides, the paper's number), the seeds
and the metrics to report::

    name: ptb_table5                  # the runs: <root>/<variant>/seed<seed>, root runs/sweeps/<name> by default
    title: DUPS Table 5 (small LSTM)  # the report's heading
    seeds: [1, 2]
    metrics: [test/ppl]               # the first one's val/ counterpart gives the report's curves
    baseline: sgd                     # paired differences to this variant (a variant may name its own)
    variants:
      - name: sgd
        config: configs/ptb/lstm_small_sgd.yaml
        paper: 129.7                  # the first metric's number, or {test/ppl: 129.7}
      - name: ls
        label: LS                     # its name in the table
        config: configs/ptb/lstm_small_sgd.yaml
        overrides: [--model.init_args.label_smoothing=0.1]
        paper: 129.1

A variant that ``needs: [teacher]`` starts once the same seed's ``teacher`` run has finished; ``{root}`` and ``{seed}``
in its overrides name that run's folder: ``--model.init_args.teacher_checkpoint={root}/teacher/seed{seed}/...``.
A variant may run at some of the grid's seeds only (``seeds: [0]``): one teacher for every seed of its students, who
then need its one run (``--model.init_args.teacher_checkpoint={root}/teacher/seed0/...``).

A run is finished when its folder holds ``summary.json``: a second sweep skips it. A run whose folder holds
``checkpoints/last.ckpt`` but no summary was interrupted: the sweep resumes it with ``--ckpt_path last``. So a grid
survives the machine stopping: run the same command again. Each finished run adds one line to the results file
(JSON lines, default ``<root>/results.jsonl``), which :mod:`kd_lightning.report` turns into the paper's table.
Paths (configs, root) are relative to the directory the sweep runs in, as for ``kd-lightning fit``. Running a
grid: :mod:`kd_lightning.sweep`.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.run_folder import SUMMARY_FILE, RunFolder

__all__ = ["Grid", "GridError", "Outcome", "Run", "Variant", "now", "read_curve", "validation_tag"]

RESULTS_FILE = "results.jsonl"
LOG_FILE = "run.log"
EVENTS = "events.out.tfevents.*"
CSV_LOG = "metrics.csv"
GRID_KEYS = {"name", "title", "root", "seeds", "metrics", "baseline", "variants"}
VARIANT_KEYS = {"name", "label", "config", "overrides", "paper", "needs", "baseline", "seeds"}


class GridError(ValueError):
    """A grid file that cannot be run as written; the message names the file and the entry."""


@dataclass(frozen=True)
class Variant:
    """One row of a grid's table.

    Args:
        name: the row's name, also its runs' folder (``<root>/<name>/seed<seed>``).
        config: the ``--config`` of its runs.
        overrides: command-line options after the config (``{root}`` and ``{seed}`` are replaced).
        label: the row's name in the report (default: ``name``).
        paper: the paper's number of each metric, in the report's unit (percent for accuracies).
        needs: variants whose run of the same seed (or whose one run, for a variant of one seed) must have finished
            before this one starts (a teacher).
        baseline: the variant its paired differences are to (default: the grid's ``baseline``; a table with one
            baseline per row gives each row's own).
        seeds: the seeds it runs at, some of the grid's (default: all of them).
    """

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    paper: Mapping[str, float] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    baseline: str | None = None
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Grid:
    """An experiment grid: variants x seeds, the metrics to report and the folder of its runs."""

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    root: Path
    baseline: str | None = None
    title: str = ""
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Grid:
        """Read and check a grid file.

        Raises:
            GridError: a missing or unknown key, a duplicate variant, a ``needs`` naming no earlier variant, a
                ``baseline`` naming no variant, a seed that is not an integer.
        """
        path = Path(path)
        if not path.is_file():
            raise GridError(f"no grid file {path}")
        spec = yaml.safe_load(path.read_text())
        if not isinstance(spec, dict):
            raise GridError(f"{path}: a grid file is a mapping (name, seeds, metrics, variants ...)")
        return cls.from_dict(spec, path)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], path: Path | None = None) -> Grid:
        """The grid a parsed grid file describes (see :meth:`load`)."""
        where = str(path) if path else "grid"
        _check_keys(spec, GRID_KEYS, {"name", "seeds", "metrics", "variants"}, where)
        metrics = tuple(str(metric) for metric in _as_list(spec["metrics"]))
        seeds = _seed_list(spec["seeds"], where)
        if not metrics:
            raise GridError(f"{where}: metrics must name at least one metric (e.g. test/acc1)")
        variants: list[Variant] = []
        for entry in _as_list(spec["variants"]):
            variants.append(_variant(entry, metrics, {v.name: v for v in variants}, seeds, where))
        if not variants:
            raise GridError(f"{where}: variants is empty")
        names = [v.name for v in variants]
        for owner, baseline in [("", spec.get("baseline")), *((f", variant {v.name}", v.baseline) for v in variants)]:
            if baseline is not None and baseline not in names:
                raise GridError(
                    f"{where}{owner}: baseline {baseline!r} is not a variant; the variants: {', '.join(names)}"
                )
        name = str(spec["name"])
        return cls(
            name=name,
            variants=tuple(variants),
            seeds=seeds,
            metrics=metrics,
            root=Path(spec.get("root") or Path("runs", "sweeps", name)),
            baseline=spec.get("baseline"),
            title=str(spec.get("title") or ""),
            path=path,
        )

    @property
    def results_file(self) -> Path:
        """``<root>/results.jsonl``."""
        return self.root / RESULTS_FILE

    def variant(self, name: str) -> Variant:
        """The variant called ``name``."""
        return next(v for v in self.variants if v.name == name)

    def baseline_of(self, variant: Variant) -> str | None:
        """The variant ``variant``'s paired differences are to: its own ``baseline``, else the grid's (none for the
        baseline itself)."""
        baseline = variant.baseline or self.baseline
        return None if baseline == variant.name else baseline

    def runs(self, variants: Iterable[str] | None = None, seeds: Iterable[int] | None = None) -> list[Run]:
        """The grid's runs, seed by seed (every variant of the first seed first: paired results come early), the
        variants in the grid's order or in the order ``variants`` names them (a long run first, short ones after);
        ``seeds``: some of the grid's seeds only.

        Raises:
            GridError: ``variants`` names a variant the grid does not have, ``seeds`` a seed it does not run.
        """
        names = [v.name for v in self.variants]
        chosen = names if variants is None else list(dict.fromkeys(variants))
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise GridError(f"{self.name}: no variant {', '.join(unknown)}; the variants: {', '.join(names)}")
        wanted = self.seeds if seeds is None else list(dict.fromkeys(seeds))
        missing = [str(seed) for seed in wanted if seed not in self.seeds]
        if missing:
            raise GridError(f"{self.name}: no seed {', '.join(missing)}; the seeds: {', '.join(map(str, self.seeds))}")
        return [
            Run(self, self.variant(name), seed)
            for seed in wanted
            for name in chosen
            if seed in self.seeds_of(self.variant(name))
        ]

    def seeds_of(self, variant: Variant) -> tuple[int, ...]:
        """The seeds ``variant`` runs at: its own, else the grid's."""
        return variant.seeds or self.seeds


def _check_keys(spec: Mapping[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    unknown, missing = sorted(set(spec) - allowed), sorted(required - set(spec))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys: {', '.join(sorted(allowed))}")
    if missing:
        raise GridError(f"{where}: missing key(s) {', '.join(missing)}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _variant(
    entry: Any, metrics: tuple[str, ...], earlier: Mapping[str, Variant], grid_seeds: tuple[int, ...], where: str
) -> Variant:
    if not isinstance(entry, Mapping):
        raise GridError(f"{where}: a variant is a mapping (name, config, overrides ...), got {entry!r}")
    name = str(entry.get("name", ""))
    _check_keys(entry, VARIANT_KEYS, {"name", "config"}, f"{where}, variant {name or '?'}")
    if not name or name != Path(name).name or name.startswith("."):
        raise GridError(f"{where}: variant name {name!r} must be a plain folder name")
    if name in earlier:
        raise GridError(f"{where}: two variants are called {name!r}")
    paper = entry.get("paper")
    numbers = dict(paper) if isinstance(paper, Mapping) else ({} if paper is None else {metrics[0]: paper})
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers.values()):
        raise GridError(f"{where}, variant {name}: paper must be a number or {{metric: number}}, got {paper!r}")
    needs = tuple(str(need) for need in _as_list(entry.get("needs") or []))
    missing = [need for need in needs if need not in earlier]
    if missing:
        raise GridError(f"{where}, variant {name}: needs {', '.join(missing)}, which is not a variant listed before it")
    seeds = _variant_seeds(entry.get("seeds"), grid_seeds, f"{where}, variant {name}")
    for need in needs:
        own = earlier[need].seeds
        if own is not None and len(own) > 1 and not set(seeds or grid_seeds) <= set(own):
            raise GridError(
                f"{where}, variant {name}: needs {need}, which runs at seeds {list(own)} only: a needed variant "
                "runs at one seed (shared by every seed) or at every seed of the variants that need it"
            )
    return Variant(
        name=name,
        config=str(entry["config"]),
        overrides=tuple(str(option) for option in _as_list(entry.get("overrides") or [])),
        label=str(entry.get("label") or name),
        paper={str(metric): float(value) for metric, value in numbers.items()},
        needs=needs,
        baseline=None if entry.get("baseline") is None else str(entry["baseline"]),
        seeds=seeds,
    )


def _seed_list(value: Any, where: str) -> tuple[int, ...]:
    seeds = tuple(_as_list(value))
    if not seeds or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds):
        raise GridError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    return seeds


def _variant_seeds(value: Any, grid_seeds: tuple[int, ...], where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    seeds = _seed_list(value, where)
    if not set(seeds) <= set(grid_seeds):
        raise GridError(f"{where}: seeds {list(seeds)} are not all among the grid's seeds {list(grid_seeds)}")
    return seeds


@dataclass(frozen=True)
class Run:
    """One ``kd-lightning fit`` of a grid: a variant at a seed, in ``<root>/<variant>/seed<seed>``."""

    grid: Grid
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        """``<variant>/seed<seed>``."""
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def folder(self) -> Path:
        """The run's ``trainer.default_root_dir``."""
        return self.grid.root / self.variant.name / f"seed{self.seed}"

    @property
    def log(self) -> Path:
        """``run.log`` in the run's folder: the process's stdout and stderr (appended by a resume)."""
        return self.folder / LOG_FILE

    @property
    def finished(self) -> bool:
        """Whether the run wrote its ``summary.json``."""
        return (self.folder / SUMMARY_FILE).is_file()

    @property
    def interrupted(self) -> bool:
        """Whether the run stopped after an epoch and before its end (a ``last.ckpt`` and no summary)."""
        return not self.finished and RunFolder.of(self.folder, None).last_checkpoint.is_file()

    @property
    def needed(self) -> list[Run]:
        """The runs this one needs (``needs``): of the same seed, or a variant's one run when it has one seed."""
        return [self._needed(self.grid.variant(name)) for name in self.variant.needs]

    def _needed(self, variant: Variant) -> Run:
        seeds = self.grid.seeds_of(variant)
        return Run(self.grid, variant, self.seed if self.seed in seeds else seeds[0])

    def command(self, extra: Sequence[str] = ()) -> list[str]:
        """The run's ``kd-lightning fit`` process, with ``extra`` options after the variant's overrides."""
        overrides = [self._fill(option) for option in self.variant.overrides]
        command = [sys.executable, "-m", "kd_lightning", "fit", "--config", self.variant.config, *overrides, *extra]
        command += ["--seed_everything", str(self.seed), "--trainer.default_root_dir", str(self.folder)]
        return [*command, "--test_after_fit", "true", "--trainer.enable_progress_bar", "false"]

    def start_command(self, extra: Sequence[str] = ()) -> list[str]:
        """:meth:`command` as the folder stands: ``--ckpt_path last`` resumes an interrupted run; ``--overwrite true``
        replaces the files of a start that died before its first checkpoint (the CLI would refuse the folder)."""
        if self.interrupted:
            return [*self.command(extra), "--ckpt_path", "last"]
        if RunFolder.of(self.folder, None).existing_files():
            return [*self.command(extra), "--overwrite", "true"]
        return self.command(extra)

    def _fill(self, option: str) -> str:
        return option.replace("{root}", str(self.grid.root)).replace("{seed}", str(self.seed))

    def curves(self) -> dict[str, dict[str, float]]:
        """The validation curve of the grid's first metric (epoch -> value, from the run's logs), by its tag; the
        results file keeps it, so a report can draw it after the run folder is gone."""
        tag = validation_tag(self.grid.metrics[0])
        curve = read_curve(self.folder, tag) if self.folder.is_dir() else {}
        return {tag: {str(epoch): value for epoch, value in curve.items()}} if curve else {}

    def record(self, command: Sequence[str], outcome: Outcome | None, provenance: Mapping[str, Any]) -> dict[str, Any]:
        """The run's line of the results file, from its ``summary.json``; ``outcome`` ``None``: rebuilt for a run
        that finished without this file knowing it (wall time and memory unknown)."""
        summary = json.loads((self.folder / SUMMARY_FILE).read_text())
        return {
            "grid": self.grid.name,
            "grid_file": str(self.grid.path) if self.grid.path else None,
            "variant": self.variant.name,
            "seed": self.seed,
            "metrics": summary.get("metrics", {}),
            "epochs": summary.get("epochs"),
            "steps": summary.get("steps"),
            "wall_s": None if outcome is None else round(outcome.wall_s, 3),
            "peak_rss_mb": None if outcome is None else round(outcome.peak_rss_mb, 1),
            "curves": self.curves(),
            "resumed": "--ckpt_path" in command,
            "rebuilt": outcome is None,
            "folder": str(self.folder),
            "command": shlex.join(command),
            **provenance,
        }


@dataclass(frozen=True)
class Outcome:
    """How a run's process ended: exit status, wall time (s), peak resident memory (MB)."""

    returncode: int
    wall_s: float
    peak_rss_mb: float


def now() -> str:
    """The current UTC time, to the second (ISO 8601)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def validation_tag(metric: str) -> str:
    """The validation counterpart of a test metric (``test/ppl`` -> ``val/ppl``)."""
    return "val/" + metric.split("/", 1)[1] if metric.startswith("test/") else metric


def read_curve(folder: Path, tag: str) -> dict[int, float]:
    """``tag`` at the end of each epoch (numbered from 1) of a run, from its ``metrics.csv`` or, when it has none,
    its TensorBoard event files (all of them: a resumed run has one per start); empty when neither has it."""
    if (folder / CSV_LOG).is_file():
        return _csv_curve(folder / CSV_LOG, tag)
    if any(folder.glob(EVENTS)):
        return _tensorboard_curve(folder, tag)
    return {}


def _csv_curve(path: Path, tag: str) -> dict[int, float]:
    with path.open(newline="") as rows:
        return {
            int(float(row["epoch"])) + 1: float(row[tag])
            for row in csv.DictReader(rows)
            if row.get(tag) not in (None, "")
        }


def _tensorboard_curve(folder: Path, tag: str) -> dict[int, float]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if tag not in tags:
        return {}
    epoch_at = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
    return {epoch_at.get(e.step, i) + 1: e.value for i, e in enumerate(events.Scalars(tag))}
