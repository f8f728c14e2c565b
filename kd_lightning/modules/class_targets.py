"""The DUPS class-target tables: per-class teacher distributions from peer samples, dense or top-k."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kd_lightning.fused import SparseTargets, cross_entropy_and_kd, expand_sparse_targets, sparse_target_terms
from kd_lightning.losses import KDSettings
from kd_lightning.modules.distributed import RankGroup

__all__ = ["ClassTargetTable", "TopKClassTargetTable"]


class _ClassTable(nn.Module):
    """What the dense and the top-k class-target tables share: arguments, per-class counts, peers, ranks, the loss,
    DDP exclusion."""

    def __init__(
        self, num_classes: int, settings: KDSettings, peers_per_class: int | None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if peers_per_class is not None and peers_per_class < 1:
            raise ValueError(f"peers_per_class must be >= 1 or None (all samples of the class), got {peers_per_class}")
        self.num_classes = num_classes
        #: The loss's settings; their ``temperature`` also softens the statistics.
        self.settings = settings
        self.peers_per_class = peers_per_class
        #: The dtype the targets are stored in (the statistics stay float32).
        self.dtype = dtype
        #: The ranks the statistics are summed over (one process until the owning module sets the trainer's).
        self.ranks = RankGroup()
        self.register_buffer("has_target", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("counts", torch.zeros(num_classes))

    @property
    def temperature(self) -> float:
        """``T`` of the softened statistics and of the KD term (:attr:`settings`)."""
        return self.settings.temperature

    def exclude_from_ddp_broadcast(self, root: nn.Module) -> None:
        """Keep DDP (``broadcast_buffers=True``, Lightning's default) from syncing this table's buffers.

        ``root`` is the module DDP wraps (the LightningModule) holding this table; the buffers' qualified names are
        added to ``root._ddp_params_and_buffers_to_ignore`` before DDP wraps ``root``. A private torch API: torch
        (checked up to 2.14) has no public way to keep some buffers out of DDP's broadcast (only
        ``broadcast_buffers=False`` for all of them, which would stop the backbone's BatchNorm statistics too).
        """
        prefix = next(name for name, module in root.named_modules() if module is self)
        ignored = getattr(root, "_ddp_params_and_buffers_to_ignore", [])
        names = [f"{prefix}.{name}" for name, _ in self.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, [*ignored, *names])

    def ce_and_kd_loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(ce_weight * CE, kd_weight * KD)`` of the ``(B, C)`` logits in one pass with :attr:`settings`, the KD
        term against the labels' rows (:func:`~kd_lightning.fused.cross_entropy_and_kd`, with the
        subclass's ``batch_targets``)."""
        return cross_entropy_and_kd(logits, labels, *self.batch_targets(labels), self.settings)

    def peers_per_rank(self, rank: int = 0, world_size: int = 1) -> int | None:
        """Samples per class that rank ``rank`` of ``world_size`` keeps: ``n // W + (rank < n % W)``; None: all."""
        if self.peers_per_class is None:
            return None
        return self.peers_per_class // world_size + int(rank < self.peers_per_class % world_size)

    def own_quota(self) -> int | None:
        """:meth:`peers_per_rank` of this process (:attr:`ranks`)."""
        return self.peers_per_rank(self.ranks.rank, self.ranks.world_size)

    def peer_weights(self, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B,)`` float 1/0: whether each sample counts for its class: it is in ``mask`` (None: every sample) and
        its class is still under this rank's quota (:meth:`own_quota`).

        A sample outside ``mask`` (a distributed sampler's padding, see
        :class:`~kd_lightning.modules.distributed.ShardPadding`) takes no place in its class's quota: the random ranks
        within a class are drawn among the samples in ``mask`` (by the same draw from the global RNG as without a
        mask).
        """
        quota = self.own_quota()
        if quota is None:
            return torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.float()
        if mask is None:
            return (self.counts[labels] + _random_rank_within_class(labels) < quota).float()
        groups = torch.where(mask, labels, labels + self.num_classes)  # the masked samples ranked apart
        return (mask & (self.counts[labels] + _random_rank_within_class(groups) < quota)).float()


class ClassTargetTable(_ClassTable):
    """Per-class teacher distributions averaged over peer samples of the class (DUPS, Eq. 4-5), with statistics.

    Row ``c`` of :attr:`targets` is the teacher signal :math:`f_T(c)` shared by every sample of class ``c``:

    .. math:: f_T(c) = \\frac{1}{|Y_c|} \\sum_{(x, c) \\in Y_c} \\mathrm{softmax}(z(x) / T)
        \\quad\\text{(``average="probs"``, default)}, \\qquad
        f_T(c) = \\mathrm{softmax}\\Big(\\frac{1}{|Y_c|} \\sum_{(x, c) \\in Y_c} z(x) / T\\Big)
        \\quad\\text{(``average="logits"``)},

    over a set :math:`Y_c` of at most ``peers_per_class`` samples of class ``c`` (all of them for None). The paper's
    "average softened logit" reads either way; the two differ (the mean of softmaxes is flatter).

    Use: :meth:`update` with each batch's logits during a statistics pass (vectorised: no loop over samples or
    classes), then :meth:`finalize` once on every rank: it sums the statistics over the ranks of :attr:`ranks`
    (which the owning module sets, :class:`~kd_lightning.modules.distributed.RankGroup`) *before* dividing, so every
    rank holds the same table, replaces the rows of the classes that were seen, and clears the statistics. A class
    seen by no sample keeps its previous row; a class that never had one keeps a zero row, which gives no KD term
    (``KL(0 || p) = 0``), and ``has_target[c] = False``.

    Peers: with ``peers_per_class = n``, :meth:`update` keeps, per class, the first samples it is given until the class
    has its quota, taking a random subset of the samples of one batch (random ranks within the class from a random
    permutation). When the batches come in random order (a shuffled training loader, or the shuffled pass of
    DUPSModule's ``statistics="recompute"``), the kept samples are a uniformly random subset of the class. Over
    ``W`` ranks, rank ``r`` keeps :math:`\\lfloor n/W \\rfloor + [r < n \\bmod W]` samples per class (see
    :meth:`peers_per_rank`), so exactly ``n`` in total when every rank sees enough of the class.

    Buffers (saved in checkpoints, moved to the module's device): ``targets`` ``(C, C)`` (``dtype``: float32, or 16
    bits to halve it), ``has_target`` ``(C,)`` bool, and the running statistics ``sums`` ``(C, C)`` and ``counts``
    ``(C,)`` (float32 whatever ``dtype``: the targets are rounded once, when built). Checkpoints hold ``sums`` only
    while statistics are pending (otherwise an empty placeholder: 10k words, 16 bits, 200 MB instead of 800). DDP's
    ``broadcast_buffers`` would overwrite every rank's statistics with rank 0's at each forward (and send the table
    at every step): the module that owns a table calls :meth:`exclude_from_ddp_broadcast` in its ``__init__``.

    Args:
        num_classes: ``C``.
        settings: the KD loss's settings (:meth:`ce_and_kd_loss`); their ``T`` also softens the statistics.
        peers_per_class: at most this many samples per class over all ranks (None: every sample of the pass).
        average: ``"probs"`` (mean of softmax(z/T)) or ``"logits"`` (softmax of the mean logit / T).
        dtype: the targets' dtype.

    Raises:
        ValueError: ``num_classes < 1``, ``peers_per_class < 1`` or an unknown ``average``.
    """

    def __init__(
        self,
        num_classes: int,
        settings: KDSettings,
        peers_per_class: int | None = None,
        average: Literal["probs", "logits"] = "probs",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if average not in ("probs", "logits"):
            raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
        super().__init__(num_classes, settings, peers_per_class, dtype)
        self.average = average
        self.register_buffer("targets", torch.zeros(num_classes, num_classes, dtype=dtype))
        self.register_buffer("sums", torch.zeros(num_classes, num_classes))
        self._row_statistics_key: tuple[int, int] | None = None
        self._row_statistics = (torch.zeros(num_classes), torch.zeros(num_classes))

    def forward(self, labels: Tensor) -> Tensor:
        """``(B, C)`` float32 teacher distributions of the ``(B,)`` labels (zero rows for classes without a target)."""
        return self.targets[labels].float()

    def batch_targets(self, labels: Tensor) -> tuple[Callable[[slice], Tensor], Tensor, Tensor]:
        """The targets of the ``(B,)`` labels for :func:`~kd_lightning.fused.cross_entropy_and_kd`: their float32
        rows, gathered a chunk of the batch at a time, and their entropy terms and masses."""
        neg_entropy, mass = (stat[labels] for stat in self.row_statistics())
        return lambda rows: self.targets.index_select(0, labels[rows]).float(), neg_entropy, mass

    def row_statistics(self) -> tuple[Tensor, Tensor]:
        """``(C,)`` :math:`\\sum_j f_T(c)_j \\log f_T(c)_j` (the KL's constant term) and ``(C,)`` masses of the rows
        (0 for a zero row); recomputed only when the targets change (their in-place version counter or storage)."""
        key = (self.targets._version, self.targets.data_ptr())
        if self._row_statistics_key != key:
            rows = [chunk.float() for chunk in self.targets.split(1024)]  # float32 a chunk of rows at a time
            entropy, mass = [torch.xlogy(c, c).sum(-1) for c in rows], [c.sum(-1) for c in rows]
            self._row_statistics = (torch.cat(entropy), torch.cat(mass))
            self._row_statistics_key = key
        return self._row_statistics

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> None:
        """Add the ``(B, C)`` logits (detached) of samples with ``(B,)`` labels to the per-class statistics.

        With ``peers_per_class``, a sample counts only while its class has fewer than :meth:`peers_per_rank` samples;
        within the batch, the samples of a class are taken in a random order (this draws from the global RNG).
        ``mask``: ``(B,)`` bool, the samples to count (False: a distributed sampler's padding, which another rank
        counts already: :meth:`~kd_lightning.modules.distributed.ShardPadding.next_mask`); None: every sample.
        """
        weight = self.peer_weights(labels, mask)
        values = logits.detach().float()
        if self.average == "probs":  # a fresh buffer: weighted in place
            values = (values / self.temperature).softmax(dim=-1).mul_(weight[:, None])
        else:
            values = values * weight[:, None]
        self.sums.index_add_(0, labels, values)
        self.counts.index_add_(0, labels, weight)

    @torch.no_grad()
    def finalize(self) -> Tensor:
        """Sum the statistics over :attr:`ranks`, turn them into targets, clear them; returns the ``(C,)`` summed
        counts. One reduction, of the sums and counts in one ``(C, C + 1)`` tensor: every rank must call
        :meth:`finalize` at the same point."""
        stats = self.ranks.reduce_sum(torch.cat([self.sums, self.counts[:, None]], dim=1))
        sums, counts = stats[:, :-1], stats[:, -1]
        seen = counts > 0
        mean = sums / counts.clamp_min(1)[:, None]
        if self.average == "logits":
            mean = (mean / self.temperature).softmax(dim=-1)
        self.targets.copy_(torch.where(seen[:, None], mean, self.targets))
        self.has_target |= seen
        self.reset_statistics()
        return counts

    def reset_statistics(self) -> None:
        """Clear the running sums and counts (the targets stay)."""
        self.sums.zero_()
        self.counts.zero_()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Without pending statistics, ``sums`` is saved as an empty placeholder (``C^2`` zeros otherwise)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not bool(self.counts.any()):
            destination[prefix + "sums"] = self.sums.new_zeros(0)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "sums" in state_dict and state_dict[prefix + "sums"].numel() == 0:
            state_dict[prefix + "sums"] = torch.zeros_like(self.sums)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, temperature={self.temperature}, "
            f"peers_per_class={self.peers_per_class}, "
            f"average={self.average!r}, dtype={self.dtype}"
        )


class TopKClassTargetTable(_ClassTable):
    r""":class:`ClassTargetTable` in bounded memory: each class keeps its ``k`` largest target entries (DUPS for
    language models, where a "class" is the next word and the dense table is ``V x V``).

    Row ``c`` is :math:`f_T(c)` of Eq. 4-5 (the mean of :math:`\mathrm{softmax}(z/T)` over the peers of ``c``)
    reduced to its ``k`` largest entries, the remaining mass spread uniformly over the other ``C - k`` classes (as
    KD-topk's target); :meth:`ce_and_kd_loss` (DUPS's stages >= 1) expands
    no row: the entropy term comes from the stored entries. Memory: ``C * k * 12`` bytes for the table and
    ``C * m * 12`` for the statistics, against ``8 * C^2`` for the dense table and its sums (10k words, k = 100:
    12 + 24 MB instead of 800 MB).

    Statistics, per rank, within the same bound: every sample adds its ``m = min(2k, C)`` largest probabilities
    (the rest of its mass is left to the uniform remainder); the additions are buffered and merged into a
    ``(C, m)`` table of per-class sums that keeps each class's ``m`` largest (coalesced by ``(class, word)``,
    vectorised: one sort per merge). An entry pushed out of a class's ``m`` loses what it had summed, so the kept
    sums are lower bounds of the dense ones, exact while a class's samples share at most ``m`` distinct words
    (always when ``m = C``), and the ``k`` kept of ``m = 2k`` are the dense table's top-k in practice (tested
    against it). :meth:`finalize` merges the ranks' tables the same way (an all-gather made of one sum-reduce), so
    every rank holds the same targets. Only ``average="probs"`` (a mean of logits needs every entry).

    Buffers (checkpointed; pending additions are merged first): ``values`` ``(C, k)`` and ``rest`` ``(C,)`` (of
    ``dtype``), ``indices`` ``(C, k)`` long, ``has_target``, the float32 statistics ``stat_values`` /
    ``stat_indices`` ``(C, m)`` and ``counts``.

    Args:
        num_classes: ``C``.
        settings: as :class:`ClassTargetTable`'s.
        k: entries kept per class, ``1 <= k < C``.
        peers_per_class: as :class:`ClassTargetTable`'s.
        dtype: the dtype of ``values`` and ``rest``.

    Raises:
        ValueError: ``k`` out of range and the errors of :class:`ClassTargetTable`.
    """

    def __init__(
        self,
        num_classes: int,
        settings: KDSettings,
        k: int,
        peers_per_class: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 1 <= k < num_classes:
            raise ValueError(f"a top-k class table needs 1 <= k < num_classes={num_classes}, got k={k}")
        super().__init__(num_classes, settings, peers_per_class, dtype)
        self.k = k
        self.width = min(2 * k, num_classes)
        self.register_buffer("values", torch.zeros(num_classes, k, dtype=dtype))
        self.register_buffer("indices", torch.zeros(num_classes, k, dtype=torch.long))
        self.register_buffer("rest", torch.zeros(num_classes, dtype=dtype))
        self.register_buffer("stat_values", torch.zeros(num_classes, self.width))
        self.register_buffer("stat_indices", torch.zeros(num_classes, self.width, dtype=torch.long))
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.merge_pending())

    def batch_targets(self, labels: Tensor) -> tuple[SparseTargets, Tensor, Tensor]:
        """The targets of the ``(B,)`` labels for :func:`~kd_lightning.fused.cross_entropy_and_kd`: their stored
        entries (no row is expanded), entropy terms and masses."""
        return sparse_target_terms(self.values[labels], self.indices[labels], self.rest[labels], self.num_classes)

    def dense(self) -> Tensor:
        """The ``(C, C)`` table the stored entries stand for (for inspection and tests; ``C^2`` floats)."""
        return expand_sparse_targets(self.values, self.indices, self.rest, self.num_classes)

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> None:
        """Add the ``m`` largest softened probabilities of each of the ``(B, C)`` logits to its label's statistics
        (``peers_per_class`` and ``mask`` as in :meth:`ClassTargetTable.update`)."""
        weight = self.peer_weights(labels, mask)
        probs = (logits.detach().float() / self.temperature).softmax(dim=-1)
        values, indices = probs.topk(self.width, dim=-1)
        self._pending.append((labels[:, None].expand_as(indices), indices, values * weight[:, None]))
        self.counts.index_add_(0, labels, weight)
        if sum(part[0].numel() for part in self._pending) >= self.stat_values.numel():
            self.merge_pending()

    @torch.no_grad()
    def merge_pending(self) -> None:
        """Fold the buffered additions into ``stat_values`` / ``stat_indices``."""
        if not self._pending:
            return
        rows, cols, vals = (torch.cat([part[i].flatten() for part in self._pending]) for i in range(3))
        self._pending.clear()
        self._merge(rows, cols, vals)

    def _merge(self, rows: Tensor, cols: Tensor, vals: Tensor) -> None:
        """Coalesce ``(row, col, value)`` triples with the current statistics and keep each row's ``m`` largest."""
        own_rows = torch.arange(self.num_classes, device=rows.device)[:, None].expand_as(self.stat_indices)
        rows = torch.cat([own_rows.flatten(), rows])
        cols = torch.cat([self.stat_indices.flatten(), cols])
        vals = torch.cat([self.stat_values.flatten(), vals])
        values, indices = _top_per_row(rows, cols, vals, self.num_classes, self.width)
        self.stat_values.copy_(values)
        self.stat_indices.copy_(indices)

    @torch.no_grad()
    def finalize(self) -> Tensor:
        """As :meth:`ClassTargetTable.finalize`: merge over :attr:`ranks`, turn into targets, clear; returns the
        counts."""
        self.merge_pending()
        rank, world_size = self.ranks.rank, self.ranks.world_size
        gathered = torch.zeros(world_size, self.num_classes, 2 * self.width + 1, device=self.counts.device)
        gathered[rank] = torch.cat([self.stat_values, self.stat_indices.float(), self.counts[:, None]], dim=1)
        gathered = self.ranks.reduce_sum(gathered)
        counts = gathered[..., -1].sum(0)
        self.reset_statistics()
        rows = torch.arange(self.num_classes, device=counts.device)[None, :, None].expand(world_size, -1, self.width)
        sums, words = _top_per_row(
            rows.flatten(),
            gathered[..., self.width : 2 * self.width].long().flatten(),
            gathered[..., : self.width].flatten(),
            self.num_classes,
            self.k,
        )
        seen = counts > 0
        mean = sums / counts.clamp_min(1)[:, None]
        rest = (1.0 - mean.sum(-1)).clamp_min(0.0) / (self.num_classes - self.k)
        self.values.copy_(torch.where(seen[:, None], mean, self.values))
        self.indices.copy_(torch.where(seen[:, None], words, self.indices))
        self.rest.copy_(torch.where(seen, rest, self.rest))
        self.has_target |= seen
        return counts

    def reset_statistics(self) -> None:
        """Clear the statistics and pending additions (the targets stay)."""
        self._pending.clear()
        self.stat_values.zero_()
        self.stat_indices.zero_()
        self.counts.zero_()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, temperature={self.temperature}, k={self.k}, "
            f"peers_per_class={self.peers_per_class}, dtype={self.dtype}"
        )


