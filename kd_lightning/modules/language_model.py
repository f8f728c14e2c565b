"""Word-level language modelling with the methods of the image modules: plain / LS, DUPS, and the KD family.

A language model predicts the next word at every position of a ``(B, T)`` window, so each token is a sample whose
class is the next word: the ``(B, T, V)`` logits are flattened to ``(B*T, V)`` and the targets to ``(B*T,)``,
and every loss, class table and target of the image modules applies as it is. :class:`LanguageModelMixin` does
that flattening, carries the hidden state, and evaluates perplexity; it is mixed into a method module:

* :class:`LanguageModelModule` = mixin + :class:`~kd_lightning.ClassifierModule`: cross-entropy (the paper's
  "SGD"), or label smoothing with ``label_smoothing`` ("LS");
* :class:`LanguageModelDUPSModule` = mixin + :class:`~kd_lightning.DUPSModule`: the ``V x V`` word table, dense or
  top-k (``table_topk``; DUPS paper, Table 5);
* :class:`LanguageModelDistillModule` = mixin + :class:`~kd_lightning.DistillModule`: KD, KD-topk and the other
  targets from a frozen language-model teacher (Tang et al., Table 3), the teacher carrying its own state.

Truncated BPTT: the state after a window is detached and fed to the next window (the windows of
:class:`~kd_lightning.data.PTBDataModule` continue each other row by row). Lightning 2 has no built-in TBPTT, so
the mixin keeps one state per loop (training, validation, sanity check, test, prediction; the teacher has its own),
each reset at the start of its loop's epoch, so a validation run in the middle of training does not disturb the
training state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

from kd_lightning.models.lstm_lm import create_language_model, detach_state
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.dups import DUPSModule
from kd_lightning.optim import LanguageModelSGD

__all__ = [
    "LanguageModelDUPSModule",
    "LanguageModelDistillModule",
    "LanguageModelMixin",
    "LanguageModelModule",
    "TokenPerplexity",
]


class TokenPerplexity(Perplexity):
    """torchmetrics' perplexity, :math:`\\exp\\big(-\\frac{1}{N}\\sum_{n} \\log p(w_n)\\big)` over every token of the
    epoch (token-weighted, so a short last window counts by its tokens; summed over ranks), updated with the
    flattened ``(N, V)`` logits and ``(N,)`` next words."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds.float()[None], target[None])


class LanguageModelMixin:
    """Makes a :class:`~kd_lightning.ClassifierModule` method train a language model; mix in first.

    Evaluation logs ``<stage>/ppl`` (:class:`TokenPerplexity`) and ``<stage>/loss`` (the mean NLL per token).

    Args:
        backbone: name of a registered language model (``kd-lightning backbones`` lists them).
        num_classes: the vocabulary size ``V``; must match the datamodule's (checked at set-up).
        optimizer: the optimizer, called with the trainable parameters. Default:
            :class:`~kd_lightning.optim.LanguageModelSGD` (lr 20, no momentum).
        **kwargs: the method module's own arguments.
    """

    def __init__(
        self,
        backbone: str = "lstm_small",
        num_classes: int = 10000,
        optimizer: OptimizerCallable = LanguageModelSGD,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, optimizer=optimizer, **kwargs)
        self._lm_states: dict[str, Any] = {}

    def build_backbone(self, name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
        return create_language_model(name, num_classes, **kwargs)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"ppl": TokenPerplexity()})

    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` windows ``(B, T)`` -> ``x`` and the flattened next words ``(B*T,)``."""
        x, y = batch
        return x, y.flatten()

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` tokens -> ``(B*T, V)`` logits, continuing the current loop's hidden state."""
        return self.run_stateful(self.backbone, tokens, "model")

    def run_stateful(self, network: nn.Module, tokens: Tensor, name: str) -> Tensor:
        """``network(tokens, state)`` with the state ``name`` of the current loop, stored back detached.

        Outside a trainer (a plain call) every call starts from a fresh state. A state whose batch size differs
        from the tokens' (another loader) is dropped.
        """
        key = self._state_key(name)
        state = self._lm_states.get(key)
        if state is not None and _batch_size(state) != tokens.shape[0]:
            state = None
        logits, state = network(tokens, state)
        if key is not None:
            self._lm_states[key] = detach_state(state)
        return logits.flatten(0, 1)

    def _state_key(self, name: str) -> str | None:
        if self._trainer is None or self.trainer.state.stage is None:
            return None
        return f"{name}/{self.trainer.state.stage.value}"

    def _reset_states(self, stage: RunningStage | None) -> None:
        stage = self.trainer.state.stage if stage is None else stage
        for key in [key for key in self._lm_states if key.endswith(f"/{stage.value}")]:
            del self._lm_states[key]

    def on_train_epoch_start(self) -> None:
        self._reset_states(RunningStage.TRAINING)
        super().on_train_epoch_start()

    def on_validation_epoch_start(self) -> None:
        self._reset_states(None)  # validating or sanity checking
        super().on_validation_epoch_start()

    def on_test_epoch_start(self) -> None:
        self._reset_states(RunningStage.TESTING)
        super().on_test_epoch_start()

    def on_predict_epoch_start(self) -> None:
        self._reset_states(RunningStage.PREDICTING)
        super().on_predict_epoch_start()


