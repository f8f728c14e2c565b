"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kd_lightning.data import SyntheticDataModule
from tests.data.image_fakes import ANIMALS, write_class_folders
from tests.helpers import TINY_SYNTHETIC


@pytest.fixture
def tiny_synthetic() -> SyntheticDataModule:
    """A 6-class synthetic datamodule of 192/64/64 samples, 16-d inputs."""
    return SyntheticDataModule(**TINY_SYNTHETIC)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Run a test module on one thread (``pytestmark = pytest.mark.usefixtures("single_thread")``): small batches gain
    nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads slow them down 5-10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of class sub-folders, ``<root>/<animal>/img_<k>.jpg``: 8 small JPEGs of each of :data:`ANIMALS`."""
    root = tmp_path_factory.mktemp("images")
    write_class_folders(root, ANIMALS, 8)
    return root
