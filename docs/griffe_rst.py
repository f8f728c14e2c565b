"""A Griffe extension: kd-lightning's reStructuredText-flavoured docstrings as the Markdown mkdocstrings renders.

The docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``), which mkdocstrings parses, but their prose uses
a few reStructuredText constructs that Markdown would show raw. Before mkdocstrings parses a docstring, this
extension rewrites, in every docstring of the package:

- list items whose continuation is aligned with the item's text (2 or 3 spaces) re-indented by 4, as Markdown needs;
- ``.. math::`` blocks (the directive line and its indented continuation) into ``$$ ... $$`` display math;
- ``:math:`x``` into ``$x$`` inline math (both rendered by ``pymdownx.arithmatex`` and KaTeX);
- the cross-reference roles (``:class:``, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``,
  ``:obj:``; ``~`` shows the last name only, ``title <target>`` a title) into a link to the object's API page
  when the target is a kd-lightning object (absolute, or relative to the docstring's class/module), else into
  inline code (``torch.nn.Module``: no inventory is fetched, the build stays offline);
- a paragraph ending in ``::`` (a literal block follows) into one ending in ``:``;
- an ``Args:`` entry naming several parameters (``a, b, c: text``) into one entry per parameter, as Google style
  expects.

Double-backquoted ````code```` is already a Markdown code span. Targets that look like kd-lightning objects but
resolve to nothing are collected in :data:`UNRESOLVED` and logged (``mkdocs build --verbose`` shows them), so a
stale reference can be found without failing the build.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import griffe

_log = logging.getLogger("mkdocs.plugins.kd_lightning.griffe_rst")

#: (object path, reference target) of every kd-lightning reference that resolved to no object.
UNRESOLVED: list[tuple[str, str]] = []

ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|data|mod|exc|obj|const):`(?P<body>[^`]+)`")
MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
LITERAL_END = re.compile(r"(?<=\S)::[ \t]*$")
PACKAGE = "kd_lightning"


def _math_blocks(text: str) -> str:
    """``.. math::`` directives (first line and indented continuation) as ``$$`` blocks at the directive's indent."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["rest"].strip()] if match["rest"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if not lines[i].strip():  # a blank line ends the block unless more indented math follows
                following = next((line for line in lines[i:] if line.strip()), "")
                if len(following) - len(following.lstrip()) <= len(indent):
                    break
            body.append(lines[i].strip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        # Markdown nests blocks by 4 spaces: a directive indented by 2 or 3 (under "* " or "2. ") would make the
        # "$$" lines a lazy paragraph continuation, so round the indentation down to a multiple of 4.
        indent = " " * (len(indent.expandtabs(4)) // 4 * 4)
        out.extend([f"{indent}$$", *(f"{indent}{line}" for line in body if line), f"{indent}$$"])
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


SECTION = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Attributes|Other Parameters):[ \t]*$")
SHARED_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:,[ \t]*\w+)+):(?P<rest>.*)$")


LIST_ITEM = re.compile(r"^(?P<indent> *)(?:\d+\.|[*+-]) +(?=\S)")


def _reindent_lists(text: str) -> str:
    """Continuation lines of a list item aligned with its text (``2. text`` / ``* text``: 3 or 2 spaces) re-indented
    by 4 spaces from the marker, as Markdown needs to keep a later paragraph or block inside the item."""
    out: list[str] = []
    item: tuple[int, int] | None = None  # (column of the item's text, column Markdown needs)
    for line in text.splitlines():
        match = LIST_ITEM.match(line)
        lead = len(line) - len(line.lstrip(" "))
        if match and (item is None or len(match["indent"]) <= item[1] - 4):  # a deeper "+ b" is continuation
            if item is not None and out and out[-1].strip() and not LIST_ITEM.match(out[-1]):
                out.append("")  # the next item after a paragraph of the previous one: not a lazy continuation
            item = (match.end(), len(match["indent"]) + 4)
        elif line.strip() and item is not None:
            if lead >= item[0]:
                line = " " * (lead - item[0] + item[1]) + line.lstrip(" ")
            else:
                item = None
        out.append(line)
    return "\n".join(out)


