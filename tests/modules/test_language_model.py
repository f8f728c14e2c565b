"""Language-model modules: truncated BPTT state, token-weighted perplexity, DUPS (dense and top-k) and KD for LMs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from kd_lightning import (
    FrozenTeacher,
    LanguageModelDistillModule,
    LanguageModelDUPSModule,
    LanguageModelModule,
    PTBDataModule,
)
from kd_lightning.modules.class_targets import ClassTargetTable, TopKClassTargetTable
from tests.data.ptb_fakes import WORDS, write_ptb
from tests.helpers import fast_trainer

VOCAB = len(WORDS) + 1
TINY_LM = {"backbone": "lstm_small", "num_classes": VOCAB, "backbone_kwargs": {"hidden_size": 8}}


def frozen(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.0)


def _data(tmp_path, **kwargs) -> PTBDataModule:
    return PTBDataModule(
        str(write_ptb(tmp_path / "ptb")), **{"batch_size": 3, "eval_batch_size": 2, "bptt": 5, **kwargs}
    )


def _whole_row_nll(module, rows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of every prediction of the rows, the model run over each whole row in one call (eval mode)."""
    module.backbone.eval()
    with torch.no_grad():
        logits, _ = module.backbone(rows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none").view(rows.shape[0], -1)


def test_perplexity_is_exp_of_the_token_weighted_nll_with_a_short_last_window(tmp_path):
    torch.manual_seed(0)
    data, module = _data(tmp_path), LanguageModelModule(**TINY_LM)
    metrics = fast_trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    rows = data.rank_rows("valid", 2)
    assert (rows.shape[1] - 1) % 5 != 0  # the last window is short
    nll = _whole_row_nll(module, rows)
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    assert metrics["val/loss"] == pytest.approx(nll.mean().item(), rel=1e-4)


class _RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_training_carries_the_hidden_state_across_batches_and_validation(tmp_path):
    """With lr 0, batch k+1's loss is the whole-row model's loss on its window: its state continues batch k's, also
    across a validation run in the middle of the epoch (separate states), and it is reset at the epoch start."""
    torch.manual_seed(0)
    data, module = _data(tmp_path), LanguageModelModule(optimizer=frozen, **TINY_LM)
    record = _RecordLosses()
    fast_trainer(tmp_path, max_epochs=2, callbacks=[record], val_check_interval=0.5).fit(module, datamodule=data)
    nll = _whole_row_nll(module, data.rank_rows("train", 3))
    per_window = [nll[:, i : i + 5].mean().item() for i in range(0, nll.shape[1], 5)]
    assert record.losses == pytest.approx(per_window * 2, rel=1e-4)


def test_language_model_checks_the_vocabulary_size(tmp_path):
    module = LanguageModelModule(**{**TINY_LM, "num_classes": VOCAB + 1})
    with pytest.raises(ValueError, match=f"num_classes={VOCAB + 1} but the datamodule PTBDataModule has {VOCAB}"):
        fast_trainer(tmp_path).validate(module, datamodule=_data(tmp_path), verbose=False)


@pytest.mark.parametrize("table_topk", [None, 4])
def test_dups_for_language_models_collects_the_word_table_and_distills(tmp_path, table_topk):
    torch.manual_seed(0)
    module = LanguageModelDUPSModule(num_stages=2, table_topk=table_topk, **TINY_LM)
    fast_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(module, datamodule=_data(tmp_path))
    table = module.class_targets
    assert isinstance(table, ClassTargetTable if table_topk is None else TopKClassTargetTable)
    targets = table.targets if table_topk is None else table.dense()
    seen = table.has_target
    assert seen.sum() >= VOCAB - 1  # every word that is some position's next word
    torch.testing.assert_close(targets[seen].sum(-1), torch.ones(int(seen.sum())))
    batch = next(iter(_data(tmp_path).setup("fit") or module.trainer.datamodule.train_dataloader()))
    module.train()
    losses = module.training_losses(batch)
    assert set(losses) == {"ce", "kd"} and torch.isfinite(losses["kd"])


def test_dups_for_language_models_rejects_recompute():
    with pytest.raises(ValueError, match="online only"):
        LanguageModelDUPSModule(statistics="recompute", **TINY_LM)


def test_kd_for_language_models_runs_the_teacher_with_its_own_state(tmp_path):
    """The teacher reads the student's windows with its own carried state: its logits over the epoch's windows are
    those of the teacher run over whole rows."""
    torch.manual_seed(0)
    teacher_module = LanguageModelModule(**TINY_LM)
    data = _data(tmp_path)
    module = LanguageModelDistillModule(teacher=teacher_module.backbone, target_kind="topk", topk=3, **TINY_LM)
    seen: list[torch.Tensor] = []
    module.teacher_logits = lambda x, original=module.teacher_logits: seen.append(original(x)) or seen[-1]
    fast_trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=data)
    rows = data.rank_rows("train", 3)
    with torch.no_grad():
        whole, _ = module.teacher.network(rows[:, :-1])
    windows = [w.view(3, -1, VOCAB) for w in seen]
    torch.testing.assert_close(torch.cat(windows, dim=1), whole)


def test_kd_for_language_models_loads_a_language_model_teacher_checkpoint(tmp_path):
    teacher = LanguageModelModule(**TINY_LM)
    path = tmp_path / "teacher.ckpt"
    trainer = fast_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(teacher, datamodule=_data(tmp_path))
    trainer.save_checkpoint(path)
    student = LanguageModelDistillModule(
        teacher_backbone="lstm_small",
        teacher_checkpoint=str(path),
        teacher_backbone_kwargs={"hidden_size": 8},
        **TINY_LM,
    )
    torch.testing.assert_close(student.teacher.network.classifier.weight, teacher.backbone.classifier.weight)
    with pytest.raises(ValueError, match="cache_teacher_topk is not supported for language models"):
        LanguageModelDistillModule(cache_teacher_topk=5, **TINY_LM)


def test_resume_keeps_the_top_k_table_statistics(tmp_path):
    """A checkpoint written in the statistics epoch holds the merged top-k statistics (pending additions merged)."""
    torch.manual_seed(0)
    module, data = LanguageModelDUPSModule(num_stages=2, table_topk=4, **TINY_LM), _data(tmp_path)
    data.setup("fit")
    steps = len(data.train_dataloader())  # stop at the end of epoch 0, the statistics epoch of stage 0
    fast_trainer(tmp_path, max_epochs=2, max_steps=steps, limit_val_batches=0).fit(module, datamodule=data)
    table = module.class_targets
    assert table._pending  # tiny data: below the merge threshold, still buffered
    state = module.state_dict()
    assert not table._pending and state["class_targets.stat_values"].sum() > 0
    fresh = LanguageModelDUPSModule(num_stages=2, table_topk=4, **TINY_LM)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.class_targets.finalize(), table.finalize())
    torch.testing.assert_close(fresh.class_targets.dense(), table.dense())


def test_frozen_teacher_passes_a_state_through():
    network = LanguageModelModule(**TINY_LM).backbone
    teacher = FrozenTeacher(network)
    logits, state = teacher(torch.zeros(2, 3, dtype=torch.long), None)
    assert logits.shape == (2, 3, VOCAB) and not logits.requires_grad and len(state) == 2
