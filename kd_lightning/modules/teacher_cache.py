"""The teacher-output cache: a teacher's top-k outputs of every training input, looked up by input content.

Deprecated (``DistillModule(cache_teacher_topk=...)`` warns): :mod:`kd_lightning.teacher_store` supersedes it, on disk,
with augmentation and under DDP. Kept for one release so that configs using it keep working.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TeacherOutputCache"]


class TeacherOutputCache(nn.Module):
    """The teacher's top-k probabilities of every training input, stored compactly and looked up by input content.

    For inputs without random augmentation (the synthetic data, language models' fixed windows) the teacher's output
    never changes, so one pass is enough. During the first epoch :meth:`encode` compresses the teacher's
    distributions (the ``k`` largest probabilities at the distillation temperature as float16, their classes as int32)
    and :meth:`add` stores them under a content key of the input (two random projections of the flattened input, in
    float64); :meth:`finalize` sorts the keys, after which :meth:`lookup` finds a batch's rows with ``searchsorted``
    (vectorised, no teacher forward). :meth:`decode` rebuilds ``(B, K)`` distributions, the remaining mass spread
    uniformly over the other ``K - k`` classes: exact up to float16 when ``k = K``, otherwise KD-topk's target
    (Sec. 5.3 of Tang et al.). The same decoded values are used while filling and afterwards, so a run does not
    depend on when the cache was built. Memory: ``N * (6k + 16)`` bytes; the buffers are not checkpointed (a resumed
    run rebuilds them in its first epoch).

    One process: each caches the inputs it is dealt, so under DDP the distributed sampler deals a rank inputs it has
    not cached after the first epoch, which :meth:`lookup` refuses. Nothing is counted: an input added twice (one
    a distributed sampler repeats to pad a shard) is stored twice, harmlessly (:meth:`lookup` finds either copy,
    and both hold the same values).

    Args:
        k: probabilities kept per input.
        seed: seed of the projections.
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"the teacher cache keeps k >= 1 probabilities per input, got k={k}")
        self.k = k
        self.seed = seed
        self.register_buffer("keys", torch.empty(0, 2, dtype=torch.float64), persistent=False)
        self.register_buffer("values", torch.empty(0, k, dtype=torch.float16), persistent=False)
        self.register_buffer("indices", torch.empty(0, k, dtype=torch.int32), persistent=False)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.ready = False

    def key(self, x: Tensor) -> Tensor:
        """``(B, 2)`` float64 content keys of the inputs ``(B, ...)``."""
        flat = x.flatten(1).double()
        generator = torch.Generator().manual_seed(self.seed)
        projection = torch.randn(flat.shape[1], 2, generator=generator, dtype=torch.float64).to(flat.device)
        return flat @ projection

    def encode(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, K)`` distributions -> their ``k`` largest values (float16) and classes (int32)."""
        values, indices = probs.float().topk(min(self.k, probs.shape[1]), dim=-1)
        return values.half(), indices.int()

    @staticmethod
    def decode(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
        """``(B, k)`` values and classes -> ``(B, K)`` float32 distributions, the rest of the mass uniform."""
        values = values.float()
        k = values.shape[1]
        rest = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
        full = rest.expand(-1, num_classes).scatter(1, indices.long(), values)
        return full / full.sum(-1, keepdim=True)

    def add(self, x: Tensor, values: Tensor, indices: Tensor) -> None:
        """Stores encoded outputs of the inputs ``x`` (while filling, before :meth:`finalize`)."""
        self._pending.append((self.key(x), values, indices))

    def finalize(self) -> None:
        """Sorts what :meth:`add` stored; :meth:`lookup` works from now on."""
        if not self._pending:
            return
        keys, values, indices = (torch.cat(parts) for parts in zip(*self._pending, strict=True))
        order = keys[:, 0].argsort()
        self.keys, self.values, self.indices = keys[order], values[order], indices[order]
        self._pending.clear()
        self.ready = True

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encoded outputs ``(values, indices)`` of the inputs ``x``.

        Raises:
            KeyError: an input was not seen while filling (its content changed: random augmentation?).
        """
        query = self.key(x)
        pos = torch.searchsorted(self.keys[:, 0].contiguous(), query[:, 0].contiguous())
        candidates = torch.stack([(pos - 1).clamp(min=0), pos.clamp(max=len(self.keys) - 1)], dim=1)
        distance = (self.keys[candidates] - query[:, None, :]).abs().sum(-1)
        best = candidates.gather(1, distance.argmin(1, keepdim=True)).squeeze(1)
        scale = query.abs().sum(-1).clamp_min(1.0)
        if not bool(((self.keys[best] - query).abs().sum(-1) <= 1e-9 * scale).all()):
            raise KeyError(
                "an input is not in the teacher cache: the training inputs must be the same every epoch (no random "
                "augmentation) to cache the teacher's outputs"
            )
        return self.values[best], self.indices[best]