def _top_per_row(rows: Tensor, cols: Tensor, vals: Tensor, num_rows: int, width: int) -> tuple[Tensor, Tensor]:
    """Sum the values of equal ``(row, col)`` pairs of a square ``num_rows x num_rows`` table, then keep each row's
    ``width`` largest sums.

    Returns ``(num_rows, width)`` sums (descending) and their columns; unfilled slots hold 0 and column 0.
    """
    key, inverse = (rows * num_rows + cols).unique(return_inverse=True)
    sums = torch.zeros(len(key), dtype=vals.dtype, device=vals.device).index_add_(0, inverse, vals)
    order = sums.argsort(descending=True, stable=True)
    order = order[(key[order] // num_rows).argsort(stable=True)]
    key, sums = key[order], sums[order]
    row = key // num_rows
    rank = torch.arange(len(row), device=row.device) - torch.searchsorted(row, row)
    keep = rank < width
    out_values = torch.zeros(num_rows, width, dtype=vals.dtype, device=vals.device)
    out_columns = torch.zeros(num_rows, width, dtype=torch.long, device=vals.device)
    out_values[row[keep], rank[keep]] = sums[keep]
    out_columns[row[keep], rank[keep]] = key[keep] % num_rows
    return out_values, out_columns


def _random_rank_within_class(labels: Tensor) -> Tensor:
    """``(B,)`` rank of each sample among the samples of its class in the batch, in a uniformly random order.

    A random permutation, then a stable sort by label groups each class in permuted order; a sample's rank is its
    position minus the position of its class's first sample (``searchsorted``).
    """
    perm = torch.randperm(labels.numel(), device=labels.device)
    sorted_labels, order = labels[perm].sort(stable=True)
    position = torch.arange(labels.numel(), device=labels.device)
    ranks = torch.empty_like(position)
    ranks[perm[order]] = position - torch.searchsorted(sorted_labels, sorted_labels)
    return ranks
