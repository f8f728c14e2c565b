"""Errors a user can act on: the sentence that matters, the option it concerns, no 80-line traceback.

:class:`ConfigError` is what the CLI raises when a model, datamodule or trainer cannot be built from a config: its
message names the config section, the class, the check that failed and the options it mentions.
:func:`report` prints such an error (or any check raised by kd-lightning's own code) as the last lines the user
sees; ``KD_LIGHTNING_TRACEBACK=1`` prints the whole traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["TRACEBACK_ENV", "ConfigError", "innermost", "is_user_error", "report", "tidy_parser_message"]

TRACEBACK_ENV = "KD_LIGHTNING_TRACEBACK"
PACKAGE_DIR = Path(__file__).resolve().parent

#: Config sections, found from the object whose method raised (the first match wins).
SECTIONS: tuple[tuple[type, str], ...] = (
    (pl.LightningModule, "model"),
    (pl.LightningDataModule, "data"),
    (pl.Trainer, "trainer"),
    (ModelCheckpoint, "checkpoint"),
    (Callback, "trainer.callbacks"),
    (Logger, "trainer.logger"),
)


class ConfigError(ValueError):
    """A run that cannot be built from its config; the message says what to change."""

    @classmethod
    def from_exception(cls, error: BaseException, config: Mapping[str, Any]) -> ConfigError:
        """The check behind ``error`` (however deeply jsonargparse wrapped it), with its section and options.

        Args:
            error: what building the classes raised.
            config: the subcommand's config (``trainer``, ``model``, ``data``, ``checkpoint`` ...), as plain dicts.
        """
        cause = innermost(error)
        message = str(cause).strip() or type(cause).__name__
        section, owner = _section_of(cause)
        if section is None:
            return cls(message)
        where = f"{section} ({type(owner).__module__.split('.')[0]}.{type(owner).__qualname__})"
        options = list(_options_in(message, section, config))
        lines = [f"{where}: {message}"]
        if options:
            named = ", ".join(f"{key} (now {value!r})" for key, value in options)
            lines.append(f"  the option(s) concerned: {named}; change them in the config or on the command line")
        return cls("\n".join(lines))


def innermost(error: BaseException) -> BaseException:
    """The check behind ``error``: the deepest exception of its chain (``raise ... from``, or raised while handling
    another) that kd-lightning's code raised, else the first exception of the chain."""
    chain = [error]
    while (
        nested := chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
    ) is not None:
        chain.append(nested)
    return next((e for e in reversed(chain) if _raised_here(e) and not isinstance(e, ConfigError)), chain[-1])


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by kd-lightning's code (its innermost frame is in the package)."""
    frames = list(_frames(error))
    return bool(frames) and Path(frames[-1].f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _frames(error: BaseException) -> Iterator[Any]:
    tb = error.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _section_of(error: BaseException) -> tuple[str | None, Any]:
    """The config section whose object was being built or run when ``error`` was raised (outermost first)."""
    for frame in _frames(error):
        owner = frame.f_locals.get("self")
        for kind, section in SECTIONS:
            if isinstance(owner, kind):
                return section, owner
    return None, None


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}")
    else:
        yield prefix, value


def _options_in(message: str, section: str, config: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The options of ``section`` that ``message`` names, by their name or by their (string) value."""
    node: Any = config
    for part in section.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping):
        return
    for key, value in _flatten(node, section):
        name = key.rsplit(".", 1)[-1]
        named = re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None
        valued = isinstance(value, str) and len(value) > 3 and value in message
        if (named or valued) and value is not None and name not in ("class_path", "init_args"):
            yield key, value


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports a mistake in the run's set-up rather than a bug.

    That is a :class:`ConfigError`, Lightning's ``MisconfigurationException``, or a ``ValueError`` / ``OSError``
    (missing file, ...) raised by kd-lightning's own code (its checks).
    """
    cause = innermost(error)
    if isinstance(error, ConfigError) or isinstance(cause, MisconfigurationException):
        return True
    return _raised_here(cause) and isinstance(cause, (ValueError, OSError))


def tidy_parser_message(message: str) -> str:
    """jsonargparse's message without its union-type bookkeeping (subtypes, NoneType, the given value's repr)."""
    noise = (
        "Does not validate against any of the Union subtypes",
        "Subtypes: [",
        "Errors:",
        "- Expected a <class 'NoneType'>",
        "Given value type:",
        "Given value:",
    )
    kept = [line for line in message.splitlines() if not line.strip().startswith(noise)]
    return "\n".join(kept)


def report(error: BaseException, command: str, stream: TextIO | None = None) -> int:
    """Print ``error`` for a user: the traceback only when ``KD_LIGHTNING_TRACEBACK`` is set, the message last.

    Returns:
        The exit status (1).
    """
    stream = stream or sys.stderr
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(error, file=stream)
    else:
        stream.write(f"(the full traceback: {TRACEBACK_ENV}=1 {command} ...)\n")
    cause = error if isinstance(error, ConfigError) else innermost(error)
    stream.write(f"{command}: error: {str(cause).strip() or type(cause).__name__}\n")
    stream.flush()
    return 1
