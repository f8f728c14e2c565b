"""Backbone registry: ``register_backbone`` / ``create_backbone`` / ``list_backbones``.

Every classification backbone honours the contract of DESIGN.md (the timm convention):

* ``stem``: what comes before the first stage;
* ``stages``: an ``nn.ModuleList`` of the network's stages;
* ``head``: what follows the last stage (final norm, activation, pooling, flatten, VGG's FC layers), ending in
  a ``(B, D)`` feature vector;
* ``classifier``: an ``nn.Linear`` from ``D`` to ``num_classes``;
* ``forward_features(x) = head(stages(stem(x)))`` and ``forward(x) = classifier(forward_features(x))``.

:class:`Backbone` implements the two forwards from those four parts, so a network only builds them. Besides the
backbones registered one by one, a family registers a factory for the names ``<family>/<model>``
(:mod:`kd_lightning.models.library`: ``timm/<model>``, ``torchvision/<model>``).
``models/branches.py`` relies on this split to build branch-based students for any registered backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from torch import Tensor, nn

__all__ = [
    "Backbone",
    "create_backbone",
    "he_init_",
    "list_backbones",
    "pretrained_weights_wanted",
    "register_backbone",
    "register_backbone_family",
    "weights_loaded_later",
]


class Backbone(nn.Module):
    """Base class of the backbone contract: ``stem -> stages -> head -> classifier``.

    Subclasses assign ``self.stem``, ``self.stages`` (``nn.ModuleList``), ``self.head`` and ``self.classifier``
    (``nn.Linear``) in ``__init__``; ``num_features`` is the width ``D`` of :meth:`forward_features`.
    """

    stem: nn.Module
    stages: nn.ModuleList
    head: nn.Module
    classifier: nn.Linear
    #: Shape of one input sample, without the batch dimension (used by tests, benchmarks and examples).
    input_shape: tuple[int, ...] = (3, 32, 32)
    #: Why the network cannot be split at its stages (branch-based groups refuse it with this); None: it can.
    unsplittable_reason: str | None = None

    @property
    def num_features(self) -> int:
        """Width ``D`` of the feature vector that feeds the classifier."""
        return self.classifier.in_features

    @property
    def num_classes(self) -> int:
        """Number of outputs of the classifier."""
        return self.classifier.out_features

    def forward_stages(self, x: Tensor) -> Tensor:
        """Input -> output of the last stage (before ``head``)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """Output of the last stage -> ``(B, D)`` features."""
        return self.head(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Input -> ``(B, D)`` features (penultimate layer)."""
        return self.forward_head(self.forward_stages(x))

    def forward(self, x: Tensor) -> Tensor:
        """Input -> ``(B, num_classes)`` logits."""
        return self.classifier(self.forward_features(x))


def he_init_(module: nn.Module) -> None:
    """In place: the He initialisation of the CIFAR reference implementations (He et al. 2015, "Delving Deep").

    As fb.resnet.torch, the WRN and DenseNet Torch code do: convolution weights ~ N(0, 2 / (k * k * C_out))
    (``kaiming_normal_``, ``fan_out``, ReLU gain), batch norms weight 1 and bias 0, linear layers PyTorch's
    default weight; every convolution and linear bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


BackboneFactory = Callable[..., Backbone]
F = TypeVar("F", bound=BackboneFactory)

_REGISTRY: dict[str, BackboneFactory] = {}
#: Backbone families named ``<family>/<model>`` (``timm/convnext_atto``): family -> factory
#: ``fn(model, num_classes, **kw) -> Backbone``.
_FAMILIES: dict[str, Callable[..., Backbone]] = {}
#: False inside :func:`weights_loaded_later`.
_PRETRAINED_WANTED: ContextVar[bool] = ContextVar("kd_lightning_pretrained_wanted", default=True)


def register_backbone(name: str | None = None) -> Callable[[F], F]:
    """Decorator that registers a factory ``fn(num_classes: int, **kw) -> Backbone`` under ``name``.

    Example::

        @register_backbone("my_net")
        def my_net(num_classes: int, width: int = 64) -> Backbone: ...

    Registering a name twice is an error (it would silently change what configs build).
    """

    return registering_decorator(_REGISTRY, "backbone", name)


def registering_decorator(registry: dict[str, Callable], kind: str, name: str | None) -> Callable[[F], F]:
    """The decorator of a ``register_*`` function: stores the factory in ``registry`` under ``name`` (default: the
    factory's own name); registering another factory under a taken name raises a ValueError naming the ``kind``."""

    def decorator(fn: F) -> F:
        key = name or fn.__name__
        if key in registry and registry[key] is not fn:
            raise ValueError(f"{kind} {key!r} is already registered (by {registry[key].__module__})")
        registry[key] = fn
        return fn

    return decorator


def register_backbone_family(family: str) -> Callable[[F], F]:
    """Decorator that registers a factory ``fn(model: str, num_classes: int, **kw) -> Backbone`` for the names
    ``<family>/<model>`` (e.g. ``timm/convnext_atto``): a family of backbones too many to register one by one."""
    return registering_decorator(_FAMILIES, "backbone family", family)


@contextmanager
def weights_loaded_later() -> Iterator[None]:
    """Inside: backbone factories build the architecture without loading pretrained weights, because the caller
    loads its own (a checkpoint's, a snapshot's); no download, no ``pretrained_file`` read."""
    token = _PRETRAINED_WANTED.set(False)
    try:
        yield
    finally:
        _PRETRAINED_WANTED.reset(token)


def pretrained_weights_wanted() -> bool:
    """Whether a factory should load the pretrained weights it is asked for (False inside
    :func:`weights_loaded_later`)."""
    return _PRETRAINED_WANTED.get()


def _ensure_builtin_backbones() -> None:
    # Importing the package registers the built-in backbones; imported lazily to avoid an import cycle.
    import kd_lightning.models  # noqa: F401


def list_backbones() -> list[str]:
    """Sorted names of all registered backbones (the families' models are listed by the families themselves)."""
    _ensure_builtin_backbones()
    return sorted(_REGISTRY)


def create_backbone(name: str, num_classes: int, **kwargs) -> Backbone:
    """Build the registered backbone ``name`` (or the model ``<family>/<model>`` of a registered family) with
    ``num_classes`` outputs.

    Raises:
        ValueError: ``name`` is neither registered nor of a registered family (the message lists the valid names and
            families), or ``num_classes < 1``.
    """
    _ensure_builtin_backbones()
    family, _, model = name.partition("/")
    if name not in _REGISTRY and not (model and family in _FAMILIES):
        families = ", ".join(f"{f}/<model>" for f in sorted(_FAMILIES))
        raise ValueError(
            f"unknown backbone {name!r}; registered backbones: {', '.join(sorted(_REGISTRY))}; and the library models "
            f"{families} (`kd-lightning backbones <family>` lists them)"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    return _FAMILIES[family](model, num_classes=num_classes, **kwargs)
