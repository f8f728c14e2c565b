"""Word-level LSTM language models and their contract (Zaremba et al. 2014; AWD-LSTM, Merity et al. 2018).

Language models do not fit the backbone contract (``(B, D) -> (B, C)``): they read ``(B, T)`` windows of token ids
and carry a hidden state from one window to the next (truncated BPTT). Their own small contract, which
:class:`~kd_lightning.LanguageModelModule` relies on:

* ``forward(tokens, state) -> (logits, state)``: ``tokens`` ``(B, T)`` long, ``logits`` ``(B, T, V)``; ``state``
  is whatever the model carries (tensors, in tuples or lists), None for a fresh one;
* ``classifier``: the ``nn.Linear`` from the last hidden layer to the ``V`` words (tied to the embedding when
  ``tie_weights``), so the class-weight based targets (KD-sim) read it as they read a backbone's;
* ``vocab_size``: ``V``.

Factories are registered with :func:`register_language_model` and built with :func:`create_language_model`
(``kd-lightning backbones`` lists them after the image backbones). Built-in: ``lstm_small`` / ``lstm_medium`` /
``lstm_large`` (Zaremba et al.'s three sizes, as in the DUPS paper's Table 5), ``awd_lstm`` (the KD paper's
teacher: 1150 hidden, 400 embedding, 24.2M parameters) and ``awd_lstm_student`` (600 / 300, 9.1M).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kd_lightning.models.registry import registering_decorator

__all__ = [
    "AWDLSTM",
    "LSTMLanguageModel",
    "create_language_model",
    "detach_state",
    "list_language_models",
    "register_language_model",
]

_LANGUAGE_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_language_model(name: str | None = None) -> Callable:
    """Decorator that registers a factory ``fn(vocab_size: int, **kw) -> nn.Module`` (the contract above)."""
    return registering_decorator(_LANGUAGE_MODELS, "language model", name)


def list_language_models() -> list[str]:
    """Sorted names of the registered language models."""
    return sorted(_LANGUAGE_MODELS)


def create_language_model(name: str, vocab_size: int, **kwargs: Any) -> nn.Module:
    """Build the registered language model ``name`` over ``vocab_size`` words.

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid names), or ``vocab_size < 2``.
    """
    if name not in _LANGUAGE_MODELS:
        raise ValueError(f"unknown language model {name!r}; registered: {', '.join(list_language_models())}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    return _LANGUAGE_MODELS[name](vocab_size=vocab_size, **kwargs)


def detach_state(state: Any) -> Any:
    """The hidden state cut from the graph of the window that made it (truncated BPTT): every tensor detached."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    return state


class LSTMLanguageModel(nn.Module):
    """Zaremba et al. (2014): embedding, a stacked LSTM, a linear decoder; dropout on non-recurrent connections.

    Dropout ``p`` is applied to the embedded words, between LSTM layers and before the decoder, never on the
    recurrent connections. Every weight starts uniform in ``[-init_range, init_range]`` (0.1 / 0.05 / 0.04 for the
    small / medium / large models). State: ``(h, c)``, each ``(num_layers, B, hidden_size)``.

    Args:
        vocab_size: ``V``.
        hidden_size: width of the embedding and of every LSTM layer.
        num_layers: LSTM layers.
        dropout: ``p`` of the non-recurrent dropout.
        tie_weights: share the embedding and decoder weights (Press & Wolf 2017; not in Zaremba et al.).
        init_range: half-width of the uniform initialisation.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 200,
        num_layers: int = 2,
        dropout: float = 0.0,
        tie_weights: bool = False,
        init_range: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers, dropout=dropout, batch_first=True)
        self.classifier = nn.Linear(hidden_size, vocab_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -init_range, init_range)
        if tie_weights:
            self.classifier.weight = self.embedding.weight

    def forward(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
        """``(B, T)`` token ids and the previous state -> ``(B, T, V)`` logits and the new state."""
        hidden, state = self.lstm(self.dropout(self.embedding(tokens)), state)
        return self.classifier(self.dropout(hidden)), state


class _DropConnect(nn.Module):
    """Parametrisation of a weight matrix: dropout on its entries in training (DropConnect, Wan et al. 2013)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, weight: Tensor) -> Tensor:
        return F.dropout(weight, self.p, self.training)


def _locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Locked dropout (Gal & Ghahramani 2016): one mask per sequence, shared by the ``T`` steps of ``(B, T, D)``."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - p) / (1.0 - p)
    return x * mask


