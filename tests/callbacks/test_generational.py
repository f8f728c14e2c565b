"""GenerationalKD: generations in one fit, schedules restarted, optimizers fresh, per-generation metrics, resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning import ClassifierModule, GenerationalKD, GenerationModule
from kd_lightning.callbacks.generational import print_generation_table
from kd_lightning.cli import main
from kd_lightning.data import SyntheticDataModule
from tests.helpers import TINY_SYNTHETIC, CrashAt, fast_trainer, tiny_mlp_kwargs

EPOCHS = 2  # per generation


class Recorder(Callback):
    """Per epoch (after GenerationalKD's hand-over): the LR, the optimizer object and its state size, the weights."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.optimizers: list[int] = []
        self.state_sizes: list[int] = []
        self.generations: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        optimizer = trainer.optimizers[0]
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.optimizers.append(id(optimizer))
        self.state_sizes.append(len(optimizer.state))
        self.generations.append(pl_module.generation)


def halving(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def _run(tmp_path, generations=2, seed=0, ckpt_path=None, extra=(), **module_kwargs) -> tuple:
    pl.seed_everything(seed)
    module = GenerationModule(**{**tiny_mlp_kwargs(), "patriarch_confidence": 0.6, **module_kwargs})
    recorder = Recorder()
    callbacks = [GenerationalKD(generations), recorder, *extra]
    trainer = fast_trainer(
        tmp_path,
        max_epochs=EPOCHS * (generations + 1),
        callbacks=callbacks,
        deterministic=True,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
    )
    trainer.fit(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC), ckpt_path=ckpt_path)
    return module, trainer, recorder


def test_every_generation_repeats_the_schedule_with_a_fresh_optimizer(tmp_path):
    module, _, rec = _run(tmp_path, lr_scheduler=halving)
    assert module.generation == 2 and rec.generations == [0] * EPOCHS + [1] * EPOCHS + [2] * EPOCHS
    per_generation = [rec.lrs[g * EPOCHS : (g + 1) * EPOCHS] for g in range(3)]
    assert per_generation[1] == per_generation[0] == per_generation[2]
    assert len(set(per_generation[0])) == EPOCHS  # the schedule really moves within a generation
    # a new optimizer with empty state (no momentum) at the first epoch of each generation, kept within it
    firsts = [g * EPOCHS for g in range(3)]
    assert len({rec.optimizers[i] for i in firsts}) == 3
    assert all(rec.state_sizes[i] == 0 for i in firsts)
    assert all(rec.state_sizes[i] > 0 for i in range(len(rec.lrs)) if i not in firsts)


def test_default_schedule_is_one_generation_long(tmp_path):
    module, _, rec = _run(tmp_path, generations=1)
    assert module.schedule_length() == EPOCHS
    assert rec.lrs[:EPOCHS] == rec.lrs[EPOCHS:] and rec.lrs[0] > rec.lrs[1]


def test_metrics_are_named_per_generation(tmp_path):
    module, trainer, _ = _run(tmp_path)
    keys = set(trainer.callback_metrics)
    for g in range(3):
        assert {f"val/gen{g}/acc1", f"val/gen{g}/confidence"} <= keys
    assert {"val/gen1/ensemble/acc1", "val/gen2/ensemble/acc1"} <= keys
    assert not any(k.startswith("val/acc") for k in keys)  # nothing compares across generations
    assert trainer.callbacks[0].history.keys() == {0, 1, 2}
    trainer.test(module, datamodule=SyntheticDataModule(**TINY_SYNTHETIC), verbose=False)
    test_keys = set(trainer.callback_metrics)
    expected = {"test/acc1", "test/ensemble/acc1", "test/gen0/acc1", "test/gen1/acc1", "test/ensemble1/acc1"}
    assert expected <= test_keys
    assert {"test/confidence", "test/gen0/confidence"} <= test_keys


def checkpoints(directory) -> list[Callback]:
    # no RNGStateCheckpoint: nothing here draws from the global RNG after the start, and without it the resumed
    # process's seed differs, so the test also checks that the re-initialisation seed comes from the checkpoint
    return [ModelCheckpoint(dirpath=directory, save_last=True)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[GenerationModule, Recorder, GenerationalKD]:
    """The reference run of the resume tests, with the same callbacks."""
    directory = tmp_path_factory.mktemp("full")
    module, trainer, recorder = _run(directory, extra=checkpoints(directory))
    return module, recorder, trainer.callbacks[0]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize(
    "crash_at",
    [EPOCHS * 2, EPOCHS * 2 + 1],
    ids=["checkpoint-on-the-boundary", "checkpoint-inside-generation-2"],
)
def test_crash_and_resume_continues_in_the_right_generation(tmp_path, uninterrupted, crash_at):
    reference, ref_rec, _ = uninterrupted
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(crashed, extra=[*checkpoints(crashed), CrashAt(crash_at)])
    resumed, _, rec = _run(crashed, seed=123, ckpt_path=crashed / "last.ckpt", extra=checkpoints(crashed))
    assert resumed.generation == 2 and len(resumed.finished) == 2
    assert rec.generations == [2] * (3 * EPOCHS - crash_at)  # the hand-over happened once, before any epoch of gen 2
    for a, b in zip(reference.finished, resumed.finished, strict=True):
        assert _same_weights(a, b)  # the right teachers and ensemble members
    assert _same_weights(reference, resumed)  # and the same final student, bit for bit
    assert rec.lrs == ref_rec.lrs[crash_at:]


@pytest.mark.parametrize(
    "crash_at",
    [EPOCHS, EPOCHS * 2, EPOCHS * 2 + 1],
    ids=["checkpoint-at-the-end-of-gen-0", "checkpoint-at-the-end-of-gen-1", "checkpoint-inside-generation-2"],
)
def test_resumed_run_prints_the_summary_of_the_uninterrupted_one(tmp_path, uninterrupted, crash_at, capsys):
    *_, reference = uninterrupted
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(crashed, extra=[*checkpoints(crashed), CrashAt(crash_at)])
    capsys.readouterr()
    _, trainer, _ = _run(crashed, ckpt_path=crashed / "last.ckpt", extra=checkpoints(crashed))
    printed = capsys.readouterr().out
    assert reference.history.keys() == {0, 1, 2}
    assert trainer.callbacks[0].history == reference.history  # every generation's row, bit for bit
    print_generation_table("validation, last epoch of each generation", reference.history)
    assert printed.endswith(capsys.readouterr().out)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"generations .* must be >= 1"):
        GenerationalKD(0)
    with pytest.raises(ValueError, match="epochs_per_generation must be >= 1"):
        GenerationalKD(2, epochs_per_generation=0)
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    with pytest.raises(ValueError, match=r"splits trainer\.max_epochs into 3 equal generations"):
        fast_trainer(tmp_path, max_epochs=4, callbacks=[GenerationalKD(2)]).fit(
            GenerationModule(**tiny_mlp_kwargs()), data
        )
    with pytest.raises(ValueError, match=r"set trainer.max_epochs=6 \(got 5\)"):
        trainer = fast_trainer(tmp_path, max_epochs=5, callbacks=[GenerationalKD(2, epochs_per_generation=2)])
        trainer.fit(GenerationModule(**tiny_mlp_kwargs()), data)
    with pytest.raises(TypeError, match="drives a GenerationModule, got ClassifierModule"):
        fast_trainer(tmp_path, max_epochs=3, callbacks=[GenerationalKD(2)]).fit(
            ClassifierModule(**tiny_mlp_kwargs()), data
        )


def test_a_config_runs_generations_from_the_cli(tmp_path, capsys):
    config = tmp_path / "generations.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: kd_lightning.GenerationalKD
      init_args: {{generations: 1}}
model:
  class_path: kd_lightning.GenerationModule
  init_args:
    patriarch_confidence: 0.6
    backbone: mlp
    num_classes: {TINY_SYNTHETIC["num_classes"]}
    backbone_kwargs: {{in_features: {TINY_SYNTHETIC["input_dim"]}, hidden: 32}}
data:
  class_path: kd_lightning.SyntheticDataModule
  init_args: {TINY_SYNTHETIC}
test_after_fit: true
"""
    )
    cli = main(["fit", "--config", str(config)])
    assert cli.model.generation == 1
    out = capsys.readouterr().out
    assert "GenerationalKD: validation, last epoch of each generation" in out and "GenerationalKD: test" in out
    assert "test/gen0/acc1" in out and "test/ensemble/acc1" in out  # the CLI's summary lists every generation
    last = tmp_path / "checkpoints" / "last.ckpt"
    tested = main(["test", "--config", str(config), "--ckpt_path", str(last)])
    assert tested.model.generation == 1  # the checkpoint alone brings back generation 0 for the ensemble
    assert "test/ensemble/acc1" in tested.trainer.callback_metrics
