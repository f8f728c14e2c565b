"""The one reader and writer of kd-lightning checkpoints: clear errors on bad files, any checkpoint back as its own
class, the frozen networks a module saves, and the upgrade of checkpoints written by earlier versions.

A kd-lightning checkpoint is a Lightning checkpoint with one more entry, ``checkpoint["kd_lightning"]``:
``class_path`` (the module's class, for :func:`load_module`) and ``frozen`` (``{name: [state_dict, ...]}``: the
networks a module holds outside its module tree and saves, e.g. a ``DistillModule``'s teacher with
``save_teacher=True``, a ``GenerationModule``'s finished generations). The ``kd-lightning`` CLI adds the run's model
and datamodule options under :data:`CONFIG_KEY`.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentParser

from kd_lightning.models.registry import weights_loaded_later

if TYPE_CHECKING:
    from kd_lightning.modules.classifier import ClassifierModule

__all__ = [
    "CONFIG_KEY",
    "CheckpointError",
    "backbone_weights",
    "checkpoint_datamodule",
    "frozen_states",
    "load_module",
    "read_checkpoint",
    "record_module",
    "recorded",
    "saved_data_config",
    "saved_model_config",
    "store_frozen",
    "upgrade",
    "write_module_checkpoint",
]

#: The entry kd-lightning adds to Lightning's checkpoints.
ENTRY = "kd_lightning"

#: The checkpoint entry where the ``kd-lightning`` CLI saves the run's options (``{"model": {...}, "data": {...}}``).
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


def saved_data_config(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The datamodule options (``{"class_path": ..., "init_args": {...}}``) the checkpoint at ``path`` was trained
    with: saved in it by the ``kd-lightning`` CLI, else the ``config.yaml`` of its run folder (beside it or one folder
    up, ``RUN/config.yaml`` for ``RUN/checkpoints/last.ckpt``); None when neither has them."""
    saved = (checkpoint.get(CONFIG_KEY) or {}).get("data")
    if saved:
        return saved
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        config = folder / "config.yaml"
        if config.is_file():
            return (yaml.safe_load(config.read_text()) or {}).get("data")
    return None


def checkpoint_datamodule(checkpoint: dict[str, Any], path: str | Path) -> pl.LightningDataModule | None:
    """The datamodule the checkpoint (read from ``path``) was trained with, built from :func:`saved_data_config`
    (nothing is loaded: a datamodule reads its data in ``setup``); None when the checkpoint does not say."""
    config = saved_data_config(checkpoint, path)
    if config is None:
        return None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True)
    return parser.instantiate(parser.parse_object({"data": config})).data


def record_module(checkpoint: dict[str, Any], module: Any, **info: Any) -> None:
    """Write the kd-lightning entry of ``module``'s checkpoint: its class path (what :func:`load_module` reads) and
    ``info`` (e.g. ``teacher_source="object"``: read back by :func:`recorded`)."""
    cls = type(module)
    checkpoint.setdefault(ENTRY, {}).update(class_path=f"{cls.__module__}.{cls.__qualname__}", **info)


def recorded(checkpoint: dict[str, Any], key: str, default: Any = None) -> Any:
    """What :func:`record_module` wrote under ``key``, else ``default``."""
    return checkpoint.get(ENTRY, {}).get(key, default)


def store_frozen(checkpoint: dict[str, Any], name: str, states: list[dict[str, Any]]) -> None:
    """Save the ``state_dict`` of each frozen network of the group ``name`` (e.g. ``"teacher"``)."""
    checkpoint.setdefault(ENTRY, {}).setdefault("frozen", {})[name] = states


