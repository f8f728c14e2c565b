"""The notebooks: the expected six, stored without outputs, and each executed top to bottom in smoke mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402  (nbclient's dependency)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_quickstart.ipynb",
    "02_dups_dynamics.ipynb",
    "03_what_kd_transfers.ipynb",
    "04_okddip_diversity.ipynb",
    "05_generations.ipynb",
    "06_self_distillation_views.ipynb",
)
SMOKE_LINE = 'SMOKE = os.environ.get("KD_LIGHTNING_NOTEBOOK_SMOKE") == "1"'
#: Environment of the kernel: smoke mode, no display, one thread (tiny models on a shared CPU are much faster so).
KERNEL_ENV = {"KD_LIGHTNING_NOTEBOOK_SMOKE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


class _ThisPythonKernelSpecs(KernelSpecManager):
    """Every kernel name resolves to an ipykernel of the interpreter running the tests (this virtualenv's python).

    The ``python3`` kernelspec found on a machine may belong to another interpreter, where ``import kd_lightning``
    fails; building the spec from ``sys.executable`` rules that out.
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            env=KERNEL_ENV,
        )


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def test_the_six_notebooks_and_nothing_else():
    assert sorted(path.name for path in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cell"
    assert [cell.outputs for cell in code] == [[]] * len(code), f"{name} is stored with outputs: strip them"
    assert [cell.execution_count for cell in code] == [None] * len(code), f"{name} is stored with execution counts"
    assert notebook.cells[0].cell_type == "markdown", f"{name} starts without its markdown introduction"
    assert SMOKE_LINE in code[0].source, f"the first code cell of {name} must define SMOKE"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom_in_smoke_mode(name, tmp_path):
    notebook = _read(name)
    # An extra last cell (in memory only): the kernel is this interpreter and ran in smoke mode.
    notebook.cells.append(
        nbformat.v4.new_code_cell(f"import sys\nassert sys.executable == {sys.executable!r}\nassert SMOKE")
    )
    kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisPythonKernelSpecs())
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=600, startup_timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    assert list(tmp_path.iterdir()) == [], "the notebook wrote into its working directory"
