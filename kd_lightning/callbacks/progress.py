"""What a run prints: a rich bar on a terminal, one line per epoch in a log file, a model summary without noise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

__all__ = ["CompactModelSummary", "EpochLines", "EpochProgressBar", "default_progress_bar"]


def _shown_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The progress-bar metrics worth showing: no logger version, no per-step copy of an epoch metric."""
    return {k: v for k, v in metrics.items() if k != "v_num" and not k.endswith("_step")}


class EpochProgressBar(RichProgressBar):
    """Lightning's rich bar, counting epochs from 1 ("Epoch 2/2" in the last of 2) and without the logger version."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:  # checked on Lightning 2.6.6
        return (
            super()
            ._get_train_description(current_epoch)
            .replace(
                f"Epoch {current_epoch}/{(self.trainer.max_epochs or 0) - 1}",
                f"Epoch {current_epoch + 1}/{self.trainer.max_epochs}",
            )
        )

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _shown_metrics(super().get_metrics(trainer, pl_module))


class EpochLines(ProgressBar):
    """One line per training epoch: the epoch (from 1), its time and the progress-bar metrics.

    For output that is not a terminal (a log file, a cluster job), where a bar would appear only at the end. Example::

        epoch 3/10  4.1 s  train/loss 0.5124  val/acc1 0.7344  val/acc5 0.9688  val/loss 0.6921
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._enabled = True
        self._epoch_start = 0.0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        seconds = time.perf_counter() - self._epoch_start
        total = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        metrics = _shown_metrics(self.get_metrics(trainer, pl_module))
        values = "  ".join(f"{k.removesuffix('_epoch')} {_format(v)}" for k, v in sorted(metrics.items()))
        line = f"epoch {trainer.current_epoch + 1}{total}  {seconds:.1f} s  {values}".rstrip()
        print(line, file=self._stream or sys.stdout, flush=True)


def _format(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def default_progress_bar() -> ProgressBar:
    """The rich bar on a terminal, :class:`EpochLines` otherwise."""
    return EpochProgressBar() if sys.stdout.isatty() else EpochLines()


class CompactModelSummary(ModelSummary):
    """Lightning's model summary (the direct submodules) without the FLOPs column, which is 0 unless the module has
    an ``example_input_array``."""

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns), strict=True)]
        lines = [" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        trainable, frozen = (
            get_human_readable_count(n).strip() for n in (trainable_parameters, total_parameters - trainable_parameters)
        )
        lines.append(
            f"params: {trainable} trainable, {frozen} "
            f"frozen ({model_size:,.2f} MB); submodules: {total_training_modes['train']} in train mode, "
            f"{total_training_modes['eval']} in eval mode"
            + (f"; FLOPs: {get_human_readable_count(total_flops)}" if total_flops else "")
        )
        rank_zero_info("\n".join(lines))
