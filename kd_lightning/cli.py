"""The ``kd-lightning`` command: a LightningCLI in subclass mode for models and datamodules.

``kd-lightning fit --config configs/quickstart.yaml`` trains any module on any datamodule named by class path;
``kd-lightning backbones`` lists the registered backbones, the language models and the library families;
``kd-lightning export`` writes a checkpoint's inference network for deployment; ``kd-lightning predict`` classifies
image files (with ``--config``, it is LightningCLI's ``predict``). A run's files go to one
folder, ``trainer.default_root_dir`` (see :mod:`kd_lightning.run_folder`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
import yaml
from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE  # checked on Lightning 2.6.6
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
    ThroughputMonitor,
)
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher  # checked on 2.6.6
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from kd_lightning.callbacks.progress import CompactModelSummary, default_progress_bar
from kd_lightning.callbacks.reproducibility import RNGStateCheckpoint
from kd_lightning.checkpoints import CONFIG_KEY, read_checkpoint, saved_model_config
from kd_lightning.commands import COMMANDS, DESCRIPTION, is_lightning_command
from kd_lightning.errors import ConfigError, is_user_error, report, tidy_parser_message
from kd_lightning.run_folder import RunFolder, write_summary

__all__ = ["KDLightningCLI", "batch_size_of", "console_main", "main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch ``(x, y)`` or ``((x_a, x_b), y)``: the length of its last element."""
    return len(batch[-1])


class KDArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are the message alone (no 60-line usage, no union-type bookkeeping)."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"(all options: {prog} --help)\n{prog}: error: {tidy_parser_message(message)}\n")
        sys.exit(2)


class RunConfig(SaveConfigCallback):
    """Saves ``config.yaml`` when ``fit`` starts (not on test/validate/predict, which would replace the run's) and
    the model's and datamodule's options into every checkpoint, so that a resume can tell whether it was given other
    ones and an export or a prediction finds the data's preprocessing and class names."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        dumped = _dump(self.parser, self.config)
        checkpoint[CONFIG_KEY] = {"model": dumped["model"], "data": dumped.get("data")}


def _dump(parser: LightningArgumentParser, config: Any) -> dict[str, Any]:
    return yaml.safe_load(parser.dump(config, skip_none=False, skip_link_targets=False))


def _options(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """``model.class_path``, ``model.init_args.<name>`` ... of a dumped class config (nested classes included)."""
    if isinstance(node, Mapping) and "class_path" in node:
        yield f"{prefix}.class_path", node["class_path"]
        for key, value in (node.get("init_args") or {}).items():
            yield from _options(value, f"{prefix}.init_args.{key}")
    else:
        yield prefix, node


def _same(given: Any, saved: Any, class_path: bool) -> bool:
    return _resolve(given) == _resolve(saved) if class_path else _plain(given) == _plain(saved)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (a checkpoint's hyper-parameters keep tuples, a YAML dump has lists)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _resolve(class_path: Any) -> Any:
    """The class a class path names (``kd_lightning.DUPSModule`` is ``kd_lightning.modules.dups.DUPSModule``)."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def option_differences(given: Mapping[str, Any], saved: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(option, given value, saved value)`` for every model option set in both and different."""
    mine, theirs = dict(_options(given, "model")), dict(_options(saved, "model"))
    return [
        (key, mine[key], theirs[key])
        for key in sorted(mine.keys() & theirs.keys())
        if not _same(mine[key], theirs[key], key.endswith("class_path"))
    ]


class KDLightningCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    * one run per folder (:mod:`kd_lightning.run_folder`): ``fit`` writes ``config.yaml``, ``checkpoints/``
      (``last.ckpt`` every epoch, so a crash loses at most one epoch), the logs and ``summary.json`` into
      ``trainer.default_root_dir`` and refuses a folder holding another run unless it resumes it
      (``--ckpt_path last``) or ``--overwrite true``;
      ``--checkpoint.monitor val/acc1 --checkpoint.save_top_k 1`` also keeps the best epoch on validation.
    * ``--ckpt_path`` never changes the run asked for: model options that differ from the checkpoint's are an error.
    * the RNG state in checkpoints (exact resume, see :class:`~kd_lightning.callbacks.RNGStateCheckpoint`);
      with a logger (TensorBoard, else CSV, written into the run's folder; none for test/validate/predict unless
      configured), Lightning's LearningRateMonitor (per epoch) and ThroughputMonitor; a rich progress bar on a
      terminal, one line per epoch otherwise. A callback of the same type in ``trainer.callbacks`` replaces the
      default one.
    * ``--test_after_fit true`` tests after ``fit`` and prints the final validation and test accuracy, with
      ``--test_ckpt final`` (the weights at the end of training) or ``best`` (the best checkpoint on
      ``checkpoint.monitor``).
    """

    @override
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
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace the run already in trainer.default_root_dir (deletes its config, logs and "
            "checkpoints) instead of refusing to start. Resuming it is --ckpt_path last.",
        )

    @property
    def _subconfig(self) -> Any:
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    def _run_folder(self) -> RunFolder:
        config = self._subconfig
        return RunFolder.of(config.trainer.get("default_root_dir"), config.checkpoint.get("dirpath"))

    @override
    def _parse_ckpt_path(self) -> None:  # LightningCLI's hook (2.6.6): it restored the checkpoint's options silently
        """Check that the options given agree with those of ``--ckpt_path``'s checkpoint.

        With no model in the config the checkpoint's own is used (Lightning's behaviour); otherwise any model option
        that differs from the checkpoint's is an error listing them, since resuming (or testing) a checkpoint with
        other options would be another run than the one saved, or than the one asked for.
        """
        if not self.config.get("subcommand"):
            return
        ckpt_path = self._subconfig.get("ckpt_path")
        if ckpt_path in (None, "best", "hpc", "registry"):
            return
        path = self._run_folder().last_checkpoint if ckpt_path == "last" else Path(ckpt_path)
        if ckpt_path == "last" and not path.is_file():
            return  # nothing to resume yet: a fresh start
        saved = saved_model_config(read_checkpoint(path))
        if self._subconfig.get("model") is None:
            super()._parse_ckpt_path()
            return
        differences = option_differences(_dump(self.parser, self.config)[self.config.subcommand]["model"], saved)
        if differences:
            raise ConfigError(_mismatch_message(Path(path), differences, self.config.subcommand))

    @override
    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and getattr(rank_zero_only, "rank", 0) == 0:
            config = self._subconfig
            deleted = self._run_folder().claim(config.get("ckpt_path"), config.get("overwrite", False))
            if deleted:
                print(f"--overwrite: deleted the earlier run's {len(deleted)} files in {self._run_folder().root}")

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            raise ConfigError.from_exception(error, self._subconfig.as_dict()) from error

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer of the config plus the default callbacks, each unless the config disables or replaces it."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        user_callbacks = trainer_config.get("callbacks") or []
        fitting = self.subcommand in ("fit", None)

        def missing(kind: type) -> bool:
            return not any(isinstance(c, kind) for c in user_callbacks)

        logger = trainer_config.get("logger")
        if logger is None:  # the default: into the run's folder when fitting, nowhere otherwise
            logger = kwargs["logger"] = run_logger(self._run_folder().root) if fitting else False
        defaults: list[Callback] = [RNGStateCheckpoint()]
        if fitting and logger is not False:
            if missing(LearningRateMonitor):
                defaults.append(LearningRateMonitor(logging_interval="epoch"))
            if missing(ThroughputMonitor):
                defaults.append(ThroughputMonitor(batch_size_fn=batch_size_of))
        if trainer_config.get("enable_progress_bar") is not False and missing(ProgressBar):
            defaults.append(default_progress_bar())
        if trainer_config.get("enable_model_summary") is not False and missing(ModelSummary):
            defaults.append(CompactModelSummary())
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """``--test_after_fit``, then the summary table and ``summary.json`` of the finished run."""
        config = self.config[self.subcommand]
        if self.trainer.interrupted:
            return
        metrics = dict(self.trainer.callback_metrics)  # test() replaces them
        if config.test_after_fit:
            ckpt_path = "best" if config.test_ckpt == "best" else final_weights(self.trainer, self._run_folder())
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
            metrics.update(self.trainer.callback_metrics)
        if self.trainer.is_global_zero:
            values = {key: float(value) for key, value in sorted(metrics.items())}
            tested = config.test_ckpt if config.test_after_fit else None
            folder = Path(self.trainer.log_dir or self._run_folder().root)  # where config.yaml is
            write_summary(
                folder, values, epochs=self.trainer.current_epoch, steps=self.trainer.global_step, tested=tested
            )
            if tested:
                print_summary(values, tested)


def final_weights(trainer: pl.Trainer, folder: RunFolder) -> str | None:
    """What ``--test_ckpt final`` tests: the module as it is (``None``), except after a spawned fit
    (``ddp_spawn``), where only the weights come back to this process and the state held outside them (the
    finished generations of a ``GenerationModule``) stays in the workers: then the run's last checkpoint."""
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        return str(folder.last_checkpoint)
    return None


