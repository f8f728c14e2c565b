"""A frozen network (a teacher, a finished generation): always in eval mode, no gradients, never optimised."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.models.registry import create_backbone

__all__ = ["FrozenTeacher"]


class FrozenTeacher(nn.Module):
    """A frozen teacher network: always in eval mode, run without gradients, left out of every optimizer.

    * ``train()`` is overridden to keep eval mode, so neither Lightning (which before 2.2 put every submodule
      back into train mode after validation) nor a user's ``module.train()`` can update its BatchNorm statistics
      or turn on its dropout.
    * Its parameters have ``requires_grad=False`` (optimizers built from trainable parameters skip them) and its
      forward runs under ``torch.no_grad()``.

    Build it from an ``nn.Module`` (``FrozenTeacher(net)``) or from a backbone name and a checkpoint
    (:meth:`from_checkpoint`). A host module best holds it outside its own module tree, as
    :class:`~kd_lightning.DistillModule` does (see its ``teacher`` property and ``_apply``): then the teacher's weights
    stay out of the host's ``state_dict`` and checkpoints, DDP does not broadcast its buffers, and Lightning does not
    warn about a submodule in eval mode.

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
        raw = read_checkpoint(path, what="teacher checkpoint")
        lightning_format = isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict)
        state = raw["state_dict"] if lightning_format else raw
        hparams = raw.get("hyper_parameters", {}) if lightning_format else {}
        saved = (hparams.get("backbone", backbone), hparams.get("num_classes", num_classes))
        if saved != (backbone, num_classes):
            raise ValueError(
                f"teacher checkpoint {path} holds backbone {saved[0]!r} with num_classes={saved[1]}, but the teacher "
                f"is configured as backbone {backbone!r} with num_classes={num_classes}"
            )
        if backbone_kwargs is None:
            backbone_kwargs = hparams.get("backbone_kwargs") or {}
        network = (factory or _registered_backbone)(backbone, num_classes, backbone_kwargs)
        if any(key.startswith("backbone.") for key in state):
            state = {key.removeprefix("backbone."): v for key, v in state.items() if key.startswith("backbone.")}
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
