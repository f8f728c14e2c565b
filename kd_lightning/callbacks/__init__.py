"""Callbacks: reproducibility now; generations and diagnostics come with their methods."""

from kd_lightning.callbacks.diagnostics import DistillDiagnostics
from kd_lightning.callbacks.reproducibility import RNGStateCheckpoint

__all__ = ["DistillDiagnostics", "RNGStateCheckpoint"]
