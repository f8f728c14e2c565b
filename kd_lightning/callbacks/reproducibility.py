"""Exact resume: the global random state travels in the checkpoint."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from typing_extensions import override

__all__ = ["RNGStateCheckpoint"]


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states (Python, NumPy, torch, CUDA) in checkpoints and restores them on resume.

    Lightning restores weights, optimizer, schedulers and loop counters but not the random state, so random
    augmentation and dropout after a resume would differ from the uninterrupted run. With this callback (on by
    default in the ``kd-lightning`` CLI), a datamodule whose loaders own seeded generators (every kd_lightning
    datamodule), ``num_workers=0`` and ``deterministic=True``, a run resumed from an epoch-boundary checkpoint
    ends with weights bit-identical to the uninterrupted run on CPU. Under DDP every rank restores rank 0's state.
    Mid-epoch resume is not exact (the loader position is not saved).
    """

    @override
    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain types: weights_only loads
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": numpy_state,
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        numpy_state = state_dict["numpy"]
        key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
        np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
