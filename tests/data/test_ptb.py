"""PTBDataModule: vocabulary, batchify / BPTT windows and their continuity, epoch pieces, DDP slicing, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd_lightning.data import PTBDataModule
from kd_lightning.data.ptb import EOS, BPTTWindows, batchify, read_words
from tests.data.ptb_fakes import WORDS, write_ptb


def _datamodule(tmp_path, **kwargs) -> PTBDataModule:
    data = PTBDataModule(str(write_ptb(tmp_path / "ptb")), **kwargs)
    data.setup("fit")
    return data


def test_words_vocabulary_and_streams(tmp_path):
    data = _datamodule(tmp_path)
    path = tmp_path / "ptb" / "ptb.train.txt"
    lines = path.read_text().splitlines()
    words = read_words(path)
    assert words[: len(WORDS) + 1] == [*WORDS, EOS] and words.count(EOS) == len(lines)
    assert data.vocabulary == [*WORDS, EOS] and data.num_classes == len(WORDS) + 1
    decoded = [data.vocabulary[i] for i in data.streams["train"].tolist()]
    assert decoded == words


def test_batchify_rows_are_contiguous_pieces_and_drop_the_tail():
    stream = torch.arange(23)
    rows = batchify(stream, 4)
    assert rows.shape == (4, 5) and torch.equal(rows[1], torch.arange(5, 10))
    with pytest.raises(ValueError, match="too short"):
        batchify(torch.arange(7), 4)


def test_windows_shapes_targets_and_continuity():
    rows = torch.arange(60).view(3, 20)
    windows = list(BPTTWindows(rows, bptt=6))
    assert len(windows) == len(BPTTWindows(rows, 6)) == 4  # 19 predictions: 6 + 6 + 6 + 1
    assert [x.shape for x, _ in windows] == [(3, 6), (3, 6), (3, 6), (3, 1)]
    for x, y in windows:
        assert torch.equal(y, x + 1)  # the next word of every position
    # row b of window k+1 starts where row b of window k stopped: the inputs tile each row exactly
    assert torch.equal(torch.cat([x for x, _ in windows], dim=1), rows[:, :-1])
    assert torch.equal(windows[1][0][:, 0], windows[0][1][:, -1])


def test_epoch_pieces_cover_a_pass_in_order(tmp_path):
    data = _datamodule(tmp_path, batch_size=2, bptt=4, epochs_per_pass=3)
    data.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1)
    loader = data.train_dataloader()
    inputs = []
    for epoch in range(3):
        data.trainer.current_epoch = epoch
        inputs.append(torch.cat([x for x, _ in loader], dim=1))
    rows = batchify(data.streams["train"], 2)
    covered = torch.cat(inputs, dim=1)
    assert torch.equal(covered, rows[:, : covered.shape[1]]) and covered.shape[1] >= rows.shape[1] - 4
    data.trainer.current_epoch = 3  # the next pass starts over
    assert torch.equal(torch.cat([x for x, _ in loader], dim=1), inputs[0])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_slicing_gives_each_rank_a_contiguous_slice(tmp_path, world_size):
    data = _datamodule(tmp_path, batch_size=2, eval_batch_size=1, bptt=5)
    stream = data.streams["train"]
    slices, lengths = [], set()
    for rank in range(world_size):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        loader = data.train_dataloader()
        lengths.add(len(loader))
        windows = list(loader)
        rows = torch.cat([x for x, _ in windows] + [windows[-1][1][:, -1:]], dim=1)  # inputs + the last target
        slices.append(rows.flatten())  # the rank's rows, one after the other
        assert loader.sampler.__class__.__name__ == "_InfiniteConstantSampler"  # no distributed sampler
    assert len(lengths) == 1  # every rank has as many windows (DDP steps in lockstep)
    joined = torch.cat(slices)
    assert torch.equal(joined, stream[: len(joined)]) and len(stream) - len(joined) < 2 * world_size


def test_missing_and_malformed_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ptb.valid.txt.*download: true"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "ptb.train.txt").write_text(" a b \n")
        PTBDataModule(str(tmp_path / "d")).setup("fit")
    root = write_ptb(tmp_path / "bad")
    (root / "ptb.test.txt").write_text(" the zebra said \n")
    with pytest.raises(ValueError, match=r"ptb.test.txt has words that are not in the training file.*zebra"):
        PTBDataModule(str(root)).setup("fit")
    (root / "ptb.test.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no words"):
        PTBDataModule(str(root)).setup("fit")
    with pytest.raises(RuntimeError, match="call setup"):
        _ = PTBDataModule(str(root)).num_classes


@pytest.mark.parametrize("name", ["batch_size", "eval_batch_size", "bptt", "epochs_per_pass"])
def test_sizes_below_one_are_rejected(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        PTBDataModule(**{name: 0})
