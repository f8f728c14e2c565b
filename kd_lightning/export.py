"""``kd-lightning export``: the inference network of any method as ONNX, TorchScript or safetensors, with the
metadata a deployment needs.

:func:`inference_network` is what a trained module predicts with, as a plain network (one per method family, see
its docstring): nothing of the training machinery (no teacher, no class-target tables, no peers, no generations
but those asked for). :func:`deployment_metadata` describes its input and output: input shape, mean/std, class names
(when the datamodule has them), the evaluation preprocessing. Each format carries that metadata inside the file, as
one JSON string under the key ``"kd_lightning"``:

* ONNX (``torch.onnx.export``, the ``torch.export`` exporter): a ``metadata_props`` entry (onnxruntime:
  ``session.get_modelmeta().custom_metadata_map["kd_lightning"]``); the batch dimension is dynamic;
* TorchScript (``torch.jit.trace``): the extra file ``kd_lightning.json`` (``torch.jit.load(path, _extra_files=
  {"kd_lightning.json": ""})``); loads with PyTorch alone;
* safetensors: the header's metadata (``safe_open(path, "pt").metadata()``); the weights of a timm or torchvision
  backbone under the library's own keys, so ``timm.create_model(name, num_classes=C)`` /
  ``torchvision.models.get_model(name, num_classes=C)`` load them without kd-lightning.

The exported ONNX and TorchScript networks are checked against PyTorch on the example batch before the command
returns (:data:`TOLERANCE`).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from kd_lightning.checkpoints import checkpoint_datamodule, load_module, read_checkpoint
from kd_lightning.models.library import LibraryBackbone
from kd_lightning.models.registry import Backbone, weights_loaded_later
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.generations import GenerationModule
from kd_lightning.modules.student_group import StudentGroupModule

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "TOLERANCE",
    "Ensemble",
    "ExportFormat",
    "ExportResult",
    "class_names",
    "deployment_metadata",
    "export_checkpoint",
    "inference_network",
    "load_for_inference",
    "main",
]

ExportFormat = Literal["onnx", "torchscript", "safetensors"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
#: The key of the metadata inside every exported file.
METADATA_KEY = "kd_lightning"
#: Largest absolute difference allowed between the exported network's outputs and PyTorch's on the example batch.
TOLERANCE = 1e-4
#: Options of a module that only build its teacher (not needed to predict): cleared when loading for inference.
TEACHER_OPTIONS = ("teacher_backbone", "teacher_checkpoint")


class Ensemble(nn.Module):
    """Networks as one: the log of their mean softmax probability (what the methods evaluate as ``ensemble``)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C)`` log-probabilities: :math:`\\log \\frac{1}{m} \\sum_i \\mathrm{softmax}(z_i)`."""
        log_probs = torch.stack([member(x).float().log_softmax(dim=-1) for member in self.members])
        return log_probs.logsumexp(dim=0) - math.log(len(self.members))


def load_for_inference(path: str | Path, checkpoint: dict[str, Any]) -> ClassifierModule:
    """The module saved in the checkpoint ``checkpoint`` read from ``path``, without its teacher: a teacher given by
    checkpoint is not rebuilt, so the teacher's file need not exist any more.

    Raises:
        CheckpointError: not a kd-lightning checkpoint.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    return load_module(path, **{key: None for key in TEACHER_OPTIONS if hparams.get(key) is not None})


def _copy(module: ClassifierModule, network: nn.Module) -> Backbone:
    """A new backbone of ``module``'s architecture with the weights of ``network`` (the global RNG untouched).

    Raises:
        TypeError: the module's networks are not image-classification backbones (language models).
    """
    hp = module.hparams
    with torch.random.fork_rng(devices=[]), weights_loaded_later():
        copy = module.build_backbone(hp.backbone, module.num_classes, hp.backbone_kwargs or {})
    if not isinstance(copy, Backbone):
        raise TypeError(
            f"{type(module).__name__}'s network is a {type(copy).__name__}: export writes the image classifiers' "
            "backbones (a language model carries its state from window to window)"
        )
    copy.load_state_dict(network.state_dict())
    return copy


