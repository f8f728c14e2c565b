"""What a method's state needs to know about the ranks: where this process stands, how to sum over the ranks
(:class:`RankGroup`), and which samples of its epoch the distributed sampler repeated (:class:`ShardPadding`)."""

from __future__ import annotations

import atexit
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DistributedSampler

__all__ = ["RankGroup", "ShardPadding", "destroy_process_group_at_exit", "distributed_sampler_of"]


def _no_reduction(tensor: Tensor) -> Tensor:
    return tensor


@dataclass(frozen=True)
class RankGroup:
    """This process's place among the ranks and the sum over them: all that a rank-local state (a DUPS class table)
    needs of the process group, given to it by its module (only the module knows the trainer's strategy).

    Args:
        rank: the global rank, ``0 <= rank < world_size``.
        world_size: the number of processes.
        reduce_sum: sums a tensor over the ranks (every rank must call it at the same point); the default is the
            one-process identity.
    """

    rank: int = 0
    world_size: int = 1
    reduce_sum: Callable[[Tensor], Tensor] = field(default=_no_reduction, compare=False)

    @classmethod
    def of_trainer(cls, trainer: Any) -> RankGroup:
        """The trainer's ranks, summed by its strategy (``strategy.reduce(..., reduce_op="sum")``)."""
        return cls(trainer.global_rank, trainer.world_size, partial(trainer.strategy.reduce, reduce_op="sum"))


@cache
def destroy_process_group_at_exit() -> None:
    """Destroys this process's default process group when the interpreter exits (registered once per process).

    Lightning registers this for NCCL only. A gloo process that exits with its group alive can abort while the
    interpreter shuts down ("terminate called without an active exception", exit status -6 / SIGABRT) once the run
    has finished, which makes a finished ``ddp`` run look failed to a script or a sweep. Every method module asks
    for it in ``setup`` when it runs on several processes.
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def distributed_sampler_of(loader: Any) -> DistributedSampler | None:
    """The :class:`~torch.utils.data.DistributedSampler` that orders ``loader``'s samples (the sampler of its batch
    sampler, else its own sampler), or None."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if sampler is None:
        sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, DistributedSampler) else None


class ShardPadding:
    """Which samples of a rank's training epoch a distributed sampler repeated to give every rank as many.

    torch's :class:`~torch.utils.data.DistributedSampler` (``drop_last=False``, as Lightning installs it) extends the
    epoch's order of the ``N`` samples to ``total = ceil(N / W) * W`` positions by repeating its first
    ``total - N`` samples, and rank ``r`` takes the positions ``r, r + W, r + 2W, ...``. The padded positions
    ``N .. total - 1`` are therefore the last sample of the shards of ranks ``N mod W .. W - 1`` (none when ``W``
    divides ``N``; never on rank 0): rank ``r``'s first :attr:`own_samples` ``= len(range(r, N, W))`` samples are
    its own, the rest repeat samples another rank counts. (Lightning's ``DistributedSamplerWrapper`` around a custom
    sampler pads the same way; with ``drop_last=True`` nothing is padded.)

    Use: :meth:`of_loader` at the start of an epoch, then :meth:`next_mask` with every batch of the epoch, in order;
    the batches are taken to cover the sampler's order consecutively (the plain
    :class:`~torch.utils.data.BatchSampler`'s; its ``drop_last`` only drops the end). No tensor is made for a batch
    without padding.

    Args:
        own_samples: the samples of the epoch that are this rank's own; None: every sample (no padding).
    """

    def __init__(self, own_samples: int | None = None) -> None:
        self.own_samples = own_samples
        #: Samples of the epoch handed out so far.
        self.position = 0

    @classmethod
    def of_loader(cls, loader: Any) -> ShardPadding:
        """The padding of ``loader``'s epoch on this rank (``trainer.train_dataloader``).

        Nothing is padded unless the loader's sampler is a :class:`~torch.utils.data.DistributedSampler` that pads
        this rank's shard. Where it does but the loader's batch sampler is not a plain
        :class:`~torch.utils.data.BatchSampler` (whose batches follow the sampler's order), the padding cannot be
        located: a warning says so, and every sample is counted.
        """
        sampler = distributed_sampler_of(loader)
        if sampler is None:
            return cls()
        size = len(sampler.dataset)
        own = len(range(sampler.rank, min(size, sampler.total_size), sampler.num_replicas))
        if own == sampler.num_samples:
            return cls()
        batch_sampler = getattr(loader, "batch_sampler", None)
        if type(batch_sampler) is not BatchSampler:
            warnings.warn(
                f"the distributed sampler pads rank {sampler.rank}'s shard with {sampler.num_samples - own} repeated "
                f"sample(s) ({size} samples over {sampler.num_replicas} ranks), but the loader's batch sampler "
                f"{type(batch_sampler).__name__} does not tell where they are: they are counted twice; a training "
                "set size divisible by the number of ranks has no padding",
                stacklevel=2,
            )
            return cls()
        return cls(own)

    def next_mask(self, num_samples: int, device: torch.device | str | None = None) -> Tensor | None:
        """``(num_samples,)`` bool: which samples of the next batch are this rank's own (False: padding); None when
        all are (every batch but the one holding a padded sample)."""
        start = self.position
        self.position += num_samples
        if self.own_samples is None or self.position <= self.own_samples:
            return None
        return torch.arange(start, self.position, device=device) < self.own_samples
