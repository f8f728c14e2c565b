"""Execute the notebooks of ``notebooks/`` and write the executed copies that the documentation site shows.

The notebooks are committed without outputs (``tests/test_notebooks.py`` checks that and runs each one in smoke
mode). The site shows what each one draws from a *full* run: this script executes every notebook top to bottom in
full mode (or ``--smoke``) with nbclient, in a kernel of this interpreter, in a temporary working directory, with
matplotlib's inline backend (figures embedded as PNG), and writes the result to ``docs/notebooks/<name>.ipynb``
together with when, at which commit and in which mode it ran. ``tests/test_docs.py`` checks that every executed copy
has the same cells (sources) as its stripped notebook, so a notebook changed without re-running this script fails
the suite.

    .venv/bin/python scripts/execute_notebooks.py                 # all six, full mode (about 20-30 min on 2 cores)
    .venv/bin/python scripts/execute_notebooks.py 02_dups_dynamics.ipynb --smoke   # one, seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = ROOT / "notebooks"
EXECUTED_DIR = ROOT / "docs" / "notebooks"
#: Written into the executed copy's metadata.
METADATA_KEY = "kd_lightning_executed"


class _ThisPython(KernelSpecManager):
    """Every kernel name resolves to an ipykernel of this interpreter (as in ``tests/test_notebooks.py``)."""

    env: dict[str, str] = {}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3 (ipykernel)",
            language="python",
            env=self.env,
        )


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("+changes" if dirty.strip() else "")
    except OSError:
        return "unknown"


def execute(name: str, smoke: bool, out_dir: Path) -> Path:
    """Execute ``notebooks/<name>`` and write the executed copy into ``out_dir``; returns its path."""
    notebook = nbformat.read(SOURCE_DIR / name, as_version=4)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if smoke:
        env["KD_LIGHTNING_NOTEBOOK_SMOKE"] = "1"
    specs = _ThisPython()
    specs.env = env
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kd-lightning-nb-") as workdir:
        kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
        client = nbclient.NotebookClient(
            notebook, km=kernel, timeout=3600, startup_timeout=180, resources={"metadata": {"path": workdir}}
        )
        client.execute()
    wall = time.monotonic() - start
    for cell in notebook.cells:  # volatile per-cell timings would make every re-run a diff
        cell.metadata.pop("execution", None)
    notebook.metadata[METADATA_KEY] = {
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "mode": "smoke" if smoke else "full",
        "wall_s": round(wall, 1),
        "machine": f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    nbformat.write(notebook, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: every notebook in notebooks/)")
    parser.add_argument("--smoke", action="store_true", help="smoke mode: tiny data, seconds, meaningless numbers")
    parser.add_argument("--out", type=Path, default=EXECUTED_DIR, help=f"output folder (default: {EXECUTED_DIR})")
    options = parser.parse_args(argv)
    names = options.names or sorted(path.name for path in SOURCE_DIR.glob("*.ipynb"))
    for name in names:
        path = execute(name, options.smoke, options.out)
        meta = nbformat.read(path, as_version=4).metadata[METADATA_KEY]
        print(f"{name}: {meta['mode']} run in {meta['wall_s']:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
