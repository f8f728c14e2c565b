"""Shared fixtures."""

from __future__ import annotations

import pytest

from kd_lightning.data import SyntheticDataModule
from tests.helpers import TINY_SYNTHETIC


@pytest.fixture
def tiny_synthetic() -> SyntheticDataModule:
    """A 6-class synthetic datamodule of 192/64/64 samples, 16-d inputs."""
    return SyntheticDataModule(**TINY_SYNTHETIC)
