"""SnapshotDistillModule: the end-of-cycle snapshot teaches the next cycle."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from kd_lightning import RNGStateCheckpoint, SnapshotDistillModule, load_module
from kd_lightning.data import SyntheticDataModule
from tests.helpers import TINY_SYNTHETIC, fast_trainer, tiny_mlp_kwargs
from tests.modules.test_dups import FixedLogits, _kl


class InStageOne(SnapshotDistillModule):
    def current_stage(self) -> int:
        return 1


def test_kd_term_matches_hand_computation():
    student, teacher = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], [[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]]
    module = InStageOne(backbone="mlp", num_classes=3, temperature=2.0)
    module.backbone = FixedLogits(torch.tensor(student))
    module.frozen.set("teacher", [FixedLogits(torch.tensor(teacher))])
    losses = module.training_losses((torch.zeros(2, 1), torch.tensor([0, 1])))

    def softmax(z: list[float]) -> list[float]:
        norm = sum(math.exp(v / 2.0) for v in z)
        return [math.exp(v / 2.0) / norm for v in z]

    kl = sum(_kl(softmax(t), s, 2.0) for s, t in zip(student, teacher, strict=True)) / 2
    assert losses["kd"].item() == pytest.approx(0.2 * 4.0 * kl, rel=1e-5)
    assert module.teacher.network.logits.grad is None


class Snapshots(Callback):
    """The student at the end of each epoch and the teacher at the start of each epoch."""

    def __init__(self) -> None:
        self.students, self.teachers, self.lrs = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.teachers.append(copy.deepcopy(pl_module.teacher.network.state_dict()))
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            assert not pl_module.teacher.training

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.students.append(copy.deepcopy(pl_module.backbone.state_dict()))


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_end_of_cycle_model_teaches_the_next_cycle(tmp_path, tiny_synthetic):
    pl.seed_everything(0)
    module = SnapshotDistillModule(**tiny_mlp_kwargs(), num_stages=2)
    snapshots = Snapshots()
    fast_trainer(tmp_path, max_epochs=4, callbacks=[snapshots]).fit(module, datamodule=tiny_synthetic)
    assert _equal(snapshots.teachers[2], snapshots.students[1])  # stage 1 starts at epoch 2 with epoch 1's model
    assert _equal(snapshots.teachers[3], snapshots.students[1])  # frozen for the whole stage
    assert not _equal(snapshots.students[3], snapshots.students[1])
    assert int(module.teacher_stage) == 1
    assert snapshots.lrs == pytest.approx([0.1, 0.05, 0.1, 0.05])  # a cosine cycle per stage
    assert all(not p.requires_grad for p in module.teacher.parameters())


class CrashAt(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 3:
            raise RuntimeError("simulated crash")


def _fit(root, seed: int, crash: bool = False, ckpt_path=None) -> SnapshotDistillModule:
    pl.seed_everything(seed)
    module = SnapshotDistillModule(**tiny_mlp_kwargs(), num_stages=2)
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True), RNGStateCheckpoint(), *([CrashAt()] if crash else [])]
    trainer = fast_trainer(root, max_epochs=4, deterministic=True, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC), ckpt_path=ckpt_path)
    return module


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_resume_mid_stage_distills_from_the_same_snapshot(tmp_path):
    reference = _fit(tmp_path / "full", seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "crashed", seed=0, crash=True)
    resumed = _fit(tmp_path / "crashed", seed=123, ckpt_path=tmp_path / "crashed" / "last.ckpt")
    assert _same_state(reference, resumed)
    loaded = load_module(tmp_path / "crashed" / "last.ckpt")
    assert type(loaded) is SnapshotDistillModule and int(loaded.teacher_stage) == 1
