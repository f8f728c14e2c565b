"""Callbacks: reproducibility, generations, diagnostics."""

from kd_lightning.callbacks.diagnostics import DistillDiagnostics
from kd_lightning.callbacks.generational import GenerationalKD
from kd_lightning.callbacks.reproducibility import RNGStateCheckpoint

__all__ = ["DistillDiagnostics", "GenerationalKD", "RNGStateCheckpoint"]
