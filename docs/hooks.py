"""MkDocs hooks of the kd-lightning site (``hooks:`` in ``mkdocs.yml``): everything the site generates at build time.

- **API reference**: one page per module of ``kd_lightning`` (found on disk, so a new module gets its page without
  a change here), each a ``::: module`` directive that mkdocstrings renders from the docstrings, added to the
  navigation under "API reference", and an index of the public API (``kd_lightning.__all__``).
- **Notebooks**: the executed copies in ``docs/notebooks/*.ipynb`` (written by ``scripts/execute_notebooks.py``)
  as Markdown pages: markdown cells as they are (their LaTeX rendered like every page's), code cells as Python
  blocks, text outputs as text blocks, figures as PNG files beside the page.
- **Figures**: ``scripts/docs_figures.py`` draws the site's figures from the committed results files.
- **KaTeX** (math rendering without a CDN): the npm package ``katex`` at :data:`KATEX_VERSION`, fetched once with
  ``npm pack`` (checked against :data:`KATEX_INTEGRITY`) into ``build/docs-cache/`` and served from the site itself
  (``assets/katex/``). Where npm cannot reach its registry, point ``KD_LIGHTNING_KATEX_TGZ`` at the package's
  tarball (``katex-<version>.tgz``).

Generated files live in ``build/docs-cache/`` (ignored by git), never in ``docs/``, so ``mkdocs serve`` does not
rebuild in a loop.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.plugins.kd_lightning")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kd_lightning"
CACHE = ROOT / "build" / "docs-cache"
KATEX_VERSION = "0.19.1"
#: npm's ``dist.integrity`` of katex@KATEX_VERSION (``npm view katex@0.19.1 dist.integrity``).
KATEX_INTEGRITY = "sha512-jG8uKntjSEcm2EpQOh0XturpPuuC9r3Sq5HLHdsFdWZT27E672SF19QEi+of0/YeOy15lDgRhKvr5614uRrEfA=="
#: What the site needs of the package: the script, the style sheet and the fonts it names first (woff2).
KATEX_FILES = ("dist/katex.min.js", "dist/katex.min.css", "dist/fonts/*.woff2", "LICENSE")
API_NAV_TITLE = "API reference"
#: Subpackages in the order of the API navigation, with their section titles.
API_SECTIONS = {
    "": "Top level",
    "modules": "Methods (kd_lightning.modules)",
    "callbacks": "Callbacks",
    "data": "Data",
    "models": "Backbones (kd_lightning.models)",
}


# --------------------------------------------------------------------------------------------------------------------
# API reference


def api_modules() -> list[str]:
    """Every public module of the package, dotted, in a stable order (packages before their modules)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if any(part.startswith("_") and part != "__init__" for part in parts) or "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return sorted(set(names), key=lambda name: (name.count(".") > 1, name))


def api_page(module: str) -> str:
    """The Markdown of a module's API page."""
    is_package = (ROOT / module.replace(".", "/") / "__init__.py").is_file()
    if module == "kd_lightning":
        return public_api_page()
    if is_package:  # a subpackage's __init__ only re-exports: its docstring and links to its modules
        children = [m for m in api_modules() if m.rpartition(".")[0] == module]
        links = "\n".join(f"- [`{child}`]({child.rpartition('.')[2]}.md)" for child in children)
        return f"::: {module}\n    options:\n      members: false\n\n## Modules\n\n{links}\n"
    return f"::: {module}\n"


def api_uri(module: str) -> str:
    """``kd_lightning.modules.dups`` -> ``api/kd_lightning/modules/dups.md``; a package -> its ``index.md``."""
    if (ROOT / module.replace(".", "/") / "__init__.py").is_file():
        return "api/" + module.replace(".", "/") + "/index.md"
    return "api/" + module.replace(".", "/") + ".md"


def public_api_page() -> str:
    """The index of ``kd_lightning.__all__``: each name linked to its API page, with its first docstring line."""
    import griffe

    package = griffe.load("kd_lightning", search_paths=[str(ROOT)], docstring_parser=None)
    rows = []
    for name in package.exports or []:
        member = package[name]
        try:
            target = member.final_target if member.is_alias else member
        except Exception:  # an export that cannot be resolved statically: listed without a link
            rows.append(f"| `{name}` | | |")
            continue
        summary = (target.docstring.value.strip().splitlines() or [""])[0] if target.docstring else ""
        summary = summary.replace("|", "\\|")
        module = target.parent.path if target.parent else ""
        rows.append(f"| [`{name}`][{target.path}] | `{module}` | {summary} |")
    table = "\n".join(rows)
    return (
        "::: kd_lightning\n    options:\n      members: false\n      show_root_heading: true\n\n"
        "## The public API\n\n"
        "Everything below is importable from the package itself (`from kd_lightning import DUPSModule`); each "
        "name links to its full reference. The pages in the navigation document every module, the public API "
        "and the building blocks it is made of.\n\n"
        "| name | defined in | summary |\n|---|---|---|\n" + table + "\n"
    )


def api_nav() -> list[Any]:
    """The API section of the navigation: the index, then one group per subpackage."""
    groups: dict[str, list[Any]] = {title: [] for title in API_SECTIONS.values()}
    for module in api_modules():
        if module == "kd_lightning":
            continue
        parts = module.split(".")
        key = parts[1] if len(parts) > 2 or module.replace(".", "/") + "/__init__.py" in _packages() else ""
        title = API_SECTIONS.get(key, API_SECTIONS[""])
        groups[title].append({module: api_uri(module)})
    nav: list[Any] = [{"Public API": api_uri("kd_lightning")}]
    nav.extend({title: pages} for title, pages in groups.items() if pages)
    return nav