class AWDLSTM(nn.Module):
    """AWD-LSTM (Merity et al. 2018, "Regularizing and Optimizing LSTM Language Models").

    A stack of single-layer LSTMs (the last one as wide as the embedding, so the decoder can share the embedding's
    weights) with the paper's regularisers: DropConnect on every hidden-to-hidden matrix (``weight_drop``, a
    :mod:`torch.nn.utils.parametrize` parametrisation, so a new mask per forward and the raw weight is what the
    optimizer updates), embedding dropout (whole words dropped from the embedding matrix, ``embedding_dropout``),
    locked (variational) dropout on the embedded input (``input_dropout``), between layers (``hidden_dropout``) and
    on the output (``output_dropout``), and tied weights. NT-ASGD is the training side:
    :class:`~kd_lightning.callbacks.NTASGD`. Activation regularisation (AR/TAR) and variable-length BPTT of the
    reference code are not included. State: a list of ``(h, c)`` per layer.

    Args:
        vocab_size: ``V``.
        embedding_dim: embedding width (400 for the teacher, 300 for the student of Tang et al., App. 7.2).
        hidden_size: width of the inner LSTM layers (1150 / 600).
        num_layers: LSTM layers (3).
        output_dropout: locked dropout on the last layer's output (the reference code's ``dropout``).
        hidden_dropout: locked dropout between the LSTM layers (``dropouth``).
        input_dropout: locked dropout on the embedded input (``dropouti``).
        embedding_dropout: rate of whole words dropped from the embedding matrix (``dropoute``).
        weight_drop: DropConnect rate on the hidden-to-hidden matrices (``wdrop``).
        tie_weights: share the embedding and decoder weights.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 400,
        hidden_size: int = 1150,
        num_layers: int = 3,
        output_dropout: float = 0.4,
        hidden_dropout: float = 0.3,
        input_dropout: float = 0.65,
        embedding_dropout: float = 0.1,
        weight_drop: float = 0.5,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        rates = (output_dropout, hidden_dropout, input_dropout, embedding_dropout, weight_drop)
        if not all(0.0 <= p < 1.0 for p in rates):
            raise ValueError(f"dropout rates must be in [0, 1), got {rates}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.vocab_size = vocab_size
        self.output_dropout, self.hidden_dropout, self.input_dropout = output_dropout, hidden_dropout, input_dropout
        self.embedding_dropout = embedding_dropout
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        last = embedding_dim if tie_weights else hidden_size
        widths = [embedding_dim] + [hidden_size] * (num_layers - 1) + [last]
        self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in itertools.pairwise(widths))
        for layer in self.layers:
            parametrize.register_parametrization(layer, "weight_hh_l0", _DropConnect(weight_drop))
        self.classifier = nn.Linear(last, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.classifier.bias)
        if tie_weights:
            self.classifier.weight = self.embedding.weight

    def embed(self, tokens: Tensor) -> Tensor:
        """Embedding with embedding dropout: in training, each word's row is zeroed with probability ``p`` (for the
        whole batch) and the kept rows scaled by ``1 / (1 - p)``."""
        weight = self.embedding.weight
        if self.training and self.embedding_dropout > 0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1.0 - self.embedding_dropout)
            weight = weight * keep / (1.0 - self.embedding_dropout)
        return F.embedding(tokens, weight)

    def forward(self, tokens: Tensor, state: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Any]:
        """``(B, T)`` token ids and the previous state -> ``(B, T, V)`` logits and the new state."""
        x = _locked_dropout(self.embed(tokens), self.input_dropout, self.training)
        new_state = []
        for index, layer in enumerate(self.layers):
            x, layer_state = layer(x, None if state is None else state[index])
            new_state.append(layer_state)
            last = index == len(self.layers) - 1
            x = _locked_dropout(x, self.output_dropout if last else self.hidden_dropout, self.training)
        return self.classifier(x), new_state


@register_language_model("lstm_small")
def lstm_small(vocab_size: int, **kwargs: Any) -> LSTMLanguageModel:
    """Zaremba et al.'s small model: 2 x 200, no dropout, init 0.1 (4.65M parameters at V = 10k)."""
    return LSTMLanguageModel(vocab_size, **{"hidden_size": 200, "dropout": 0.0, "init_range": 0.1, **kwargs})


@register_language_model("lstm_medium")
def lstm_medium(vocab_size: int, **kwargs: Any) -> LSTMLanguageModel:
    """Zaremba et al.'s medium model: 2 x 650, dropout 0.5, init 0.05."""
    return LSTMLanguageModel(vocab_size, **{"hidden_size": 650, "dropout": 0.5, "init_range": 0.05, **kwargs})


@register_language_model("lstm_large")
def lstm_large(vocab_size: int, **kwargs: Any) -> LSTMLanguageModel:
    """Zaremba et al.'s large model: 2 x 1500, dropout 0.65, init 0.04."""
    return LSTMLanguageModel(vocab_size, **{"hidden_size": 1500, "dropout": 0.65, "init_range": 0.04, **kwargs})


@register_language_model("awd_lstm")
def awd_lstm(vocab_size: int, **kwargs: Any) -> AWDLSTM:
    """AWD-LSTM with the reference code's PTB defaults: 3 layers, 1150 hidden, 400 embedding (24.2M at V = 10k)."""
    return AWDLSTM(vocab_size, **kwargs)


@register_language_model("awd_lstm_student")
def awd_lstm_student(vocab_size: int, **kwargs: Any) -> AWDLSTM:
    """Tang et al.'s student (App. 7.2): 600 hidden, 300 embedding, embedding dropout 0.4 and RNN-layer dropout
    0.225 (read as the MoS code's ``dropouti`` / ``dropouth``, which it follows); 9.1M parameters at V = 10k."""
    defaults = {"embedding_dim": 300, "hidden_size": 600, "input_dropout": 0.4, "hidden_dropout": 0.225}
    return AWDLSTM(vocab_size, **{**defaults, **kwargs})
