"""Language models: parameter counts against the papers, the stateful contract, AWD-LSTM's regularisers, registry."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.models.lstm_lm import (
    AWDLSTM,
    create_language_model,
    detach_state,
    list_language_models,
    register_language_model,
)


def _lstm(inputs: int, hidden: int) -> int:
    """Parameters of one LSTM layer: 4 gates, input and recurrent weights, two biases."""
    return 4 * hidden * (inputs + hidden) + 8 * hidden


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def test_zaremba_sizes_count_their_parameters():
    vocab = 10000
    for name, hidden in (("lstm_small", 200), ("lstm_medium", 650), ("lstm_large", 1500)):
        expected = vocab * hidden + 2 * _lstm(hidden, hidden) + hidden * vocab + vocab
        assert _count(create_language_model(name, vocab)) == expected
    assert round(_count(create_language_model("lstm_large", vocab)) / 1e6) == 66  # Zaremba et al.: 66M


def test_awd_lstm_teacher_and_student_have_the_papers_sizes():
    """Tang et al., App. 7.2: teacher 1150 hidden / 400 embedding (24.2M), student 600 / 300 (9.1M), tied."""
    vocab = 10000
    for name, (emb, hid), millions in (("awd_lstm", (400, 1150), 24.2), ("awd_lstm_student", (300, 600), 9.1)):
        model = create_language_model(name, vocab)
        expected = vocab * emb + _lstm(emb, hid) + _lstm(hid, hid) + _lstm(hid, emb) + vocab
        assert _count(model) == expected and round(expected / 1e6, 1) == millions
        assert model.classifier.weight is model.embedding.weight
    student = create_language_model("awd_lstm_student", vocab)
    assert (student.input_dropout, student.hidden_dropout) == (0.4, 0.225)


@pytest.mark.parametrize(
    ("name", "kwargs"), [("lstm_small", {"hidden_size": 8}), ("awd_lstm", {"embedding_dim": 6, "hidden_size": 10})]
)
def test_state_carries_one_long_sequence_over_windows(name, kwargs):
    torch.manual_seed(0)
    model = create_language_model(name, 30, **kwargs).eval()
    tokens = torch.randint(0, 30, (3, 12))
    whole, _ = model(tokens)
    first, state = model(tokens[:, :5])
    second, _ = model(tokens[:, 5:], detach_state(state))
    assert whole.shape == (3, 12, 30)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


def test_awd_regularisers_act_only_in_training():
    torch.manual_seed(0)
    model = AWDLSTM(40, embedding_dim=6, hidden_size=10, weight_drop=0.5)
    tokens = torch.randint(0, 40, (4, 7))
    model.train()
    a, _ = model(tokens)
    b, _ = model(tokens)
    assert not torch.allclose(a, b)  # fresh DropConnect / dropout masks per forward
    a.sum().backward()
    raw = model.layers[0].parametrizations.weight_hh_l0.original
    assert raw.grad is not None and raw.grad.abs().sum() > 0  # the optimizer updates the raw weight
    model.eval()
    torch.testing.assert_close(model(tokens)[0], model(tokens)[0])
    # embedding dropout drops whole words: a dropped word's embedding is zero at every position
    model.train()
    model.embedding_dropout = 0.5
    embedded = model.embed(torch.arange(40)[None].repeat(2, 1))
    zero_rows = (embedded == 0).all(-1)
    assert zero_rows.any() and torch.equal(zero_rows[0], zero_rows[1])


def test_registry_errors_and_listing():
    assert {"lstm_small", "lstm_medium", "lstm_large", "awd_lstm", "awd_lstm_student"} <= set(list_language_models())
    with pytest.raises(ValueError, match=r"unknown language model 'gpt'.*lstm_small"):
        create_language_model("gpt", 10)
    with pytest.raises(ValueError, match="vocab_size must be >= 2"):
        create_language_model("lstm_small", 1)
    with pytest.raises(ValueError, match="language model 'lstm_small' is already registered"):
        register_language_model("lstm_small")(lambda vocab_size: None)
    with pytest.raises(ValueError, match=r"dropout rates must be in \[0, 1\)"):
        AWDLSTM(10, weight_drop=1.0)
