"""Frozen networks (a teacher, a finished generation): built, frozen, held outside the module tree, moved with
the module, saved and restored, in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.checkpoints import backbone_weights, frozen_states, read_checkpoint, store_frozen
from kd_lightning.models.registry import create_backbone, weights_loaded_later

__all__ = ["FrozenNetworks", "FrozenTeacher"]


class FrozenTeacher(nn.Module):
    """A frozen teacher network: always in eval mode, run without gradients, left out of every optimizer.

    * ``train()`` is overridden to keep eval mode, so neither Lightning (which before 2.2 put every submodule
      back into train mode after validation) nor a user's ``module.train()`` can update its BatchNorm statistics
      or turn on its dropout.
    * Its parameters have ``requires_grad=False`` (optimizers built from trainable parameters skip them) and its
      forward runs under ``torch.no_grad()``.

    Build it from an ``nn.Module`` (``FrozenTeacher(net)``) or from a backbone name and a checkpoint
    (:meth:`from_checkpoint`). A method module holds it in its :class:`FrozenNetworks` (``module.frozen``), outside
    its module tree.

    Args:
        network: the teacher; ``network(x)`` returns ``(B, K)`` logits.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_checkpoint(
        cls,
        backbone: str,
        num_classes: int,
        checkpoint: str | Path,
        backbone_kwargs: dict[str, Any] | None = None,
        factory: Callable[[str, int, dict[str, Any]], nn.Module] | None = None,
    ) -> FrozenTeacher:
        """A registered backbone with the weights of a checkpoint.

        ``checkpoint`` is a Lightning checkpoint of any kd_lightning module (its ``backbone.*`` weights are taken,
        so a distilled student can teach in turn) or a plain ``state_dict`` of the backbone (or of a module holding
        it as ``backbone``). ``backbone_kwargs=None`` takes the checkpoint's own ``backbone_kwargs`` hyperparameter
        when it has one. ``factory(backbone, num_classes, backbone_kwargs)`` builds the network (default: the backbone
        registry; a language model's teacher passes its module's ``build_backbone``).

        Raises:
            FileNotFoundError: no file at ``checkpoint``.
            CheckpointError: the file is not a checkpoint (see :func:`~kd_lightning.checkpoints.read_checkpoint`).
            ValueError: the checkpoint holds another backbone or another number of classes (the message names
                both), or its weights do not fit.
        """
        path = Path(checkpoint)
        state, hparams = backbone_weights(read_checkpoint(path, what="teacher checkpoint"))
        saved = (hparams.get("backbone", backbone), hparams.get("num_classes", num_classes))
        if saved != (backbone, num_classes):
            raise ValueError(
                f"teacher checkpoint {path} holds backbone {saved[0]!r} with num_classes={saved[1]}, but the teacher "
                f"is configured as backbone {backbone!r} with num_classes={num_classes}"
            )
        if backbone_kwargs is None:
            backbone_kwargs = hparams.get("backbone_kwargs") or {}
        with weights_loaded_later():  # the checkpoint's weights replace any pretrained ones
            network = (factory or _registered_backbone)(backbone, num_classes, backbone_kwargs)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"teacher checkpoint {path} does not fit backbone {backbone!r} with num_classes={num_classes} "
                f"(backbone_kwargs={backbone_kwargs}): {error}"
            ) from error
        return cls(network)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stays in eval mode whatever ``mode`` is (the guard against being switched to training)."""
        return super().train(False)

    def forward(self, x: Tensor, *args: Any) -> Any:
        """Teacher logits (and whatever else the network returns, e.g. a language model's state), without gradients."""
        with torch.no_grad():
            return self.network(x, *args)

    @property
    def classifier_weight(self) -> Tensor:
        """``(K, D)`` weight of the teacher's last layer (the backbone contract's ``classifier``)."""
        holder = self.network if hasattr(self.network, "classifier") else self.network.backbone
        return holder.classifier.weight


def _registered_backbone(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    return create_backbone(name, num_classes, **kwargs)


class FrozenNetworks:
    """The frozen networks a module holds outside its module tree, in named groups (``"teacher"``,
    ``"generations"``): every method with a teacher keeps it here (``ClassifierModule.frozen``).

    Outside the tree a network stays out of the module's ``state_dict()``, out of DDP's buffer broadcasts, out of
    ``module.train()`` / ``module.apply()`` and of Lightning's eval-mode check; the module's ``_apply`` moves and casts
    it with the module (:meth:`apply`: ``.to(device)``, ``.half()`` ...). A group set with ``save=True`` is written
    into the module's checkpoints (:meth:`save`, :func:`~kd_lightning.checkpoints.store_frozen`) and read back by
    :meth:`saved_states`; the others are rebuilt from the module's hyperparameters.
    """

    def __init__(self) -> None:
        self._groups: dict[str, tuple[FrozenTeacher, ...]] = {}
        self._saved: set[str] = set()

    def set(
        self, name: str, networks: Sequence[nn.Module], device: torch.device | str | None = None, save: bool = False
    ) -> tuple[FrozenTeacher, ...]:
        """Hold ``networks`` (each frozen, as a :class:`FrozenTeacher`) as the group ``name``, on ``device``;
        ``save``: write them into checkpoints. An empty sequence removes the group. Returns the group."""
        group = tuple(n if isinstance(n, FrozenTeacher) else FrozenTeacher(n) for n in networks)
        if device is not None:
            for network in group:
                network.to(device)
        self._groups[name] = group
        self._saved.discard(name)
        if save:
            self._saved.add(name)
        return group

    def get(self, name: str) -> tuple[FrozenTeacher, ...]:
        """The group ``name`` (empty if unset)."""
        return self._groups.get(name, ())

    def first(self, name: str) -> FrozenTeacher | None:
        """The first network of the group ``name``, or None."""
        group = self.get(name)
        return group[0] if group else None

    def __iter__(self) -> Iterator[FrozenTeacher]:
        """Every network held, each once."""
        seen: set[int] = set()
        for group in self._groups.values():
            for network in group:
                if id(network) not in seen:
                    seen.add(id(network))
                    yield network

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> None:
        """Apply ``fn`` to the tensors of every network (what ``nn.Module._apply`` does for the module's own)."""
        for network in self:
            network._apply(fn, recurse)

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Write the groups set with ``save=True`` into ``checkpoint`` (each network's backbone ``state_dict``)."""
        for name in sorted(self._saved):
            store_frozen(checkpoint, name, [network.network.state_dict() for network in self.get(name)])

    @staticmethod
    def saved_states(checkpoint: dict[str, Any], name: str) -> list[dict[str, Any]]:
        """The ``state_dict`` of each network of the group ``name`` saved in ``checkpoint`` (empty if none)."""
        return frozen_states(checkpoint, name)
