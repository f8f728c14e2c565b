"""NTASGD: the non-monotone trigger of Merity et al.'s Alg. 1, the iterate average, evaluation with it, resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from kd_lightning import NTASGD, LanguageModelModule, PTBDataModule
from tests.data.ptb_fakes import WORDS, write_ptb
from tests.helpers import fast_trainer


def _validate(callback: NTASGD, module: nn.Module, values: list[float]) -> list[int | None]:
    triggered = []
    for epoch, value in enumerate(values):
        trainer = SimpleNamespace(
            sanity_checking=False,
            state=SimpleNamespace(fn=TrainerFn.FITTING),
            current_epoch=epoch,
            callback_metrics={"val/loss": value},
        )
        callback.on_validation_end(trainer, module)
        triggered.append(callback.triggered_at)
    return triggered


def test_triggers_when_no_better_than_the_best_older_than_n_validations():
    module = nn.Linear(2, 1)
    # n = 2: at validation k, compare with min(v_0 .. v_{k-3}); 4.0 at k=3 is worse than v_0 = 3.0
    assert _validate(NTASGD(nonmono=2), module, [3.0, 2.0, 5.0, 4.0]) == [None, None, None, 3]
    # a worse value within the last n validations does not trigger (non-monotone tolerance)
    assert _validate(NTASGD(nonmono=2), module, [5.0, 4.0, 3.0, 4.5, 3.9]) == [None] * 5


def test_average_of_the_iterates_is_used_for_evaluation_and_kept_at_the_end():
    module = nn.Linear(2, 1, bias=False)
    callback = NTASGD(nonmono=1)
    iterates = [torch.tensor([[1.0, 1.0]])]
    with torch.no_grad():
        module.weight.copy_(iterates[0])
    _validate(callback, module, [1.0, 2.0, 3.0])  # triggered at the third validation, averaging from w_0
    for value in (3.0, 5.0, 7.0):  # three optimizer steps
        with torch.no_grad():
            module.weight.fill_(value)
        iterates.append(module.weight.detach().clone())
        callback.on_train_batch_end(None, module)
    mean = torch.stack(iterates).mean(0)
    torch.testing.assert_close(callback.average[0], mean)
    callback.on_test_epoch_start(None, module)
    torch.testing.assert_close(module.weight.detach(), mean)
    callback.on_test_epoch_end(None, module)
    torch.testing.assert_close(module.weight.detach(), iterates[-1])
    callback.on_fit_end(None, module)
    torch.testing.assert_close(module.weight.detach(), mean)
    restored = NTASGD(nonmono=1)
    restored.load_state_dict(callback.state_dict())
    assert restored.triggered_at == 2 and restored.steps == 4 and restored.history == [1.0, 2.0, 3.0]


def test_runs_in_a_trainer_and_rejects_a_missing_metric(tmp_path):
    torch.manual_seed(0)
    data = PTBDataModule(str(write_ptb(tmp_path / "ptb")), batch_size=3, eval_batch_size=2, bptt=5)
    module_kwargs = {"num_classes": len(WORDS) + 1, "backbone_kwargs": {"hidden_size": 8}}
    callback = NTASGD(monitor="val/ppl", nonmono=1)
    fast_trainer(tmp_path, max_epochs=3, callbacks=[callback]).fit(LanguageModelModule(**module_kwargs), data)
    assert len(callback.history) == 3 and all(v > 1 for v in callback.history)
    with pytest.raises(KeyError, match="NTASGD monitors 'val/nothing'"):
        fast_trainer(tmp_path, callbacks=[NTASGD(monitor="val/nothing")]).fit(
            LanguageModelModule(**module_kwargs), data
        )
    with pytest.raises(ValueError, match="nonmono must be >= 1"):
        NTASGD(nonmono=0)