def run_logger(root: Path) -> Logger:
    """Lightning's default logger (TensorBoard when installed, else CSV), writing into ``root`` itself."""
    if _TENSORBOARD_AVAILABLE:
        return TensorBoardLogger(save_dir=root, name="", version="", default_hp_metric=False)
    return CSVLogger(save_dir=root, name="", version="")


def _mismatch_message(path: Path, differences: list[tuple[str, Any, Any]], subcommand: str) -> str:
    listed = "\n".join(f"  {key}: {given!r} given, {saved!r} in the checkpoint" for key, given, saved in differences)
    saved_config = path.parent.parent / "config.yaml"
    own = f" (its config: --config {saved_config})" if saved_config.is_file() else ""
    if subcommand == "fit":
        advice = (
            f"Resuming continues the saved run as it was: give it its own options{own}, or train with the new "
            "options as a new run (without --ckpt_path, in another folder)."
        )
    else:
        advice = f"Give the options the checkpoint was trained with{own}."
    return f"--ckpt_path {path} was saved with other model options than the ones given:\n{listed}\n{advice}"


def print_summary(metrics: dict[str, float], test_weights: str) -> None:
    """Print the final validation and test accuracies (perplexities for language models) as a table."""
    table = Table(title="kd-lightning: final accuracies")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("protocol")
    for key, value in metrics.items():
        perplexity = key.endswith("/ppl")
        if key.startswith(("val/", "test/")) and ("acc" in key or perplexity):
            protocol = "last epoch" if key.startswith("val/") else f"{test_weights} weights"
            table.add_row(key, f"{value:.2f}" if perplexity else f"{100 * value:.2f}%", protocol)
    Console().print(table)


class _DropNoise(logging.Filter):
    """Lightning's start-up lines that inform nobody on a CPU run (accelerators absent, service adverts)."""

    NOISE = (
        "GPU available:",
        "TPU available:",
        "HPU available:",
        "💡 Tip:",
        "Trainer already configured with model summary",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def silence_known_noise() -> None:
    """Hide messages nobody can act on: jsonargparse notices Lightning's own CLI code triggers, adverts, warnings
    that kd-lightning's defaults make moot (a run folder is checked before it is reused)."""
    warnings.filterwarnings("ignore", message=r"[\s\S]*was deprecated in v4\.\d+", module=r"lightning\.pytorch\.cli")
    warnings.filterwarnings("ignore", message=r"\s*By default only one JsonargparseDeprecationWarning")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*you need to define a `flops_per_batch` attribute")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # PTBDataModule's windows are an IterableDataset with a length, loaded without workers (nothing to fix)
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropNoise())


def main(args: ArgsType = None, run: bool = True) -> KDLightningCLI | None:
    """Entry point of ``kd-lightning``; ``args`` replaces ``sys.argv[1:]`` (for tests and notebooks).

    Raises:
        ConfigError: the run cannot be built from its config (the message names the option), or ``--ckpt_path``
            disagrees with the options given.
        RunFolderError: ``fit`` into a folder holding another run.
    """
    silence_known_noise()
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv and argv[0] in COMMANDS and not is_lightning_command(argv):
        status = COMMANDS[argv[0]][1](argv[1:])
        if status:
            sys.exit(status)
        return None
    if isinstance(argv, list) and argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        choices = ", ".join(dict.fromkeys([*SUBCOMMANDS, *COMMANDS]))
        sys.stderr.write(f"kd-lightning: error: unknown command {argv[0]!r}; the commands: {choices}\n")
        sys.exit(2)
    return KDLightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=KDArgumentParser,
        parser_kwargs={"description": DESCRIPTION},
        auto_configure_optimizers=False,  # optimizers are model arguments; no top-level ones that would override
        args=args,
        run=run,
    )


def console_main(args: ArgsType = None) -> None:
    """The ``kd-lightning`` console script: exit status 0 on success; a set-up mistake ends in its message alone
    (exit status 1; ``KD_LIGHTNING_TRACEBACK=1`` shows the traceback), anything else in a traceback."""
    try:
        main(args)
    except Exception as error:
        if not is_user_error(error):
            raise
        argv = sys.argv[1:] if args is None else list(args)
        command = " ".join(["kd-lightning", *argv[:1]])
        sys.exit(report(error, command))


if __name__ == "__main__":
    console_main()
