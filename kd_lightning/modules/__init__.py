"""Method modules: one LightningModule per method, all built on :class:`ClassifierModule`."""

from kd_lightning.modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
