"""The one reader of kd-lightning checkpoints: clear errors on bad files, any checkpoint back as its own class."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kd_lightning.modules.classifier import ClassifierModule

__all__ = ["CONFIG_KEY", "CheckpointError", "load_module", "read_checkpoint", "saved_model_config"]

#: The checkpoint entry where the ``kd-lightning`` CLI saves the run's model options (``{"model": {...}}``).
CONFIG_KEY = "kd_lightning_config"

#: What :func:`read_checkpoint` accepts, as its error messages say it.
EXPECTED = "a file written by torch.save: a Lightning checkpoint (.ckpt) or a state_dict"


class CheckpointError(ValueError):
    """A file that is not a checkpoint, or not the checkpoint that was expected; the message names the path."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> dict[str, Any]:
    """The dictionary saved in ``path`` (a Lightning checkpoint or a ``state_dict``), read on ``map_location``.

    Args:
        path: the file.
        map_location: passed to :func:`torch.load`.
        what: how the messages call the file (e.g. "teacher checkpoint").

    Raises:
        FileNotFoundError: no file at ``path`` (a directory is named as such).
        CheckpointError: the file is not readable by :func:`torch.load` (a text file, random bytes, a truncated
            checkpoint) or does not hold a dictionary.
    """
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what} {path} is a directory; expected {EXPECTED}")
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # UnpicklingError, EOFError, RuntimeError (truncated zip), ...: all mean "not one"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{what} {path} ({path.stat().st_size} bytes) is not readable by torch.load; expected {EXPECTED} "
            f"({type(error).__name__}: {reason})"
        ) from error
    if not isinstance(saved, dict):
        raise CheckpointError(f"{what} {path} holds a {type(saved).__name__}; expected {EXPECTED}")
    return saved


def saved_model_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model options a checkpoint was trained with, as ``{"class_path": ..., "init_args": {...}}``.

    The whole model config where the ``kd-lightning`` CLI saved it (optimizer and schedule included), else the
    module's hyper-parameters (what ``save_hyperparameters`` kept) and the class recorded by kd_lightning modules.
    """
    if CONFIG_KEY in checkpoint:
        return checkpoint[CONFIG_KEY]["model"]
    init_args = dict(checkpoint.get("hyper_parameters") or {})
    init_args.pop("_instantiator", None)
    class_path = init_args.pop("_class_path", None) or (checkpoint.get("kd_lightning") or {}).get("class_path")
    return {"class_path": class_path, "init_args": init_args} if class_path else {"init_args": init_args}


def load_module(path: str | Path, map_location: Any = "cpu", **overrides: Any) -> ClassifierModule:
    """Restore the module saved in a Lightning checkpoint as the subclass that saved it.

    ``ClassifierModule.load_from_checkpoint`` on a subclass's checkpoint would silently drop the subclass's
    arguments; this reads the class path that :meth:`ClassifierModule.on_save_checkpoint` records and calls
    that class's ``load_from_checkpoint`` with the saved hyperparameters (``overrides`` replace some of them).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a checkpoint written by a kd_lightning module.
    """
    checkpoint = read_checkpoint(path, map_location)
    info = checkpoint.get("kd_lightning")
    if info is None:
        raise CheckpointError(f"{path} is not a checkpoint written by a kd_lightning module (no 'kd_lightning' entry)")
    module_name, _, class_name = info["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=False, **overrides)
