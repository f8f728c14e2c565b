"""Index-level building blocks of the classification datamodules: the stratified split, a transformed subset of
a raw dataset, and the collate function of ``(x, y)`` / two-view batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

__all__ = ["TransformedSubset", "collate_pairs", "stratified_split"]


def stratified_split(labels: Tensor, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Stratified split of the indices ``0..N-1`` into ``(rest, held_out)``, ``held_out`` of length ``size``.

    Each class gets ``floor(size * n_c / N)`` held-out samples; the remaining ones go to the classes with the
    largest fractional parts (ties broken at random). Samples are drawn uniformly within each class.

    Args:
        labels: ``(N,)`` integer class labels.
        size: Number of held-out indices, ``0 <= size <= N``.
        generator: Source of randomness (the split is a function of its state).

    Returns:
        ``(rest, held_out)``: two sorted long tensors partitioning ``0..N-1``.
    """
    n = labels.numel()
    if not 0 <= size <= n:
        raise ValueError(f"Cannot hold out {size} of {n} samples.")
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * size / n
    take = quota.floor().long()
    missing = size - int(take.sum())
    order = torch.randperm(len(classes), generator=generator)
    by_fraction = order[torch.argsort((quota - take)[order], descending=True, stable=True)]
    take[by_fraction[:missing]] += 1
    held = [torch.empty(0, dtype=torch.long)]
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        held.append(members[torch.randperm(len(members), generator=generator)[:k]])
    held_out = torch.cat(held).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().flatten(), held_out


class TransformedSubset(Dataset):
    """The samples ``indices`` of a raw ``(x, y)`` dataset, with ``transform`` applied to ``x``.

    Args:
        dataset: A map-style dataset of ``(raw_x, label)`` pairs.
        indices: Which samples to expose (None: all of them, in order).
        transform: Per-sample transform of ``raw_x`` (None: identity).
    """

    def __init__(
        self, dataset: Dataset, indices: Sequence[int] | Tensor | None = None, transform: Callable | None = None
    ) -> None:
        self.dataset = dataset
        self.indices = indices.tolist() if isinstance(indices, Tensor) else indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[self.indices[index] if self.indices is not None else index]
        return (self.transform(x) if self.transform is not None else x), y


def collate_pairs(samples: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """``default_collate`` that returns an ``(x, y)`` tuple, with two views as a tuple ``(x_a, x_b)`` (and a teacher
    store's rows: ``(x, y, rows)``)."""
    x, *rest = default_collate(samples)
    return (tuple(x) if isinstance(x, list) else x), *rest