def inference_network(
    module: ClassifierModule, student: int | None = None, ensemble: bool = False
) -> tuple[nn.Module, str]:
    """What ``module`` predicts with, as a plain network (weights copied, eval mode, on the CPU), and its description.

    * a group of students (Ind, DML, ONE, CL-ILR, OKDDip): the inference student (OKDDip's leader, or its
      inference peer), or ``student``; ``ensemble``: the peers' ensemble (:class:`Ensemble`);
    * a :class:`~kd_lightning.GenerationModule`: the last generation; ``ensemble``: the generations' ensemble
      (from generation 0, or 1 with ``ensemble_includes_patriarch=False``), as the module evaluates it;
    * any other module (CE, DUPS, Snapshot Distillation, self-distillation, ``DistillModule``'s student): its
      backbone.

    Raises:
        ValueError: ``student`` for a module without students, ``ensemble`` for a module without an ensemble, or
            both.
        TypeError: a language model (see :func:`_copy`).
    """
    if student is not None and ensemble:
        raise ValueError("choose a student or the ensemble, not both")
    if isinstance(module, StudentGroupModule):
        network, what = _group_network(module, student, ensemble)
    elif student is not None:
        raise ValueError(f"{type(module).__name__} has one network: --student is for the group methods")
    elif isinstance(module, GenerationModule):
        network, what = _generations_network(module, ensemble)
    elif ensemble:
        raise ValueError(f"{type(module).__name__} has no ensemble: --ensemble is for groups and generations")
    else:
        network, what = _copy(module, module.backbone), "backbone"
    return network.cpu().eval(), what


def _group_network(module: StudentGroupModule, student: int | None, ensemble: bool) -> tuple[nn.Module, str]:
    """A group's student ``student`` (None: its inference student), or its peers' ensemble."""
    if ensemble:
        peers = module.peer_indices
        return Ensemble([module.export_backbone(i) for i in peers]), f"ensemble of students {peers}"
    index = module.inference_index if student is None else student
    network = module.export_backbone(index)
    return network, f"student {index} ({module.student_name(index % module.num_students)})"


def _generations_network(module: GenerationModule, ensemble: bool) -> tuple[nn.Module, str]:
    """The last generation, or the ensemble of the generations (as the module evaluates it)."""
    if not ensemble:
        return _copy(module, module.backbone), f"generation {module.generation} (the last)"
    members = [*(frozen.network for frozen in module.finished), module.backbone]
    start = 0 if module.hparams.ensemble_includes_patriarch else 1
    if len(members) - start < 2:
        raise ValueError(f"the run has {len(members)} generation(s): no ensemble of two or more to export")
    network = Ensemble([_copy(module, member) for member in members[start:]])
    return network, f"ensemble of generations {start}-{len(members) - 1}"


def class_names(datamodule: pl.LightningDataModule | None) -> list[str] | None:
    """The datamodule's class names (its ``classes``), None when it has none or cannot read them (a folder gone)."""
    try:
        names = getattr(datamodule, "classes", None)
    except (OSError, ValueError) as error:
        warnings.warn(f"no class names in the metadata: the datamodule cannot read them ({error})", stacklevel=3)
        return None
    return [str(name) for name in names] if names is not None else None


def _eval_preprocessing(datamodule: pl.LightningDataModule | None) -> str | None:
    """The datamodule's per-image evaluation transform, as text (its ``repr``)."""
    transform = getattr(datamodule, "evaluation_transform", lambda: None)()
    return None if transform is None else repr(transform)


def deployment_metadata(
    module: ClassifierModule, network: nn.Module, what: str, datamodule: pl.LightningDataModule | None
) -> dict[str, Any]:
    """What a deployment needs to feed ``network`` and read its output.

    Keys: ``method`` (the module's class), ``backbone``, ``network`` (which network of the method), ``library_model``
    (``timm/<name>`` or ``torchvision/<name>`` for a library backbone, else None), ``num_classes``, ``input_shape``
    (``[C, H, W]``, from the datamodule, else the backbone), ``mean`` and ``std`` (the normalisation, None when the
    datamodule has none), ``class_names`` (None when the datamodule has none), ``preprocessing`` (the datamodule's
    evaluation transform, as text) and ``output`` (``"logits"``, or ``"log_probabilities"`` for an ensemble).
    """
    cls = type(module)
    backbone = network.members[0] if isinstance(network, Ensemble) else network
    input_shape = getattr(datamodule, "input_shape", None) or backbone.input_shape
    return {
        "method": f"{cls.__module__}.{cls.__qualname__}",
        "backbone": module.hparams.backbone,
        "network": what,
        "library_model": backbone.name if isinstance(backbone, LibraryBackbone) else None,
        "num_classes": module.num_classes,
        "input_shape": list(input_shape),
        "mean": _floats(getattr(datamodule, "mean", None)),
        "std": _floats(getattr(datamodule, "std", None)),
        "class_names": class_names(datamodule),
        "preprocessing": _eval_preprocessing(datamodule),
        "output": "log_probabilities" if isinstance(network, Ensemble) else "logits",
    }


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _write_onnx(network: nn.Module, example: Tensor, path: Path, metadata: str) -> None:
    import onnx

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        network,
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    model = program.model_proto
    onnx.helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save_model(model, path)


