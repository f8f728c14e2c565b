"""kd-lightning's own commands beside LightningCLI's (``backbones``, ``sweep``, ``report``, ``export``, ``predict``
on image files): what each does and the function that runs it; :func:`kd_lightning.cli.main` dispatches to them."""

from __future__ import annotations

from collections.abc import Callable

from kd_lightning.export import main as export_main
from kd_lightning.models.library import library_models, splittable_families
from kd_lightning.models.lstm_lm import list_language_models
from kd_lightning.models.registry import list_backbones
from kd_lightning.predict import is_lightning_predict
from kd_lightning.predict import main as predict_main
from kd_lightning.report import main as report_main
from kd_lightning.sweep import main as sweep_main

__all__ = ["COMMANDS", "DESCRIPTION", "is_lightning_command", "print_backbones"]


def print_backbones() -> None:
    """``kd-lightning backbones``: the registered backbone names, the language models, then the library families."""
    print("\n".join(list_backbones()))
    print("# language models (kd_lightning.LanguageModelModule and its method variants):")
    print("\n".join(list_language_models()))
    print(
        "# library models, as <library>/<model> (e.g. timm/convnext_atto, torchvision/mobilenet_v3_small); "
        "`kd-lightning backbones <library> [PATTERN]` lists them:"
    )
    for library, families in splittable_families().items():
        print(f"# {library}: branch-based groups can split {', '.join(families)} at their stages")


def _backbones_command(argv: list[str]) -> int | None:
    """``kd-lightning backbones [LIBRARY [PATTERN]] [--help]``."""
    if {"-h", "--help"} & set(argv):
        print(
            "usage: kd-lightning backbones [LIBRARY [PATTERN]]\n"
            f"{COMMANDS['backbones'][0]} With a library (timm or torchvision), its models whose names match the "
            "shell-style PATTERN (default: all), each usable as backbone <library>/<model>."
        )
    elif argv:
        library, pattern = argv[0], argv[1] if len(argv) > 1 else "*"
        print("\n".join(f"{library}/{name}" for name in library_models(library, pattern)))
    else:
        print_backbones()
    return None


#: Commands of kd-lightning's own, beside LightningCLI's: name -> (what it does, the function that does it, given the
#: arguments after the command's name and returning its exit status, None for 0).
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int | None]]] = {
    "backbones": (
        "List the registered backbone names, the language models and the library models (timm, torchvision).",
        _backbones_command,
    ),
    "sweep": (
        "Run an experiment grid (variants x seeds), skipping finished runs, resuming interrupted ones.",
        sweep_main,
    ),
    "report": ("Turn a sweep's results into the paper's table (Markdown, CSV) and validation curves.", report_main),
    "export": (
        "Write a checkpoint's inference network as ONNX, TorchScript or safetensors, with its metadata.",
        export_main,
    ),
    "predict": (
        "Classify image files with a checkpoint (one CSV row per image); with --config, LightningCLI's predict.",
        predict_main,
    ),
}


DESCRIPTION = "Knowledge distillation with PyTorch Lightning. Its own commands besides these: " + "; ".join(
    f"`kd-lightning {name}`: {text}" for name, (text, _) in COMMANDS.items()
)


def is_lightning_command(argv: list[str]) -> bool:
    """Whether ``argv`` is a LightningCLI subcommand that shares its name with one of :data:`COMMANDS`: ``predict``
    with a config, model, data or trainer option (else it is kd-lightning's prediction on image files)."""
    return argv[0] == "predict" and is_lightning_predict(argv[1:])
