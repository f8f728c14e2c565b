"""Callbacks: reproducibility, generations, diagnostics, NT-ASGD."""

from kd_lightning.callbacks.diagnostics import DistillDiagnostics
from kd_lightning.callbacks.generational import GenerationalKD
from kd_lightning.callbacks.ntasgd import NTASGD
from kd_lightning.callbacks.reproducibility import RNGStateCheckpoint

__all__ = ["NTASGD", "DistillDiagnostics", "GenerationalKD", "RNGStateCheckpoint"]
