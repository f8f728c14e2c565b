"""The documentation site: its runnable blocks run, it builds strictly, and what it shows stays in step with the code.

- Every page under ``docs/`` may mark code blocks runnable with the README's markers (``<!-- runnable -->`` or
  ``<!-- runnable: EXTRA ARGS -->`` right before the fence); they run exactly as the README's do
  (``tests/test_readme.py``: tiny settings, a sandbox directory, the user's environment). A block identical to one of
  the README's is run once, by ``tests/test_readme.py``.
- ``mkdocs build --strict`` succeeds (broken links, missing API objects and warnings fail it), and the built pages
  hold rendered math markup, not raw reStructuredText or LaTeX delimiters.
- The executed notebooks the site shows (``docs/notebooks/*.ipynb``) have the cells of the stripped notebooks.
- The figure script draws every figure from the committed results files.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tests.test_readme as readme_test
from tests.test_readme import Block, runnable_blocks, sandbox  # noqa: F401  (sandbox: a fixture, used by name)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Commands that must stay runnable on the site (the README's list: the site is the reference once the README is
#: the front door).
SITE_REQUIRED = readme_test.REQUIRED


def _all_blocks() -> list[tuple[str, Block]]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        name = str(page.relative_to(ROOT))
        try:
            blocks += [(name, block) for block in runnable_blocks(page.read_text())]
        except ValueError as error:  # the README's message names README.md: name the page instead
            raise ValueError(f"{name}: {error}") from None
    return blocks


ALL_BLOCKS = _all_blocks()
#: The blocks to run here: those the README's test does not run already.
README_RUNS = {(block.lines, block.extra) for block in readme_test.BLOCKS}
PAGE_BLOCKS = [(name, block) for name, block in ALL_BLOCKS if (block.lines, block.extra) not in README_RUNS]


def test_the_site_marks_every_required_command():
    marked = "\n".join(" ".join(words) for _, block in ALL_BLOCKS for words in block.commands())
    missing = [command for command in SITE_REQUIRED if command not in marked]
    assert not missing, f"no runnable block of docs/ runs {missing}"


@pytest.mark.parametrize("block", [b for _, b in PAGE_BLOCKS], ids=[f"{n}:{b.line}" for n, b in PAGE_BLOCKS])
def test_runnable_page_block(block: Block, sandbox: Path, capsys: pytest.CaptureFixture[str]):  # noqa: F811
    readme_test.test_runnable_block(block, sandbox, capsys)


# --------------------------------------------------------------------------------------------------------------------
# The site builds, strictly, and shows rendered math


def _nav_pages(nav: list) -> set[str]:
    pages: set[str] = set()
    for item in nav:
        if isinstance(item, str):
            pages.add(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    generated = {p for p in nav - pages if not p.startswith(("api/", "notebooks/"))}
    assert generated == set(), "nav entries without a page"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` into a temporary folder, as CI and ``make docs`` run it."""
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return site


@pytest.mark.slow
def test_the_site_builds_strictly(built_site: Path):
    for page in (
        "index.html",
        "methods/dups/index.html",
        "api/kd_lightning/modules/dups/index.html",
        "notebooks/02_dups_dynamics/index.html",
        "benchmarks/index.html",
        "results/index.html",
    ):
        assert (built_site / page).is_file(), page
    for asset in (
        "assets/katex/katex.min.js",
        "assets/katex/katex.min.css",
        "figures/overhead_images.png",
        "figures/ptb_table5_curves.png",
    ):
        assert (built_site / asset).is_file(), asset
    assert list((built_site / "assets/katex/fonts").glob("*.woff2")), "KaTeX's fonts are not served"


@pytest.mark.slow
def test_math_and_references_are_rendered_not_raw(built_site: Path):
    api = (built_site / "api/kd_lightning/modules/dups/index.html").read_text()
    assert "DUPSModule" in api and 'class="arithmatex"' in api
    for raw in (".. math::", ":class:`", ":math:`", ":func:`", ":meth:`"):
        assert raw not in api, f"raw reStructuredText {raw!r} on the DUPSModule page"
    method = (built_site / "methods/dups/index.html").read_text()
    assert method.count('class="arithmatex"') >= 4 and "$$" not in method
    assert re.search(
        r'<a [^>]*href="[^"]*api/kd_lightning/modules/dups/#kd_lightning\.modules\.dups\.DUPSModule"', method
    )
    for page in built_site.rglob("*.html"):
        text = page.read_text()
        assert "cdn.jsdelivr" not in text and "unpkg.com" not in text, f"{page} loads from a CDN"


# --------------------------------------------------------------------------------------------------------------------
# Executed notebooks, figures, the docstring conversion


def test_executed_notebooks_match_the_notebooks():
    nbformat = pytest.importorskip("nbformat")
    for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
        executed = DOCS / "notebooks" / source.name
        assert executed.is_file(), f"run: python scripts/execute_notebooks.py {source.name}"
        a, b = nbformat.read(source, as_version=4), nbformat.read(executed, as_version=4)
        cells = [(c.cell_type, c.source) for c in a.cells]
        assert cells == [(c.cell_type, c.source) for c in b.cells], (
            f"{executed.relative_to(ROOT)} is not an execution of {source.relative_to(ROOT)}: run "
            f"python scripts/execute_notebooks.py {source.name}"
        )
        assert b.metadata["kd_lightning_executed"]["mode"] == "full", f"{executed.name}: executed in smoke mode"
        assert any(o.get("output_type") for c in b.cells if c.cell_type == "code" for o in c.outputs)
        assert not any(o.get("output_type") == "error" for c in b.cells if c.cell_type == "code" for o in c.outputs)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_figures_are_drawn_from_the_results_files(tmp_path: Path):
    pytest.importorskip("matplotlib")
    figures = _load(ROOT / "scripts" / "docs_figures.py", "docs_figures")
    paths = figures.make_figures(tmp_path)
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.iterdir())
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_rst_docstrings_become_markdown():
    griffe = pytest.importorskip("griffe")
    rst = _load(DOCS / "griffe_rst.py", "griffe_rst")
    package = griffe.load("kd_lightning", search_paths=[str(ROOT)], docstring_parser=None)
    dups = package["modules.dups.DUPSModule"]
    text = rst.convert(
        "Loss :math:`T^2` of :class:`~kd_lightning.DUPSModule`, :func:`torch.nn.functional.kl_div`.\n\n"
        ".. math:: a = b\n    + c\n\nArgs:\n    x, y: shared\n        text.\n\nExample::\n\n    code\n",
        dups,
        package,
    )
    assert "$T^2$" in text
    assert (
        '<autoref identifier="kd_lightning.modules.dups.DUPSModule" optional><code>DUPSModule</code></autoref>' in text
    )
    assert "`torch.nn.functional.kl_div()`" in text
    assert "$$\na = b\n+ c\n$$" in text
    assert "    x: shared\n        text.\n    y: shared\n        text." in text
    assert "Example:\n" in text and "::" not in text
    listed = rst.convert(
        "1. One.\n2. Two\n   text\n\n   .. math:: x\n       + y\n\n   more.\n3. Three.\n", dups, package
    )
    assert listed == "1. One.\n2. Two\n    text\n\n    $$\n    x\n    + y\n    $$\n\n    more.\n\n3. Three."
