"""The ``kd-lightning`` command: a LightningCLI in subclass mode for models and datamodules.

``kd-lightning fit --config configs/quickstart.yaml`` trains any module on any datamodule named by class path;
``kd-lightning backbones`` lists the registered backbones, then the language models.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    ThroughputMonitor,
)
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table

from kd_lightning.callbacks.reproducibility import RNGStateCheckpoint
from kd_lightning.models.lstm_lm import list_language_models
from kd_lightning.models.registry import list_backbones

__all__ = ["KDLightningCLI", "batch_size_of", "console_main", "main"]


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch ``(x, y)`` or ``((x_a, x_b), y)``: the length of its last element."""
    return len(batch[-1])


class KDLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    * ``checkpoint`` (ModelCheckpoint): ``last.ckpt`` every epoch, so a crash loses at most one epoch; set
      ``--checkpoint.monitor val/acc1 --checkpoint.save_top_k 1`` to also keep the best epoch on validation.
    * the RNG state in checkpoints (exact resume, see :class:`~kd_lightning.callbacks.RNGStateCheckpoint`);
      with a logger, Lightning's LearningRateMonitor (per epoch) and ThroughputMonitor; unless the progress
      bar is disabled, the rich progress bar. A callback of the same type in ``trainer.callbacks`` replaces
      the default one.
    * ``--test_after_fit true`` tests after ``fit`` and prints the final validation and test accuracy, with
      ``--test_ckpt final`` (the weights at the end of training) or ``best`` (the best checkpoint on
      ``checkpoint.monitor``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": "link"})
        parser.add_argument("--test_after_fit", type=bool, default=False, help="Run `test` right after `fit`.")
        parser.add_argument(
            "--test_ckpt",
            type=Literal["final", "best"],
            default="final",
            help="Weights tested after fit: 'final' (end of training) or 'best' (on checkpoint.monitor).",
        )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer of the config plus the default callbacks, each unless the config disables or replaces it."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        user_callbacks = trainer_config.get("callbacks") or []

        def missing(kind: type) -> bool:
            return not any(isinstance(c, kind) for c in user_callbacks)

        defaults: list[Callback] = [RNGStateCheckpoint()]
        if trainer_config.get("logger") is not False:
            if missing(LearningRateMonitor):
                defaults.append(LearningRateMonitor(logging_interval="epoch"))
            if missing(ThroughputMonitor):
                defaults.append(ThroughputMonitor(batch_size_fn=batch_size_of))
        if trainer_config.get("enable_progress_bar") is not False and missing(ProgressBar):
            defaults.append(RichProgressBar())
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        if not config.test_after_fit or self.trainer.interrupted:
            return
        fit_metrics = dict(self.trainer.callback_metrics)  # test() replaces them
        ckpt_path = "best" if config.test_ckpt == "best" else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        if self.trainer.is_global_zero:
            print_summary({**fit_metrics, **self.trainer.callback_metrics}, config.test_ckpt)


def print_summary(metrics: dict[str, Any], test_weights: str) -> None:
    """Print the final validation and test accuracies (perplexities for language models) as a table."""
    table = Table(title="kd-lightning: final accuracies")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("protocol")
    for key in sorted(metrics):
        perplexity = key.endswith("/ppl")
        if key.startswith(("val/", "test/")) and ("acc" in key or perplexity):
            protocol = "last epoch" if key.startswith("val/") else f"{test_weights} weights"
            value = float(metrics[key])
            table.add_row(key, f"{value:.2f}" if perplexity else f"{100 * value:.2f}%", protocol)
    Console().print(table)


def silence_known_warnings() -> None:
    """Hide the jsonargparse deprecation notices that Lightning's own CLI code triggers (not actionable here)."""
    warnings.filterwarnings("ignore", message=r"[\s\S]*was deprecated in v4\.\d+", module=r"lightning\.pytorch\.cli")
    warnings.filterwarnings("ignore", message=r"\s*By default only one JsonargparseDeprecationWarning")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*you need to define a `flops_per_batch` attribute")
    # PTBDataModule's windows are an IterableDataset with a length, loaded without workers (nothing to fix)
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def main(args: ArgsType = None, run: bool = True) -> KDLightningCLI | None:
    """Entry point of ``kd-lightning``; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks)."""
    silence_known_warnings()
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["backbones"]:
        print("\n".join(list_backbones()))
        print("# language models (kd_lightning.LanguageModelModule and its method variants):")
        print("\n".join(list_language_models()))
        return None
    return KDLightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # optimizers are model arguments; no top-level ones that would override
        args=args,
        run=run,
    )


def console_main() -> None:
    """The ``kd-lightning`` console script (returns nothing, so the exit status is 0 on success)."""
    main()


if __name__ == "__main__":
    console_main()
