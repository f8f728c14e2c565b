"""GenerationalKD: the patriarch and its student generations in one ``fit`` (born-again networks, tolerant teachers)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from kd_lightning.modules.generations import GenerationModule, generation_metric_prefix

__all__ = ["GenerationalKD"]

#: The columns of the summary tables: (title, metric name under a generation's prefix).
COLUMNS = (
    ("top-1", "acc1"),
    ("top-5", "acc5"),
    ("ensemble top-1", "ensemble/acc1"),
    ("ensemble top-5", "ensemble/acc5"),
    ("confidence f_a1", "confidence"),
)


class GenerationalKD(Callback):
    """Generations in one fit: the patriarch by Eq. 3 of Yang et al., then students, each by Eq. 4 from the last.

    Trains generation 0 (the patriarch) and ``generations`` student generations of a :class:`GenerationModule`.

    Each generation runs ``epochs_per_generation`` epochs (``trainer.max_epochs`` must be ``(generations + 1)`` times
    that) with the same optimizer and LR schedule as a fresh run. At the first epoch of generation :math:`g+1`
    (``on_train_epoch_start``) the callback calls :meth:`GenerationModule.start_next_generation`: the trained network
    becomes the frozen teacher, the network is re-initialised in place from ``seed + g + 1`` (the same weights on
    every rank), and the optimizers and LR schedulers are rebuilt (``trainer.strategy.setup_optimizers``: fresh
    momentum, the schedule from its start). The generation index lives in the module (the number of finished
    generations it holds, saved in checkpoints), and the hand-over happens when the epoch belongs to a later
    generation than the module's, so it never happens twice, and a run resumed from any checkpoint (also one written
    at the last epoch of a generation) continues in the right generation with the right teacher.

    When the fit ends, a table of every generation's final validation metrics (single network, ensemble of
    generations up to it, mean primary-class confidence) is printed; after a test, the same table on the test set.
    The validation rows (:attr:`history`) are recorded after each validation of the fit and saved in checkpoints, so
    a resumed run prints the same table as an uninterrupted one.

    Args:
        generations: number of student generations ``G`` after the patriarch (the run trains ``G + 1`` networks).
        epochs_per_generation: epochs of each generation; None: ``trainer.max_epochs / (G + 1)``.
        seed: base seed of the re-initialisations; None: rank 0's ``torch.initial_seed()`` (``seed_everything``),
            broadcast to every rank. Saved in checkpoints, so a resumed run re-initialises as the original would.
        print_tables: print the summary tables (rank 0).

    Raises:
        ValueError: ``generations < 1``, ``epochs_per_generation < 1``, or ``trainer.max_epochs`` that does not fit.
        TypeError: the module is not a :class:`GenerationModule`.
    """

    def __init__(
        self,
        generations: int,
        epochs_per_generation: int | None = None,
        seed: int | None = None,
        print_tables: bool = True,
    ) -> None:
        if generations < 1:
            raise ValueError(f"generations (students after the patriarch) must be >= 1, got {generations}")
        if epochs_per_generation is not None and epochs_per_generation < 1:
            raise ValueError(f"epochs_per_generation must be >= 1, got {epochs_per_generation}")
        self.generations = generations
        self.epochs_per_generation = epochs_per_generation
        self.seed = seed
        self.print_tables = print_tables
        #: Final validation metrics of each finished generation, by generation index.
        self.history: dict[int, dict[str, float]] = {}
        self._epochs: int | None = None
        self._base_seed: int | None = None

    # -------------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, GenerationModule):
            raise TypeError(f"GenerationalKD drives a GenerationModule, got {type(pl_module).__name__}")
        if stage == "fit":
            self._epochs = self._generation_length(trainer.max_epochs)
            pl_module.generation_epochs = self._epochs

    def _generation_length(self, max_epochs: int | None) -> int:
        runs = self.generations + 1
        if self.epochs_per_generation is None:
            if max_epochs is None or max_epochs < runs or max_epochs % runs:
                raise ValueError(
                    f"GenerationalKD(generations={self.generations}) splits trainer.max_epochs into {runs} equal "
                    f"generations, but max_epochs={max_epochs}: set max_epochs to a multiple of {runs} or set "
                    "epochs_per_generation"
                )
            return max_epochs // runs
        if max_epochs != runs * self.epochs_per_generation:
            raise ValueError(
                f"GenerationalKD trains {runs} generations of {self.epochs_per_generation} epochs: set "
                f"trainer.max_epochs={runs * self.epochs_per_generation} (got {max_epochs})"
            )
        return self.epochs_per_generation

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        if pl_module.generation > self.generations:
            raise ValueError(
                f"the module holds {pl_module.generation} finished generations, more than this run's "
                f"generations={self.generations}"
            )
        if self._base_seed is None:  # else restored from the checkpoint: a resumed run re-initialises identically
            seed = self.seed if self.seed is not None else torch.initial_seed() % 2**31
            self._base_seed = int(trainer.strategy.broadcast(seed))

    # ------------------------------------------------------------------------------------------ hand-over
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        due = trainer.current_epoch // self._epochs
        if due <= pl_module.generation:
            return
        if due != pl_module.generation + 1:
            raise RuntimeError(
                f"epoch {trainer.current_epoch} belongs to generation {due} but the module finished only "
                f"{pl_module.generation} generations: was a checkpoint of another run loaded?"
            )
        pl_module.start_next_generation(self._base_seed + due)
        trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(
            f"GenerationalKD: generation {due} of {self.generations} starts at epoch {trainer.current_epoch}: "
            f"generation {due - 1} is its teacher; weights, optimizer and LR schedule re-initialised"
        )

    # ------------------------------------------------------------------------------------------- summaries
    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        """Record the generation's latest validation metrics, before the checkpoint callbacks save this state."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        prefix = generation_metric_prefix("val", pl_module.generation, pl_module.generation)
        metrics = {k[len(prefix) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        if metrics:
            self.history[pl_module.generation] = metrics

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        if self.print_tables and trainer.is_global_zero and self.history:
            print_generation_table("validation, last epoch of each generation", self.history)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: GenerationModule) -> None:
        if not (self.print_tables and trainer.is_global_zero):
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        rows = {}
        for g in range(pl_module.generation + 1):
            keys = _row_keys(g, pl_module.generation)
            rows[g] = {name: metrics[key] for name, key in keys if key in metrics}
        print_generation_table("test", rows)

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "base_seed": self._base_seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(g): dict(m) for g, m in state_dict.get("history", {}).items()}
        self._base_seed = state_dict.get("base_seed")


def _row_keys(generation: int, current: int) -> list[tuple[str, str]]:
    """(column metric name, logged key) of generation ``generation``'s test row, ``current`` being the last."""
    keys = []
    for _, name in COLUMNS:
        ensemble = name.startswith("ensemble/")
        prefix = generation_metric_prefix("test", generation, current, ensemble)
        keys.append((name, prefix + name.removeprefix("ensemble/")))
    return keys


def print_generation_table(title: str, rows: dict[int, dict[str, float]]) -> None:
    """Print one row per generation: top-1/top-5 of the network and of the ensemble up to it, and its confidence."""
    table = Table(title=f"GenerationalKD: {title}")
    table.add_column("generation", justify="right")
    for header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for generation in sorted(rows):
        row = rows[generation]
        table.add_row(
            str(generation),
            *(f"{100 * row[name]:.2f}%" if name in row else "-" for _, name in COLUMNS),
        )
    Console().print(table)