def _packages() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")}


# --------------------------------------------------------------------------------------------------------------------
# KaTeX


def katex_dir() -> Path:
    """The cache folder holding ``assets/katex/`` (fetched and checked on first use)."""
    folder = CACHE / f"katex-{KATEX_VERSION}"
    if (folder / "assets" / "katex" / "katex.min.js").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _katex_tarball(Path(tmp))
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != KATEX_INTEGRITY:
            raise PluginError(f"{tarball}: integrity {digest} is not katex@{KATEX_VERSION}'s {KATEX_INTEGRITY}")
        staging = Path(tmp) / "assets" / "katex"
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                name = member.name.removeprefix("package/")
                if member.isfile() and any(Path(name).match(pattern) for pattern in KATEX_FILES):
                    target = staging / name.removeprefix("dist/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        shutil.copytree(staging, folder / "assets" / "katex")
    log.info("KaTeX %s unpacked into %s", KATEX_VERSION, folder)
    return folder


def _katex_tarball(tmp: Path) -> Path:
    given = os.environ.get("KD_LIGHTNING_KATEX_TGZ")
    if given:
        return Path(given)
    npm = shutil.which("npm")
    if npm is None:
        raise PluginError(
            f"the site renders math with KaTeX {KATEX_VERSION}, fetched with npm (not found): install Node.js/npm, "
            f"or set KD_LIGHTNING_KATEX_TGZ to a katex-{KATEX_VERSION}.tgz (npm pack katex@{KATEX_VERSION})"
        )
    result = subprocess.run(
        [npm, "pack", f"katex@{KATEX_VERSION}", "--pack-destination", str(tmp), "--silent"],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    tarball = tmp / f"katex-{KATEX_VERSION}.tgz"
    if result.returncode != 0 or not tarball.is_file():
        raise PluginError(f"npm pack katex@{KATEX_VERSION} failed: {result.stderr.strip()[-800:]}")
    return tarball


# --------------------------------------------------------------------------------------------------------------------
# Notebooks and figures


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def notebook_pages(out: Path) -> list[str]:
    """The executed notebooks as Markdown pages (and their figures) under ``out/notebooks/``; their URIs."""
    import nbformat

    uris = []
    for path in sorted((ROOT / "docs" / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        folder = out / "notebooks"
        folder.mkdir(parents=True, exist_ok=True)
        text = notebook_markdown(notebook, path.stem, folder)
        (folder / f"{path.stem}.md").write_text(text)
        uris.append(f"notebooks/{path.stem}.md")
    return uris


def notebook_markdown(notebook: Any, stem: str, folder: Path) -> str:
    """One notebook as a Markdown page; its PNG outputs are written into ``folder`` as ``<stem>_<n>.png``."""
    meta = notebook.metadata.get("kd_lightning_executed", {})
    head = (
        f'!!! info "Executed copy"\n    This page is `notebooks/{stem}.ipynb` executed top to bottom in '
        f"{meta.get('mode', '?')} mode on {meta.get('date', '?')} (commit `{meta.get('commit', '?')}`, "
        f"{meta.get('machine', '?')}, {meta.get('wall_s', '?')} s) by `scripts/execute_notebooks.py`. "
        f"[Download the executed notebook]({stem}.ipynb).\n\n"
    )
    parts: list[str] = []
    images = 0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
            if index == 0:
                parts.append(head)
            continue
        if cell.cell_type != "code":
            continue
        parts.append(f"```python\n{cell.source}\n```")
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                text = output.text.rstrip()
                if text:
                    parts.append(f"```text\n{text}\n```")
            elif output.output_type in ("display_data", "execute_result"):
                data = output.get("data", {})
                if "image/png" in data:
                    images += 1
                    name = f"{stem}_{images}.png"
                    (folder / name).write_bytes(base64.b64decode(data["image/png"]))
                    parts.append(f"![figure {images} of {stem}]({name})")
                elif "text/plain" in data:
                    parts.append(f"```text\n{data['text/plain'].rstrip()}\n```")
            elif output.output_type == "error":
                parts.append(f"```text\n{output.ename}: {output.evalue}\n```")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Hooks


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    for item in config.nav or []:
        if isinstance(item, dict) and API_NAV_TITLE in item:
            item[API_NAV_TITLE] = api_nav()
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    generated = CACHE / "generated"
    if generated.exists():
        shutil.rmtree(generated)
    generated.mkdir(parents=True)
    uris: list[str] = []
    for module in api_modules():
        uri = api_uri(module)
        (generated / uri).parent.mkdir(parents=True, exist_ok=True)
        (generated / uri).write_text(api_page(module))
        uris.append(uri)
    uris += notebook_pages(generated)
    uris += (
        [str(p.relative_to(generated)) for p in (generated / "notebooks").glob("*.png")]
        if (generated / "notebooks").is_dir()
        else []
    )
    figures = _load_script("docs_figures").make_figures(generated / "figures")
    uris += [f"figures/{p.name}" for p in figures]
    for uri in uris:
        files.append(File(uri, str(generated), config.site_dir, config.use_directory_urls))
    katex = katex_dir()
    for path in sorted((katex / "assets" / "katex").rglob("*")):
        if path.is_file():
            files.append(File(str(path.relative_to(katex)), str(katex), config.site_dir, config.use_directory_urls))
    return files
