"""A run resumed from an epoch-boundary checkpoint ends bit-identical to the uninterrupted run (CPU)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning import ClassifierModule, RNGStateCheckpoint
from kd_lightning.data import SyntheticDataModule
from tests.helpers import TINY_SYNTHETIC, CrashAt, fast_trainer, tiny_mlp_kwargs

EPOCHS = 3


class NoisyClassifier(ClassifierModule):
    """Draws from the global RNG every step (like dropout or augmentation), so a lost RNG state shows."""

    def training_losses(self, batch):
        x, y = batch
        return super().training_losses((x + 0.1 * torch.randn_like(x), y))


def _run(tmp_path, seed: int, rng_state: bool, ckpt_path=None, crash_at: int | None = None) -> ClassifierModule:
    pl.seed_everything(seed)
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    module = NoisyClassifier(**tiny_mlp_kwargs())
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    if rng_state:
        callbacks.append(RNGStateCheckpoint())
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = fast_trainer(
        tmp_path, max_epochs=EPOCHS, deterministic=True, callbacks=callbacks, enable_checkpointing=True
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("rng_state", [True, False])
def test_crash_and_resume_is_bit_identical(tmp_path, rng_state):
    reference = _run(tmp_path / "full", seed=0, rng_state=rng_state)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crashed", seed=0, rng_state=rng_state, crash_at=2)
    last = tmp_path / "crashed" / "last.ckpt"
    assert last.is_file()
    # a new process would seed differently: the checkpoint must bring back the random state itself
    resumed = _run(tmp_path / "crashed", seed=123, rng_state=rng_state, ckpt_path=last)
    # without the RNG state in the checkpoint the resumed run draws other noise: this is what the test detects
    assert _same_weights(reference, resumed) is rng_state


def test_datamodule_state_restores_shuffling(tiny_synthetic):
    tiny_synthetic.setup("fit")
    state = tiny_synthetic.state_dict()
    first = [y for _, y in tiny_synthetic.train_dataloader()]
    tiny_synthetic.load_state_dict(state)
    again = [y for _, y in tiny_synthetic.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