def frozen_states(checkpoint: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The saved ``state_dict`` of each frozen network of the group ``name``; empty when none was saved."""
    return list(checkpoint.get(ENTRY, {}).get("frozen", {}).get(name, []))


#: Classes that moved to another module: the class path an earlier checkpoint records -> today's.
MOVED_CLASSES = {
    f"kd_lightning.modules.okddip.{name}": f"kd_lightning.modules.{home}.{name}"
    for name, home in [
        ("StudentGroupModule", "student_group"),
        ("DMLModule", "group_baselines"),
        ("CLILRModule", "group_baselines"),
        ("ONEModule", "group_baselines"),
    ]
}


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint of an earlier kd-lightning version to the current layout, in place; returns it.

    Earlier versions saved a teacher (``save_teacher``, Snapshot Distillation) as ``teacher.network.*`` keys of the
    ``state_dict`` and a ``GenerationModule``'s finished generations as ``kd_lightning.finished_generations``; both
    are now frozen groups (:func:`frozen_states`); a teacher given as an ``nn.Module`` was a string in the
    hyperparameters, it is now ``teacher_source="object"`` (:func:`recorded`). A ``GenerationModule`` no longer has
    teacher options: their ``None`` values are dropped from its hyperparameters. DUPS's ``num_peers`` is now
    ``peers_per_class``. A class that moved gets its current class path (:data:`MOVED_CLASSES`).
    """
    state = checkpoint.get("state_dict")
    entry = checkpoint.get(ENTRY, {})
    if entry.get("class_path") in MOVED_CLASSES:
        entry["class_path"] = MOVED_CLASSES[entry["class_path"]]
    if isinstance(state, dict) and any(key.startswith("teacher.network.") for key in state):
        keys = [key for key in state if key.startswith("teacher.network.")]
        store_frozen(checkpoint, "teacher", [{key.removeprefix("teacher.network."): state.pop(key) for key in keys}])
    if "finished_generations" in entry:
        store_frozen(checkpoint, "generations", entry.pop("finished_generations"))
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict) and hparams.get("teacher") == "<nn.Module passed from Python>":
        hparams.pop("teacher")
        checkpoint.setdefault(ENTRY, {})["teacher_source"] = "object"
    if entry.get("class_path", "").endswith("DUPSModule") and isinstance(hparams, dict) and "num_peers" in hparams:
        hparams["peers_per_class"] = hparams.pop("num_peers")
    if entry.get("class_path", "").endswith(".GenerationModule") and isinstance(hparams, dict):
        for key in ("teacher", "teacher_backbone", "teacher_checkpoint", "teacher_backbone_kwargs", "save_teacher"):
            if key in hparams and not hparams[key]:
                hparams.pop(key)
    return checkpoint


def backbone_weights(saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(backbone state_dict, hyperparameters)`` of a checkpoint read by :func:`read_checkpoint`.

    ``saved`` is a Lightning checkpoint of any kd_lightning module (its ``backbone.*`` weights are taken, with its
    hyperparameters) or a plain ``state_dict`` of a backbone or of a module holding it as ``backbone`` (no
    hyperparameters).
    """
    lightning_format = isinstance(saved.get("state_dict"), dict)
    state = saved["state_dict"] if lightning_format else saved
    hparams = dict(saved.get("hyper_parameters") or {}) if lightning_format else {}
    if any(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): v for key, v in state.items() if key.startswith("backbone.")}
    return state, hparams


def write_module_checkpoint(path: str | Path, module: Any) -> Path:
    """Save ``module`` (a LightningModule, not training) as a checkpoint :func:`load_module` reads back: its
    ``state_dict``, its hyperparameters and the kd-lightning entry. Returns ``path``."""
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def load_module(path: str | Path, map_location: Any = "cpu", **overrides: Any) -> ClassifierModule:
    """Restore the module saved in a Lightning checkpoint as the subclass that saved it.

    ``ClassifierModule.load_from_checkpoint`` on a subclass's checkpoint would silently drop the subclass's
    arguments; this reads the class path that :meth:`ClassifierModule.on_save_checkpoint` records and calls
    that class's ``load_from_checkpoint`` with the saved hyperparameters (``overrides`` replace some of them).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a checkpoint written by a kd_lightning module.
    """
    checkpoint = upgrade(read_checkpoint(path, map_location))
    info = checkpoint.get(ENTRY)
    if info is None:
        raise CheckpointError(f"{path} is not a checkpoint written by a kd_lightning module (no 'kd_lightning' entry)")
    module_name, _, class_name = info["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    buffer = io.BytesIO()  # the upgraded checkpoint: hyperparameters of an earlier version build today's class
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    with weights_loaded_later():  # the checkpoint's weights replace any pretrained ones: none are read or downloaded
        return cls.load_from_checkpoint(buffer, map_location=map_location, weights_only=False, **overrides)