def _run_onnx(path: Path, example: Tensor) -> Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: example.numpy()})[0])


def _write_torchscript(network: nn.Module, example: Tensor, path: Path, metadata: str) -> None:
    with _torchscript_deprecation_ignored():
        traced = torch.jit.trace(network, example)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": metadata})


def _run_torchscript(path: Path, example: Tensor) -> Tensor:
    with _torchscript_deprecation_ignored(), torch.no_grad():
        return torch.jit.load(str(path))(example)


@contextmanager
def _torchscript_deprecation_ignored() -> Iterator[None]:
    """PyTorch deprecates TorchScript (``torch.jit.trace/save/load``); the format asked for still loads wherever
    PyTorch runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


def _write_safetensors(network: nn.Module, example: Tensor, path: Path, metadata: str) -> None:
    from safetensors.torch import save_file

    state = network.library_state_dict() if isinstance(network, LibraryBackbone) else network.state_dict()
    save_file(
        {key: value.detach().clone().contiguous() for key, value in state.items()}, path, {METADATA_KEY: metadata}
    )


#: Each format's writer ``(network, example, path, metadata JSON)`` and, for a runnable format, its runner.
WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}
RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript}


class ExportResult(NamedTuple):
    """What :func:`export_checkpoint` wrote.

    Attributes:
        path: the file.
        metadata: the metadata inside it.
        max_difference: largest absolute difference between the file's outputs and PyTorch's on the example batch
            (None for safetensors, which holds weights only).
    """

    path: Path
    metadata: dict[str, Any]
    max_difference: float | None


def export_checkpoint(
    ckpt_path: str | Path,
    fmt: ExportFormat,
    output: str | Path,
    student: int | None = None,
    ensemble: bool = False,
) -> ExportResult:
    """Write the inference network of the checkpoint at ``ckpt_path`` (see :func:`inference_network`) to ``output``
    in the format ``fmt``, with :func:`deployment_metadata` inside; an ONNX or TorchScript file is run on an example
    batch of two and compared with PyTorch.

    Raises:
        ValueError: an unknown format, the options of :func:`inference_network`, or an exported network whose
            outputs differ from PyTorch's by more than :data:`TOLERANCE`.
        FileNotFoundError, CheckpointError: no checkpoint at ``ckpt_path``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose among {list(FORMATS)}")
    checkpoint = read_checkpoint(ckpt_path)
    module = load_for_inference(ckpt_path, checkpoint)
    network, what = inference_network(module, student, ensemble)
    metadata = deployment_metadata(module, network, what, checkpoint_datamodule(checkpoint, ckpt_path))
    example = torch.randn(2, *metadata["input_shape"], generator=torch.Generator().manual_seed(0))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt](network, example, output, json.dumps(metadata))
    difference = None
    if fmt in RUNNERS:
        with torch.no_grad():
            expected = network(example)
        difference = float((RUNNERS[fmt](output, example) - expected).abs().max())
        if difference > TOLERANCE:
            raise ValueError(
                f"the {fmt} file {output} computes other outputs than PyTorch (max abs difference {difference:.2e} > "
                f"{TOLERANCE:.0e}); the network has operations the exporter does not translate faithfully"
            )
    return ExportResult(output, metadata, difference)


def build_parser() -> argparse.ArgumentParser:
    """The ``kd-lightning export`` options."""
    parser = argparse.ArgumentParser(
        prog="kd-lightning export",
        description="Write the inference network of a kd-lightning checkpoint (the backbone; DistillModule's student; "
        "a group's inference student, OKDDip's leader; a GenerationModule's last generation) as ONNX, TorchScript or "
        "safetensors, with its metadata (input shape, mean/std, class names) inside the file. No teacher, peers or "
        "tables go into it.",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="the checkpoint, e.g. RUN/checkpoints/last.ckpt")
    parser.add_argument("--format", choices=FORMATS, required=True, help="the file format")
    parser.add_argument("--output", type=Path, required=True, help="the file to write")
    parser.add_argument("--student", type=int, help="a group method's student to export (default: its inference one)")
    parser.add_argument(
        "--ensemble", action="store_true", help="export the ensemble (a group's peers, or a run's generations)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """``kd-lightning export``: returns the exit status."""
    options = build_parser().parse_args(list(argv))
    result = export_checkpoint(options.ckpt_path, options.format, options.output, options.student, options.ensemble)
    checked = "" if result.max_difference is None else f" (max abs difference to PyTorch {result.max_difference:.1e})"
    print(f"written: {result.path}: {result.metadata['network']} of {result.metadata['backbone']}{checked}")
    return 0