def _split_shared_entries(text: str) -> str:
    """``a, b: text`` inside an ``Args:``-like section -> ``a: text`` and ``b: text`` (continuation lines repeated)."""
    lines = text.splitlines()
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        header = SECTION.match(line)
        if header:
            section_indent = len(header["indent"])
        elif line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None
        entry = SHARED_ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        block = [entry["rest"]]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
            block.append("\n" + lines[i])
            i += 1
        for name in (n.strip() for n in entry["names"].split(",")):
            out.append(f"{entry['indent']}{name}:{''.join(block)}")
    return "\n".join(out)


def _scopes(obj: griffe.Object) -> list[griffe.Object]:
    """The object itself (when it has members), then its parents up to the package."""
    scopes = []
    current: Any = obj
    while current is not None:
        if current.is_class or current.is_module:
            scopes.append(current)
        current = current.parent
    return scopes


def _canonical(found: Any) -> str | None:
    try:
        target = found.final_target if found.is_alias else found
        return target.path if target.path.startswith(PACKAGE) else None
    except (griffe.AliasResolutionError, griffe.CyclicAliasError, AttributeError, KeyError):
        return None


def resolve(obj: griffe.Object, package: griffe.Module, target: str) -> str | None:
    """The canonical path of the kd-lightning object ``target`` names from ``obj``'s docstring, or ``None``."""
    target = target.lstrip("~.").removesuffix("()")
    if target == PACKAGE:
        return PACKAGE
    if target.startswith(PACKAGE + "."):
        try:
            return _canonical(package[target[len(PACKAGE) + 1 :]])
        except (KeyError, ValueError, griffe.AliasResolutionError):
            return None
    for scope in _scopes(obj):
        try:
            return _canonical(scope[target])
        except (KeyError, ValueError, griffe.AliasResolutionError):
            pass
    head, _, rest = target.partition(".")
    for scope in _scopes(obj):
        try:
            path = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            continue
        if path and path.startswith(PACKAGE):
            return resolve(obj, package, f"{path}.{rest}" if rest else path) if path != target else None
    return None


def _roles(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    def link(match: re.Match[str]) -> str:
        body = match["body"].strip()
        title_match = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        target = title_match["target"] if title_match else body
        shown = title_match["title"] if title_match else body.lstrip("~").lstrip(".")
        if not title_match and body.startswith("~"):
            shown = shown.rsplit(".", 1)[-1]
        if match["role"] in ("func", "meth") and not shown.endswith(")") and not title_match:
            shown += "()"
        path = resolve(obj, package, target)
        if path is None:
            name = target.lstrip("~.")
            if name.startswith(PACKAGE) or name.split(".")[0] not in _EXTERNAL:
                UNRESOLVED.append((obj.path, target))
                _log.debug("unresolved reference %r in the docstring of %s", target, obj.path)
            return f"`{shown}`"
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    return ROLE.sub(link, text)


#: Top-level names of libraries whose references become plain code without a lookup.
_EXTERNAL = {
    "torch",
    "lightning",
    "torchvision",
    "torchmetrics",
    "jsonargparse",
    "numpy",
    "np",
    "nn",
    "F",
    "pl",
    "timm",
    "onnx",
    "scipy",
    "matplotlib",
    "submitit",
    "tensorboard",
    "safetensors",
    "PIL",
    "math",
    "os",
    "pathlib",
    "typing",
    "collections",
    "dataclasses",
    "argparse",
    "json",
    "re",
    "logging",
    "warnings",
}


def convert(text: str, obj: griffe.Object, package: griffe.Module) -> str:
    """The docstring ``text`` of ``obj`` with the reStructuredText constructs rewritten as Markdown."""
    text = _reindent_lists(text)
    text = _math_blocks(text)
    text = _split_shared_entries(text)
    text = MATH_ROLE.sub(lambda m: f"${m['body'].strip()}$", text)
    text = _roles(text, obj, package)
    return "\n".join(LITERAL_END.sub(":", line) for line in text.splitlines())


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj, pkg)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
        if UNRESOLVED:
            _log.info("%d docstring references to kd-lightning objects resolved to nothing", len(UNRESOLVED))
