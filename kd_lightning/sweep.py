"""``kd-lightning sweep GRID.yaml``: every run of an experiment grid as its own ``kd-lightning fit`` process.

The grid file and its runs are described in :mod:`kd_lightning.grid`. Runs go ``--jobs N`` at a time, locally
(each with its share of the cores) or as SLURM jobs through submitit. A finished run (``summary.json``) is skipped,
an interrupted one (``last.ckpt``, no summary) resumed with ``--ckpt_path last``: run the same command again after
a stop. Each finished run adds one line to the results file (JSON lines, default ``<root>/results.jsonl``), which
:mod:`kd_lightning.report` turns into the paper's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from kd_lightning.grid import Grid, GridError, Outcome, Run, now
from kd_lightning.run_folder import SUMMARY_FILE

__all__ = ["Launcher", "execute", "main", "run_grid"]

#: Lines of a failed run's log printed with its failure.
LOG_TAIL = 20
EXECUTORS = ("local", "slurm", "submitit-local")
#: Threads that wait for submitit jobs (a job waited for holds one).
WAITERS = 256
#: submitit's LocalExecutor kills a job after its timeout (2 minutes by default): a week unless --timeout-min says.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


def execute(command: Sequence[str], log: str | os.PathLike, cwd: str, env: Mapping[str, str]) -> Outcome:
    """Run ``command`` in ``cwd`` with ``env`` added to the environment, its output appended to ``log``.

    The peak memory is that of the process (and the children it waited for), from :func:`os.wait4`: exact per run
    even when several run at once.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("ab") as out:
        out.write(f"# {now()}: {shlex.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            list(command), cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return Outcome(process.returncode, time.monotonic() - start, usage.ru_maxrss / 1024)


def _slurm_task(command: Sequence[str], log: str, cwd: str, env: Mapping[str, str]) -> Outcome:
    """A submitit job's task: task 0 writes ``run.log``, task ``i`` (one per GPU) ``run.task<i>.log``."""
    import submitit

    rank = submitit.JobEnvironment().global_rank
    return execute(command, log if rank == 0 else Path(log).with_name(f"run.task{rank}.log"), cwd, env)


#: Starts runs: (run, its command) for each -> a future of its outcome per run.
Launcher = Callable[[Sequence[tuple[Run, list[str]]]], list[Future]]


def local_launcher(pool: ThreadPoolExecutor, threads: int) -> Launcher:
    """Each run a subprocess of this machine, ``threads`` OpenMP/MKL threads each."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cwd = os.getcwd()

    def launch(batch: Sequence[tuple[Run, list[str]]]) -> list[Future]:
        return [pool.submit(execute, command, run.log, cwd, env) for run, command in batch]

    return launch


def submitit_launcher(executor: Any, pool: ThreadPoolExecutor, env: Mapping[str, str]) -> Launcher:
    """Each batch of runs ready together one job array of ``executor`` (a submitit executor)."""
    cwd = os.getcwd()

    def launch(batch: Sequence[tuple[Run, list[str]]]) -> list[Future]:
        with executor.batch():
            jobs = [executor.submit(_slurm_task, command, str(run.log), cwd, dict(env)) for run, command in batch]
        for (run, _), job in zip(batch, jobs, strict=True):
            _progress(f"submitted {run.name} as job {job.job_id}")
        return [pool.submit(job.result) for job in jobs]

    return launch


def make_submitit_executor(kind: str, folder: Path, options: argparse.Namespace) -> Any:
    """A submitit executor for ``--executor slurm`` (SLURM) or ``submitit-local`` (submitit's LocalExecutor: the
    same code path as SLURM's, on this machine).

    Raises:
        GridError: submitit is not installed.
    """
    try:
        import submitit
    except ImportError as error:
        raise GridError(f"--executor {kind} needs submitit: pip install 'kd-lightning[sweep]'") from error
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if kind == "slurm" else "local")
    gpus = options.gpus_per_node or 0
    parameters = {
        "name": options.job_name,
        "timeout_min": options.timeout_min or (None if kind == "slurm" else LOCAL_TIMEOUT_MIN),
        "gpus_per_node": gpus,
        "tasks_per_node": max(1, gpus),  # Lightning on SLURM: one task per GPU (ntasks-per-node = devices)
        "nodes": options.nodes,
        "cpus_per_task": options.cpus_per_task,
        "mem_gb": options.mem_gb,
        "slurm_partition": options.partition,
        "slurm_account": options.account,
        "slurm_array_parallelism": options.jobs,
    }
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    return executor


def run_grid(
    grid: Grid,
    launcher: Launcher,
    capacity: int | None,
    results: Path,
    extra: Sequence[str] = (),
    variants: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
) -> list[Run]:
    """Run the unfinished runs of ``grid``, at most ``capacity`` at a time (``None``: all that are ready).

    Finished runs are skipped (their record is added to ``results`` if it lacks it); a run starts once the runs it
    ``needs`` have finished; a failed run does not stop the others (those that need it are not started).
    ``variants`` and ``seeds``: some of the grid's only, in that order (:meth:`Grid.runs`).

    Returns:
        The runs that failed or could not start.
    """
    runs = grid.runs(variants, seeds)
    provenance = _provenance()
    recorded = {(r["variant"], r["seed"]) for r in _read_records(results)}
    for run in runs:
        if run.finished and (run.variant.name, run.seed) not in recorded:
            _append(results, run.record(run.command(extra), None, provenance))
    pending = [run for run in runs if not run.finished]
    done, total, failed = len(runs) - len(pending), len(runs), []
    _progress(f"grid {grid.name}: {total} runs, {done} finished before, {len(pending)} to run; results: {results}")
    running: dict[Future, tuple[Run, list[str], float]] = {}
    while pending or running:
        coming = {run.name for run in pending} | {run.name for run, _, _ in running.values()}
        for run in [run for run in pending if _cannot_start(run, coming)]:
            failed.append(run)
            pending.remove(run)
            _progress(f"not started {run.name}: it needs {', '.join(r.name for r in run.needed)}, not finished")
        ready = [run for run in pending if all(needed.finished for needed in run.needed)]
        room = len(ready) if capacity is None else max(0, capacity - len(running))
        batch = [(run, run.start_command(extra)) for run in ready[:room]]
        for run, command in batch:
            pending.remove(run)
            _progress(f"started {run.name}" + (" (resumes its last.ckpt)" if "--ckpt_path" in command else ""))
        if batch:
            running.update(zip(launcher(batch), ((run, cmd, time.monotonic()) for run, cmd in batch), strict=True))
        if not running:
            continue
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            run, command, started = running.pop(future)
            done += 1
            if not _settle(run, command, future, results, provenance, time.monotonic() - started, f"{done}/{total}"):
                failed.append(run)
    return failed


def _cannot_start(run: Run, coming: set[str]) -> bool:
    """Whether a run needs one that has not finished and will not in this sweep (it failed, or is not part of it)."""
    return any(not needed.finished and needed.name not in coming for needed in run.needed)


def _settle(
    run: Run,
    command: list[str],
    future: Future,
    results: Path,
    provenance: Mapping[str, Any],
    elapsed: float,
    count: str,
) -> bool:
    """Record a run that ended (``count``: how many of the grid's runs have ended); report a failure with the end of
    its log. Returns whether it succeeded."""
    error = future.exception()
    outcome = None if error else future.result()
    if outcome is not None and outcome.returncode == 0 and run.finished:
        _append(results, run.record(command, outcome, provenance))
        shown = ", ".join(f"{m} {v:.4g}" for m, v in _metrics(run).items() if m in run.grid.metrics)
        _progress(f"finished {run.name} in {_duration(elapsed)} ({count}): {shown}")
        return True
    why = f"exit status {outcome.returncode}" if outcome else f"{type(error).__name__}: {error}"
    if outcome is not None and outcome.returncode == 0:
        why = f"no {SUMMARY_FILE} written (interrupted?)"
    _progress(f"FAILED {run.name} after {_duration(elapsed)} ({count}): {why}; the end of {run.log}:")
    print(_indent(_tail(run.log)), flush=True)
    return False


def _metrics(run: Run) -> dict[str, float]:
    return json.loads((run.folder / SUMMARY_FILE).read_text()).get("metrics", {})


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(record, sort_keys=True) + "\n")


def _provenance() -> dict[str, Any]:
    """The commit of the working directory (``git rev-parse HEAD``), whether tracked files differ from it, the date."""
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        dirty = bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"commit": commit, "dirty": dirty, "date": now()}


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _progress(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def dry_run(
    grid: Grid, extra: Sequence[str], variants: Iterable[str] | None, seeds: Iterable[int] | None = None
) -> None:
    """Print each run's state and the command a sweep would run (nothing is started)."""
    for run in grid.runs(variants, seeds):
        state = "finished" if run.finished else "resume" if run.interrupted else "new"
        print(f"{run.name:<30} {state:<9} {'' if run.finished else shlex.join(run.start_command(extra))}")


def build_parser() -> argparse.ArgumentParser:
    """The ``kd-lightning sweep`` options."""
    parser = argparse.ArgumentParser(
        prog="kd-lightning sweep",
        description="Run every run of an experiment grid (variants x seeds) as a `kd-lightning fit` process; skip "
        "finished runs, resume interrupted ones from their last.ckpt, add each finished run to the results file "
        "(JSON lines). Run it again after a stop: it continues. Options after `--` are added to every run's command "
        "(e.g. -- --data.init_args.data_dir /data/ptb).",
        epilog="The grid file: see the documentation of kd_lightning.grid (python -m pydoc kd_lightning.grid).",
    )
    parser.add_argument("grid", type=Path, help="the grid file (YAML)")
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs at a time; local (default 1): each gets cpu_count // jobs threads; slurm: the job arrays' "
        "parallelism (default: no limit)",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local processes (default), SLURM jobs through submitit, or submitit's LocalExecutor (the SLURM code "
        "path on this machine)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print each run's state and command; run nothing")
    parser.add_argument("--results", type=Path, help="the results file (default: <root>/results.jsonl)")
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="run only these variants, in this order within a seed (e.g. the longest first, to fit a time window)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="run only these seeds (of the grid's)")
    slurm = parser.add_argument_group("slurm / submitit-local")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument(
        "--gpus-per-node", type=int, help="GPUs per run (one task per GPU; trainer.devices should match)"
    )
    slurm.add_argument("--nodes", type=int, help="nodes per run")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per task (also its OMP_NUM_THREADS)")
    slurm.add_argument("--mem-gb", type=float, help="memory per node (GB)")
    slurm.add_argument("--timeout-min", type=int, help="time limit per run (minutes)")
    slurm.add_argument("--job-name", default="kd-lightning", help="job name (default kd-lightning)")
    slurm.add_argument("--submitit-folder", type=Path, help="submitit's job files and logs (default <root>/submitit)")
    return parser


def main(argv: Sequence[str]) -> int:
    """``kd-lightning sweep``: returns the exit status (1 when a run failed or could not start).

    Raises:
        GridError: a grid file that cannot be run, ``--jobs`` below 1, submitit missing for a SLURM sweep.
    """
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    options = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if options.jobs is not None and options.jobs < 1:
        raise GridError(f"--jobs must be >= 1, got {options.jobs}")
    grid = Grid.load(options.grid)
    if options.dry_run:
        dry_run(grid, extra, options.variants, options.seeds)
        return 0
    results = options.results or grid.results_file
    waiters = (options.jobs or 1) if options.executor == "local" else WAITERS  # a thread per run waited for
    with ThreadPoolExecutor(max_workers=waiters) as pool:
        launcher, capacity = _launcher(options, grid, pool)
        try:
            failed = run_grid(grid, launcher, capacity, results, extra, options.variants, options.seeds)
        except KeyboardInterrupt:
            _progress("interrupted: waiting for the running runs to stop; the same command resumes the grid")
            return 130
    if failed:
        _progress(f"{len(failed)} run(s) failed or did not start: {', '.join(run.name for run in failed)}")
        return 1
    _progress(f"all runs of {grid.name} finished; the table: kd-lightning report {results}")
    return 0


def _launcher(options: argparse.Namespace, grid: Grid, pool: ThreadPoolExecutor) -> tuple[Launcher, int | None]:
    """The launcher of ``--executor`` and how many runs it may hold at once (``None``: all the ready ones, the job
    array's parallelism being SLURM's business)."""
    if options.executor == "local":
        jobs = options.jobs or 1
        return local_launcher(pool, max(1, (os.cpu_count() or 1) // jobs)), jobs
    threads = {} if options.cpus_per_task is None else {"OMP_NUM_THREADS": str(options.cpus_per_task)}
    executor = make_submitit_executor(options.executor, options.submitit_folder or grid.root / "submitit", options)
    return submitit_launcher(executor, pool, threads), None
