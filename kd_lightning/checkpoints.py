"""Load any kd_lightning checkpoint back as the class that saved it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from kd_lightning.modules.classifier import ClassifierModule

__all__ = ["load_module"]


def load_module(path: str | Path, map_location: Any = "cpu", **overrides: Any) -> ClassifierModule:
    """Restore the module saved in a Lightning checkpoint as the subclass that saved it.

    ``ClassifierModule.load_from_checkpoint`` on a subclass's checkpoint would silently drop the subclass's
    arguments; this reads the class path that :meth:`ClassifierModule.on_save_checkpoint` records and calls
    that class's ``load_from_checkpoint`` with the saved hyperparameters (``overrides`` replace some of them).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint written by a kd_lightning module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    info = checkpoint.get("kd_lightning") if isinstance(checkpoint, dict) else None
    if info is None:
        raise ValueError(f"{path} is not a checkpoint written by a kd_lightning module (no 'kd_lightning' entry)")
    module_name, _, class_name = info["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=False, **overrides)