def _batch_size(state: Any) -> int:
    """Batch size of an LSTM state: dimension 1 of its first tensor (``(layers, B, H)``)."""
    while not isinstance(state, Tensor):
        state = state[0]
    return state.shape[1]


class LanguageModelModule(LanguageModelMixin, ClassifierModule):
    """Word-level LM (Zaremba et al. 2014): L = -(1/BT) sum_{b,t} log p(w_{b,t+1} | w_{b,<=t}), truncated BPTT.

    .. math:: \\mathcal{L} = -\\frac{1}{BT}\\sum_{b,t} \\log p(w_{b,t+1} \\mid w_{b,\\le t})

    (label smoothing :math:`\\epsilon` with ``label_smoothing``: the DUPS paper's LS baseline). The arguments are
    :class:`LanguageModelMixin`'s and :class:`~kd_lightning.ClassifierModule`'s (gradient clipping is the
    trainer's ``gradient_clip_val``; the default schedule is one cosine over the run, as the DUPS paper's
    comparisons; :class:`~kd_lightning.optim.DelayedExponentialLR` gives Zaremba et al.'s).
    """


class LanguageModelDUPSModule(LanguageModelMixin, DUPSModule):
    """DUPS for LMs (Table 5): per token lambda_CE CE(z, w) + lambda_KD T^2 KL(f_T(w) || softmax(z/T)), w: next word.

    Each token learns from the mean prediction over the peers of its next word (DUPS paper, Sec. 4).

    The loss of Eq. 2 with Eq. 4-5 per token, a "class" being the next word: :math:`f_T(w)` is the mean softened
    prediction of the positions whose next word was ``w`` in the last epoch of the previous stage. The ``V x V``
    table is dense (10k words: 400 MB, 800 MB with its running sums, both in checkpoints) or, with
    ``table_topk: k``, keeps each word's ``k`` largest entries with the rest of the mass uniform
    (:class:`~kd_lightning.modules.class_targets.TopKClassTargetTable`). Statistics are the online ones (the forward
    passes of training): ``statistics="recompute"`` needs a map-style dataset of samples, which windows are not.
    The paper's LM setting: 5 stages, :math:`\\lambda_{CE} = 0.8`, :math:`\\lambda_{KD} = 0.2`, ``T = 6``, cosine LR.

    Args:
        num_stages: ``m``, the number of stages (5 in the paper; None when ``epochs_per_stage`` is given).
        statistics: ``"online"``, the only reading for language models (see above).
        **kwargs: :class:`LanguageModelMixin`'s and :class:`~kd_lightning.DUPSModule`'s arguments.

    Raises:
        ValueError: ``statistics`` other than ``"online"``, and :class:`~kd_lightning.DUPSModule`'s errors.
    """

    def __init__(self, num_stages: int | None = 5, statistics: str = "online", **kwargs: Any) -> None:
        if statistics != "online":
            raise ValueError(
                f"language models collect DUPS statistics online only (the windows are not samples a recompute pass "
                f"could draw), got statistics={statistics!r}"
            )
        super().__init__(num_stages=num_stages, statistics=statistics, **kwargs)


class LanguageModelDistillModule(LanguageModelMixin, DistillModule):
    """KD for LMs (Tang et al., Table 3): per token (1 - alpha) CE(z, w) + alpha T^2 KL(rho || softmax(z/T)).

    KD and its partial variants for language models (KD and KD-topk with AWD-LSTMs).

    :class:`~kd_lightning.DistillModule`'s loss per token, the teacher a frozen language model
    (``teacher_backbone`` + ``teacher_checkpoint`` of a :class:`LanguageModelModule`, or an ``nn.Module``) that reads
    the same windows and carries its own hidden state. ``target_kind: topk`` is KD-topk.

    ``teacher_store`` (see :class:`~kd_lightning.DistillModule`) stores the teacher's top-``store_topk`` next-word
    distribution at every training position once (the teacher reading each rank's rows of the stream from their
    start, its state carried through the whole pass: with ``epochs_per_pass > 1`` the live teacher restarts its
    state at every piece, the stored one does not), and the student reads them instead of running the teacher;
    nothing is drawn (``store_draws`` 1). The teacher-output cache (``cache_teacher_topk``) is not offered: a
    teacher's output depends on its carried state, not on the window alone.
    """

    def __init__(self, cache_teacher_topk: int | None = None, store_draws: int = 1, **kwargs: Any) -> None:
        if cache_teacher_topk is not None:
            raise ValueError(
                "cache_teacher_topk is not supported for language models: the teacher's output depends on its "
                "carried hidden state, not on the window alone"
            )
        super().__init__(store_draws=store_draws, **kwargs)

    def teacher_logits(self, x: Tensor) -> Tensor:
        return self.run_stateful(self.teacher, x, "teacher")

    def store_teacher_logits(self) -> Callable[[Tensor], Tensor]:
        """The teacher's ``(B*t, V)`` logits of the store's windows, in order, its hidden state carried."""
        state = None

        def logits(tokens: Tensor) -> Tensor:
            nonlocal state
            output, state = self.teacher(tokens, state)
            return output.flatten(0, 1)

        return logits
