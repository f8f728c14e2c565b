"""Methods that read a teacher store: DistillModule (every kind that reads the teacher's output), OKDDip+KD and KD for
language models. The store's files and the recorded views are tested in tests/test_teacher_store.py."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning import DistillModule, LanguageModelDistillModule, LanguageModelModule, OKDDipModule, PTBDataModule
from kd_lightning.data import SyntheticDataModule
from kd_lightning.models.registry import create_backbone
from kd_lightning.teacher_store import TeacherStoreMismatch
from tests.data.ptb_fakes import WORDS, write_ptb
from tests.helpers import TINY_SYNTHETIC, CrashAt, fast_trainer

IN, C = TINY_SYNTHETIC["input_dim"], TINY_SYNTHETIC["num_classes"]
STUDENT = {"backbone": "mlp", "num_classes": C, "backbone_kwargs": {"in_features": IN, "hidden": 16}}
TEACHER_KWARGS = {"in_features": IN, "hidden": 32}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A plain ``state_dict`` of an MLP teacher (random weights: the store only needs its outputs)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(create_backbone("mlp", C, **TEACHER_KWARGS).state_dict(), path)
    return str(path)


def _student(teacher_ckpt: str, store, **kwargs) -> DistillModule:
    teacher = {"teacher_backbone": "mlp", "teacher_checkpoint": teacher_ckpt, "teacher_backbone_kwargs": TEACHER_KWARGS}
    return DistillModule(**teacher, teacher_store=None if store is None else str(store), **{**STUDENT, **kwargs})


def _count_teacher_calls(module) -> list[int]:
    calls: list[int] = []
    module.teacher.network.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


class _RecordRows(Callback):
    """The store rows of every training batch, per epoch."""

    def __init__(self) -> None:
        self.rows: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())


# ----------------------------------------------------------------------------------------------- DistillModule
def test_k_equal_to_the_classes_and_one_draw_give_the_live_teachers_gradients(tmp_path, teacher_ckpt):
    """On data without augmentation, the stored exact distribution (float16) trains as the live teacher does."""
    stored = _student(teacher_ckpt, tmp_path / "store", store_draws=1, store_topk=C, alpha=0.7, temperature=3.0)
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    fast_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(stored, datamodule=data)
    live = _student(teacher_ckpt, None, alpha=0.7, temperature=3.0)
    live.load_state_dict(stored.state_dict())
    x, y, rows = next(iter(data.train_dataloader()))
    gradients = []
    for module, batch in ((stored, (x, y, rows)), (live, (x, y))):
        module.zero_grad()
        losses = module.training_losses(batch)
        sum(losses.values()).backward()
        gradients.append([p.grad.clone() for p in module.backbone.parameters()])
    for a, b in zip(*gradients, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["kd", "topk", "pt", "pt+sim", "pt+rel"])
def test_every_kind_that_reads_the_teacher_reads_it_from_the_store(tmp_path, teacher_ckpt, kind):
    module = _student(teacher_ckpt, tmp_path / "store", store_draws=1, store_topk=C, target_kind=kind, topk=2)
    calls, data = _count_teacher_calls(module), SyntheticDataModule(**TINY_SYNTHETIC)
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert len(calls) == TINY_SYNTHETIC["num_train"] // TINY_SYNTHETIC["batch_size"]  # the build pass only
    x, y, rows = next(iter(data.train_dataloader()))
    torch.testing.assert_close(_dense(module.stored_targets(y, rows)), module.teacher_targets(x, y), atol=2e-3, rtol=0)


def _dense(target) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        return target
    values, indices, rest = target
    return rest[:, None].expand(-1, C).clone().scatter_(1, indices, values)


def test_a_second_run_reads_the_store_and_another_temperature_is_refused(tmp_path, teacher_ckpt):
    store, data = tmp_path / "store", SyntheticDataModule(**TINY_SYNTHETIC)
    fast_trainer(tmp_path, limit_val_batches=0).fit(_student(teacher_ckpt, store, store_draws=2), datamodule=data)
    again = _student(teacher_ckpt, store, store_draws=2)
    calls = _count_teacher_calls(again)
    fast_trainer(tmp_path, limit_val_batches=0).fit(again, datamodule=data)
    assert calls == []
    with pytest.raises(TeacherStoreMismatch, match=r"temperature: 2\.0 for this run, 4\.0 in the store"):
        fast_trainer(tmp_path).fit(_student(teacher_ckpt, store, store_draws=2, temperature=2.0), datamodule=data)


def test_resume_picks_the_same_draws(tmp_path, teacher_ckpt):
    def run(root, crash_at=None, ckpt_path=None) -> _RecordRows:
        pl.seed_everything(0)
        record = _RecordRows()
        callbacks = [record, ModelCheckpoint(dirpath=root, save_last=True)]
        if crash_at is not None:
            callbacks.append(CrashAt(crash_at))
        trainer = fast_trainer(root, max_epochs=3, limit_val_batches=0, enable_checkpointing=True, callbacks=callbacks)
        module = _student(teacher_ckpt, tmp_path / "store", store_draws=3)
        trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC), ckpt_path=ckpt_path)
        return record

    full = run(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", crash_at=2)
    resumed = run(tmp_path / "crashed", ckpt_path=tmp_path / "crashed" / "last.ckpt")
    assert resumed.rows[2] == full.rows[2] and full.rows[1] != full.rows[2]
    assert {row % 3 for row in full.rows[2]} == {0, 1, 2}  # every draw is used


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_kind": "ls"}, "teacher_store stores the teacher's outputs: it serves the target kinds that read"),
        ({"target_kind": "topk", "topk": 3, "store_topk": 2}, "reads topk=3 entries: store_topk must be >= it, got 2"),
        ({"store_draws": 0}, "store_draws >= 1 and store_topk >= 1, got 0 and 5"),
    ],
)
def test_bad_store_options(teacher_ckpt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _student(teacher_ckpt, "store", **{"store_topk": 5, **kwargs})


def test_a_store_needs_a_datamodule_that_serves_its_views(tmp_path, teacher_ckpt):
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=32)
    with pytest.raises(ValueError, match="teacher_store needs a datamodule that serves the store's views"):
        fast_trainer(tmp_path).fit(_student(teacher_ckpt, tmp_path / "store"), train_dataloaders=loader)
    with pytest.raises(ValueError, match="teacher_store stores a teacher's outputs: give teacher_backbone"):
        OKDDipModule(teacher_store="store", **STUDENT)


# ------------------------------------------------------------------------------------------------------ OKDDip+KD
def test_okddip_teacher_term_reads_the_store(tmp_path, teacher_ckpt):
    teacher = {"teacher_backbone": "mlp", "teacher_checkpoint": teacher_ckpt, "teacher_backbone_kwargs": TEACHER_KWARGS}
    module = OKDDipModule(num_students=3, teacher_store=str(tmp_path / "store"), store_draws=2, **teacher, **STUDENT)
    calls = _count_teacher_calls(module)
    trainer = fast_trainer(tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC))
    assert len(calls) == TINY_SYNTHETIC["num_train"] // TINY_SYNTHETIC["batch_size"]  # the build pass only
    assert "train/teacher_kd" in trainer.callback_metrics


# ------------------------------------------------------------------------------------------------ language models
def test_language_model_store_holds_the_teachers_next_word_distributions(tmp_path):
    vocab = len(WORDS) + 1
    tiny_lm = {"backbone": "lstm_small", "num_classes": vocab, "backbone_kwargs": {"hidden_size": 8}}
    torch.manual_seed(0)
    teacher = LanguageModelModule(**tiny_lm).backbone
    data = PTBDataModule(str(write_ptb(tmp_path / "ptb")), batch_size=3, eval_batch_size=2, bptt=5)
    module = LanguageModelDistillModule(
        teacher=teacher, teacher_store=str(tmp_path / "store"), store_topk=vocab, **tiny_lm
    )
    calls = _count_teacher_calls(module)
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    windows = len(data.train_dataloader())
    assert len(calls) == windows  # the build pass only
    rows = data.rank_rows("train", 3)
    with torch.no_grad():
        whole, _ = teacher.eval()(rows[:, :-1])  # the teacher over whole rows: its state carried
    positions = data.store_positions(0, 1)
    stored = _dense_lm(module.stored_teacher.targets(positions), vocab)
    torch.testing.assert_close(stored, (whole.flatten(0, 1) / 4.0).softmax(-1), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="language-model windows are deterministic: a teacher store has one draw"):
        data.teacher_store_layout(2)


def _dense_lm(target, vocab: int) -> torch.Tensor:
    values, indices, rest = target
    return rest[:, None].expand(-1, vocab).clone().scatter_(1, indices, values)
