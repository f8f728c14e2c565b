"""NT-ASGD: non-monotonically triggered averaged SGD (Merity et al. 2018, "Regularizing and Optimizing LSTM Language
Models", Sec. 3, Alg. 1), as a callback over any module trained with SGD."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

__all__ = ["NTASGD"]


class NTASGD(Callback):
    """Plain SGD until the validation metric stops improving, then SGD with iterate averaging (ASGD).

    Alg. 1 of Merity et al.: after each validation, with ``v_k`` the monitored value of validation ``k``, averaging
    is triggered when ``k > n`` and :math:`v_k > \\min_{j < k - n} v_j` (``n = nonmono``: no improvement over the
    best value older than ``n`` validations). From the trigger on, after every optimizer step the average
    :math:`\\bar w \\leftarrow \\bar w + (w - \\bar w) / (t + 1)` of the iterates is updated (torch's ASGD with
    ``t0 = 0, lambd = 0``: SGD steps, an averaged copy), validation and test run with :math:`\\bar w`, and at the end
    of ``fit`` the model keeps :math:`\\bar w`. The trigger epoch, the history and the average are saved in
    checkpoints, so a resumed run goes on averaging.

    Args:
        monitor: logged metric to watch (lower is better), e.g. ``val/loss`` or ``val/ppl``.
        nonmono: ``n``, the non-monotone interval (5 in the reference code).
    """

    def __init__(self, monitor: str = "val/loss", nonmono: int = 5) -> None:
        if nonmono < 1:
            raise ValueError(f"nonmono must be >= 1, got {nonmono}")
        self.monitor, self.nonmono = monitor, nonmono
        self.history: list[float] = []
        self.triggered_at: int | None = None
        self.average: list[Tensor] = []
        self.steps = 0
        self._saved: list[Tensor] = []

    @property
    def averaging(self) -> bool:
        """Whether the average has been triggered."""
        return self.triggered_at is not None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the epoch's metrics are final (as EarlyStopping): restore the raw weights, then the trigger test."""
        self._swap_out(pl_module)
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.monitor not in trainer.callback_metrics:
            logged = ", ".join(trainer.callback_metrics)
            raise KeyError(f"NTASGD monitors {self.monitor!r}, which is not logged; logged: {logged}")
        value = float(trainer.callback_metrics[self.monitor])
        if not self.averaging and len(self.history) > self.nonmono and value > min(self.history[: -self.nonmono]):
            self.triggered_at = trainer.current_epoch
            self.average = [p.detach().clone() for p in _params(pl_module)]
            self.steps = 1
        self.history.append(value)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self.averaging:
            return
        self.steps += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in _params(pl_module)], 1.0 / self.steps)

    # --- evaluation with the average, and the average kept at the end
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaging:
            with torch.no_grad():
                torch._foreach_copy_(list(_params(pl_module)), self.average)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.averaging and not self._saved:
            params = list(_params(pl_module))
            self._saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(params, self.average)

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._saved:
            with torch.no_grad():
                torch._foreach_copy_(list(_params(pl_module)), self._saved)
            self._saved = []

    # --- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "triggered_at": self.triggered_at,
            "average": self.average,
            "steps": self.steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.triggered_at = state_dict["triggered_at"]
        self.average = list(state_dict["average"])
        self.steps = state_dict["steps"]


def _params(pl_module: pl.LightningModule) -> list[Tensor]:
    return [p for p in pl_module.parameters() if p.requires_grad]
