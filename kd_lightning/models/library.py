"""Backbones from timm and torchvision by name: ``timm/<model>`` and ``torchvision/<model>``.

Any timm model (``timm.create_model``) and any torchvision classification model (``torchvision.models.get_model``)
whose last layer is an ``nn.Linear`` is a backbone: ``backbone: timm/convnext_atto``,
``backbone: torchvision/mobilenet_v3_small``. :class:`LibraryBackbone` rearranges the library's own modules into the
backbone contract (:mod:`kd_lightning.models.registry`), so the library's weights load as they are and its own
forward runs unchanged:

* ``classifier``: the model's final linear layer (timm's ``get_classifier()``, torchvision's last ``nn.Linear``);
* ``stem`` and ``stages``: the modules before and of each stage, for the families whose layout is known
  (:data:`TIMM_LAYOUTS`, :data:`TORCHVISION_LAYOUTS`, :data:`TORCHVISION_FEATURE_FAMILIES`), so that branch-based
  groups (ONE, OKDDip, CL-ILR) can share ``stem + stages[:k]``; the other families are one stage, the whole network,
  and a branch-based group refuses them (:attr:`~kd_lightning.models.registry.Backbone.unsplittable_reason`);
* ``head``: the model itself, its stem, stages and classifier taken out (emptied): what the library's forward does
  after the last stage (final convolution or norm, pooling, timm's pre-logits, dropout).

Pretrained weights: ``pretrained=True`` uses the library's own mechanism (timm's hub download, torchvision's
``weights=``; a torchvision weights name such as ``"IMAGENET1K_V1"`` too); ``pretrained_file`` reads a file instead
(a ``state_dict`` of the library's model saved with ``torch.save``, or a ``.safetensors`` file), for machines
without internet. Either way the classifier is replaced by a new one when the class count differs. Inside
:func:`~kd_lightning.models.registry.weights_loaded_later` neither is loaded (the caller loads a checkpoint's).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision import models as tv_models
from torchvision.models import WeightsEnum
from torchvision.ops.misc import Conv2dNormActivation

from kd_lightning.models.registry import Backbone, pretrained_weights_wanted, register_backbone_family

__all__ = [
    "TIMM_LAYOUTS",
    "TORCHVISION_FEATURE_FAMILIES",
    "TORCHVISION_LAYOUTS",
    "Layout",
    "LibraryBackbone",
    "library_models",
    "read_weights",
    "resolve_weights",
    "splittable_families",
    "timm_backbone",
    "torchvision_backbone",
]

#: Input of the models whose library gives none (torchvision's ImageNet classifiers).
IMAGENET_INPUT = (3, 224, 224)


class Layout(NamedTuple):
    """Where a library model's stem and stages are: dotted module paths, in the order the forward runs them.

    Attributes:
        stem: the modules before the first stage.
        stages: the modules of each stage (several for one stage: run one after the other).
    """

    stem: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]


#: timm families split at their stages, by model class: (stem modules, stage modules). A single stage name is a
#: container whose children are the stages.
TIMM_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ConvNeXt": (("stem",), ("stages",)),
    "EfficientNet": (("conv_stem", "bn1"), ("blocks",)),
    "MobileNetV3": (("conv_stem", "bn1"), ("blocks",)),  # also timm's MobileNetV4
    "RegNet": (("stem",), ("s1", "s2", "s3", "s4")),
    "ResNet": (("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4")),
}
#: torchvision families split at their stages, by model class, as :data:`TIMM_LAYOUTS`.
TORCHVISION_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "RegNet": (("stem",), ("trunk_output",)),
    "ResNet": (("conv1", "bn1", "relu", "maxpool"), ("layer1", "layer2", "layer3", "layer4")),
    "ShuffleNetV2": (("conv1", "maxpool"), ("stage2", "stage3", "stage4")),
}
#: torchvision families built as ``features`` (stem first): a stage starts at every block that downsamples; a final
#: 1x1 convolution belongs to the head.
TORCHVISION_FEATURE_FAMILIES = ("ConvNeXt", "EfficientNet", "MobileNetV2", "MobileNetV3")


def splittable_families() -> dict[str, list[str]]:
    """The model classes of each library whose stages are known (branch-based groups can use them)."""
    return {
        "timm": sorted(TIMM_LAYOUTS),
        "torchvision": sorted({*TORCHVISION_LAYOUTS, *TORCHVISION_FEATURE_FAMILIES}),
    }


class LibraryBackbone(Backbone):
    """A timm or torchvision model rearranged into ``stem -> stages -> head -> classifier`` (see the module docstring).

    Attributes:
        name: the backbone name, e.g. ``"timm/convnext_atto"``.
        library_keys: this backbone's ``state_dict`` keys -> the library model's own (see :meth:`library_state_dict`).

    Args:
        name: the backbone name (for messages).
        model: the library's model; its modules are taken over (the model is changed in place).
        classifier: dotted path of the model's final linear layer.
        layout: where its stem and stages are; None: the whole network is one stage.
        input_shape: shape of one input sample.

    Raises:
        ValueError: the final layer is not an ``nn.Linear``.
    """

    def __init__(
        self, name: str, model: nn.Module, classifier: str, layout: Layout | None, input_shape: tuple[int, ...]
    ) -> None:
        super().__init__()
        original = {id(tensor): key for key, tensor in model.state_dict(keep_vars=True).items()}
        final = _take(model, classifier, nn.Identity())
        if not isinstance(final, nn.Linear):
            raise ValueError(
                f"backbone {name!r} ends in a {type(final).__name__} ({classifier}), not an nn.Linear: the backbone "
                "contract (features (B, D) and a linear classifier) does not fit it"
            )
        if layout is None:
            self.stem = nn.Sequential()
            self.stages = nn.ModuleList([model])
            self.head = nn.Identity()
            self.unsplittable_reason = _unsplittable(name, model)
        else:
            self.stem = nn.Sequential(*(_take(model, path, nn.Sequential()) for path in layout.stem))
            self.stages = nn.ModuleList(
                _in_sequence([_take(model, path, nn.Sequential()) for path in stage]) for stage in layout.stages
            )
            self.head = model
        self.classifier = final
        self.name = name
        self.input_shape = tuple(input_shape)
        self.library_keys = {key: original[id(t)] for key, t in self.state_dict(keep_vars=True).items()}

    def library_state_dict(self) -> dict[str, Tensor]:
        """The weights under the library model's own keys: what ``timm.create_model(model, num_classes=C)`` or
        ``torchvision.models.get_model(model, num_classes=C)`` loads with ``load_state_dict``."""
        return {self.library_keys[key]: value for key, value in self.state_dict().items()}


def _take(model: nn.Module, path: str, replacement: nn.Module) -> nn.Module:
    """The submodule at ``path``, replaced in ``model`` by ``replacement``."""
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    module = parent.get_submodule(attribute)
    setattr(parent, attribute, replacement)
    return module


def _in_sequence(modules: list[nn.Module]) -> nn.Module:
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def _unsplittable(name: str, model: nn.Module) -> str:
    families = "; ".join(f"{library}: {', '.join(names)}" for library, names in splittable_families().items())
    return (
        f"backbone {name!r} ({type(model).__name__}) is one stage for kd-lightning, which splits these families at "
        f"their stages ({families}): use a network-based group (network_based=True) or one of those families"
    )


def _layout(model: nn.Module, table: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> Layout | None:
    """The layout of ``model`` from ``table`` (by class name), None for a class it lacks."""
    entry = table.get(type(model).__name__)
    if entry is None:
        return None
    stem, stages = entry
    if len(stages) == 1:  # a container of stages
        stages = tuple(f"{stages[0]}.{child}" for child, _ in model.get_submodule(stages[0]).named_children())
    return Layout(stem, tuple((path,) for path in stages))


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in module.modules())


def _features_layout(model: nn.Module) -> Layout:
    """The stem (``features.0``) and stages of a torchvision ``features`` model (see
    :data:`TORCHVISION_FEATURE_FAMILIES`)."""
    blocks = list(model.features.named_children())[1:]
    if isinstance(blocks[-1][1], Conv2dNormActivation):
        blocks = blocks[:-1]
    stages: list[list[str]] = []
    for child, block in blocks:
        if not stages or _downsamples(block):
            stages.append([])
        stages[-1].append(f"features.{child}")
    return Layout(("features.0",), tuple(tuple(stage) for stage in stages))


def _not_found(kind: str, model: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(model, known, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ValueError(f"unknown {kind} model {model!r}{hint} (`kd-lightning backbones {kind}` lists them)")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The ``state_dict`` in ``path``: a ``.safetensors`` file, or a file of ``torch.save`` holding a ``state_dict``
    (or a dictionary with it under ``"state_dict"`` or ``"model"``).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pretrained_file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def _load_file(model: nn.Module, path: str, classifier: str, name: str) -> None:
    """Load ``path`` into ``model``; classifier weights of another shape (another class count) are left out.

    Raises:
        ValueError: other weights are missing from the file, or it holds weights the model lacks.
    """
    state = read_weights(path)
    own = model.state_dict()
    prefix = f"{classifier}."
    replaced = [k for k in state if k.startswith(prefix) and (k not in own or own[k].shape != state[k].shape)]
    for key in replaced:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (replaced and k.startswith(prefix))]
    if missing or unexpected:
        raise ValueError(
            f"pretrained_file {path} does not fit {name}: {len(missing)} weights missing ({', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}); expected a state_dict of that model"
        )


def _check_pretrained(pretrained: bool | str, pretrained_file: str | None, name: str) -> None:
    if pretrained and pretrained_file is not None:
        raise ValueError(f"{name}: give pretrained or pretrained_file, not both")


def _import_timm(name: str) -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"backbone {name!r} needs timm: install the `timm` extra, pip install 'kd-lightning[timm]'"
        ) from error
    return timm


@register_backbone_family("timm")
def timm_backbone(
    model: str, num_classes: int, pretrained: bool = False, pretrained_file: str | None = None, **model_kwargs: Any
) -> LibraryBackbone:
    """The timm model ``model`` (e.g. ``convnext_atto``, or with a weights tag ``convnext_atto.d2_in1k``).

    Args:
        model: a name of ``timm.list_models()``.
        num_classes: outputs of the classifier.
        pretrained: timm's pretrained weights (downloaded from the Hugging Face hub by timm).
        pretrained_file: a ``state_dict`` of the timm model (``torch.save`` or ``.safetensors``), read instead.
        **model_kwargs: further arguments of ``timm.create_model`` (``drop_rate``, ``drop_path_rate`` ...).

    Raises:
        ImportError: timm is not installed (the message names the extra).
        ValueError: an unknown model (the message gives close names), both ``pretrained`` and ``pretrained_file``,
            a file that does not fit, or a model without a linear classifier.
    """
    name = f"timm/{model}"
    timm = _import_timm(name)
    if not timm.is_model(model):
        raise _not_found("timm", model, timm.list_models())
    _check_pretrained(pretrained, pretrained_file, name)
    wanted = pretrained_weights_wanted()
    net = timm.create_model(model, pretrained=bool(pretrained) and wanted, num_classes=num_classes, **model_kwargs)
    head = net.get_classifier()
    classifier = next((path for path, m in net.named_modules() if m is head), "")
    if not classifier:
        raise ValueError(
            f"backbone {name!r} has no single classifier module (its get_classifier() gives a "
            f"{type(head).__name__}): the backbone contract does not fit it"
        )
    if pretrained_file is not None and wanted:
        _load_file(net, pretrained_file, classifier, name)
    input_shape = tuple(net.pretrained_cfg.get("input_size", IMAGENET_INPUT))
    return LibraryBackbone(name, net, classifier, _layout(net, TIMM_LAYOUTS), input_shape)


def resolve_weights(arch: str, pretrained: bool | str) -> WeightsEnum | None:
    """torchvision weights of ``arch``: None for False, ``DEFAULT`` for True, else the enum member of that name.

    Raises:
        ValueError: ``pretrained`` names no weights of ``arch`` (the message lists the valid names).
    """
    if pretrained is False:
        return None
    weights = tv_models.get_model_weights(arch)
    name = "DEFAULT" if pretrained is True else pretrained
    if name not in weights.__members__:
        valid = ", ".join(weights.__members__)
        raise ValueError(f"unknown weights {pretrained!r} for {arch}; use True, False or one of: {valid}")
    return weights[name]


@register_backbone_family("torchvision")
def torchvision_backbone(
    model: str,
    num_classes: int,
    pretrained: bool | str = False,
    pretrained_file: str | None = None,
    **model_kwargs: Any,
) -> LibraryBackbone:
    """The torchvision classification model ``model`` (e.g. ``mobilenet_v3_small``, ``resnet18``, ``convnext_tiny``).

    Args:
        model: a name of ``torchvision.models.list_models(module=torchvision.models)``.
        num_classes: outputs of the classifier (re-created after loading weights of another class count).
        pretrained: False, True (torchvision's ``DEFAULT`` weights) or a weights name such as ``"IMAGENET1K_V1"``
            (downloaded by torchvision).
        pretrained_file: a ``state_dict`` of the torchvision model (``torch.save`` or ``.safetensors``), read instead.
        **model_kwargs: further arguments of the torchvision builder (``dropout`` ...).

    Raises:
        ValueError: an unknown model or weights name, both ``pretrained`` and ``pretrained_file``, a file that does
            not fit, or a model without a linear classifier.
    """
    name = f"torchvision/{model}"
    known = _torchvision_models()
    if model not in known:
        raise _not_found("torchvision", model, known)
    _check_pretrained(pretrained, pretrained_file, name)
    wanted = pretrained_weights_wanted()
    weights = resolve_weights(model, pretrained) if wanted else None
    if weights is None:
        net = tv_models.get_model(model, weights=None, num_classes=num_classes, **model_kwargs)
    else:
        net = tv_models.get_model(model, weights=weights, **model_kwargs)
    classifier = next((path for path, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), "")
    if not classifier:
        raise ValueError(f"backbone {name!r} has no nn.Linear classifier: the backbone contract does not fit it")
    final = net.get_submodule(classifier)
    if final.out_features != num_classes:
        _take(net, classifier, nn.Linear(final.in_features, num_classes))
    if pretrained_file is not None and wanted:
        _load_file(net, pretrained_file, classifier, name)
    if type(net).__name__ in TORCHVISION_FEATURE_FAMILIES:
        layout = _features_layout(net)
    else:
        layout = _layout(net, TORCHVISION_LAYOUTS)
    return LibraryBackbone(name, net, classifier, layout, IMAGENET_INPUT)


def _torchvision_models() -> list[str]:
    return tv_models.list_models(module=tv_models)


def _timm_models() -> list[str]:
    return _import_timm("timm/<model>").list_models()


#: Every model name of each library.
_LIBRARY_MODELS: dict[str, Callable[[], list[str]]] = {"timm": _timm_models, "torchvision": _torchvision_models}


def library_models(library: str, pattern: str = "*") -> list[str]:
    """The model names of ``library`` (``"timm"`` or ``"torchvision"``) matching the shell-style ``pattern``.

    Raises:
        ValueError: an unknown library.
        ImportError: timm is not installed.
    """
    if library not in _LIBRARY_MODELS:
        raise ValueError(f"unknown library {library!r}; choose among {sorted(_LIBRARY_MODELS)}")
    return sorted(fnmatch.filter(_LIBRARY_MODELS[library](), pattern))
