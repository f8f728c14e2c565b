"""The teacher store: a teacher's outputs on every training sample, written once, memory-mapped, read each step.

After Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022): the teacher runs
once over ``R`` recorded augmentation draws of every training image (its region-level soft labels), and the student
trains on those views, reading the teacher's output instead of computing it. A store is a folder of ``.npy`` files
(numpy's format: memory-mapped, readable without kd-lightning) and ``meta.json``:

* ``values.npy`` ``(rows, k)`` float16: the teacher's ``k`` largest probabilities at the temperature ``T``,
  :math:`\\mathrm{softmax}(z^t / T)`, in descending order; ``indices.npy`` ``(rows, k)``: their classes (int16 when
  ``C <= 32767``, else int32); ``rest.npy`` ``(rows,)`` float32: the remaining mass :math:`1 - \\sum_j v_j` (in
  float32, before the values are rounded), spread uniformly over the other ``C - k`` classes when read (KD-topk's
  target, Sec. 5.3 of Tang et al.; exact with ``k = C``, up to float16);
* ``params.npy`` ``(rows, P)`` int32: the recorded augmentation parameters of each row (crop box, flip; absent when
  nothing is drawn);
* ``meta.json``: what the store was made for (:class:`StoreSpec`: the sha256 of the teacher's weights, ``T``, ``C``,
  ``k``, ``R``, the dataset and the augmentation, from the datamodule's
  :meth:`~kd_lightning.data.base.DataProtocol.teacher_store_layout`), the build time, and ``complete``. Written last:
  a folder without it is an unfinished build, which the next run redoes.

A row is one teacher output: ``sample * R + draw`` for images, a training token's position for language models. At
4 bytes per entry (``C <= 32767``), 1.28M ImageNet images x ``R = 4`` x ``k = 10`` take about 205 MB.

:func:`build_store` writes a store, each rank its own rows (one writer per rank, into files rank 0 creates; the
folder must be shared by the ranks: one machine, or a shared file system); :meth:`TeacherStore.open` checks a
store against the run's :class:`StoreSpec` and refuses any other run (:class:`TeacherStoreMismatch`);
:meth:`TeacherStore.targets` and :meth:`TeacherStore.params` read rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.fused import SparseTargets

__all__ = [
    "StoreLayout",
    "StoreSpec",
    "TeacherStore",
    "TeacherStoreMismatch",
    "build_store",
    "weights_sha256",
]

#: Version of the folder layout written into ``meta.json``.
FORMAT_VERSION = 1
META = "meta.json"
#: The arrays of a store (``<name>.npy``).
_ARRAYS = ("values", "indices", "rest", "params")


@dataclass(frozen=True)
class StoreLayout:
    """What a datamodule says of the store its training set needs
    (:meth:`~kd_lightning.data.base.DataProtocol.teacher_store_layout`).

    Args:
        rows: target rows: samples x draws (images), training tokens (language models).
        params: recorded augmentation parameters per row (0: nothing is drawn).
        dataset: what identifies the training set (class, size, a hash of its labels or tokens ...).
        augmentation: what identifies the recorded augmentation (its kind and settings).
    """

    rows: int
    params: int
    dataset: dict[str, Any] = field(default_factory=dict)
    augmentation: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreSpec:
    """Everything a store is made for: a store serves only a run whose spec is equal (:meth:`TeacherStore.open`).

    Args:
        teacher_sha256: :func:`weights_sha256` of the teacher.
        temperature: ``T`` of the stored probabilities.
        num_classes: ``C``.
        topk: ``k`` probabilities kept per row, ``1 <= k <= C``.
        draws: ``R`` augmentation draws per sample.
        layout: the datamodule's :class:`StoreLayout`.
    """

    teacher_sha256: str
    temperature: float
    num_classes: int
    topk: int
    draws: int
    layout: StoreLayout

    def __post_init__(self) -> None:
        if not 1 <= self.topk <= self.num_classes:
            raise ValueError(f"a teacher store keeps 1 <= k <= num_classes={self.num_classes} entries, got {self.topk}")
        if self.draws < 1:
            raise ValueError(f"a teacher store records >= 1 draw per sample, got {self.draws}")

    def as_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StoreSpec:
        """The spec of :meth:`as_dict`'s values (``meta.json``'s ``spec``)."""
        return cls(**{**values, "layout": StoreLayout(**values["layout"])})


class TeacherStoreMismatch(ValueError):
    """A store made for another run (teacher, temperature, dataset, augmentation, k or R); the message lists what
    differs."""


def weights_sha256(network: nn.Module) -> str:
    """sha256 of a network's ``state_dict`` (names, dtypes, shapes and bytes, in order): the teacher's identity, the
    same whatever file its weights came from."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherStore:
    """A teacher store's folder (see the module docstring): created, written and finished by :func:`build_store`,
    checked by :meth:`open`, read by :meth:`targets` and :meth:`params`.

    The arrays are memory-mapped on first use in each process (a DataLoader worker maps its own; pickling drops the
    maps, so a store travels to workers and spawned processes as its path).

    Args:
        path: the store's folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        #: The spec of the opened store (None until :meth:`open`).
        self.spec: StoreSpec | None = None
        self._maps: dict[str, np.ndarray] = {}

    # --------------------------------------------------------------------------------------------- state
    def metadata(self) -> dict[str, Any] | None:
        """``meta.json`` of a finished store, or None (no store, or an unfinished build)."""
        path = self.path / META
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        return meta if meta.get("complete") else None

    def open(self, spec: StoreSpec) -> None:
        """Serve this store to the run of ``spec``.

        Raises:
            FileNotFoundError: no finished store in the folder.
            TeacherStoreMismatch: the store was made for another spec (the message lists the differences).
        """
        meta = self.metadata()
        if meta is None:
            raise FileNotFoundError(f"no finished teacher store in {self.path} (meta.json missing or incomplete)")
        differences = _differences(spec.as_dict(), meta["spec"])
        if differences:
            listed = "\n".join(
                f"  {key}: {mine!r} for this run, {theirs!r} in the store" for key, mine, theirs in differences
            )
            raise TeacherStoreMismatch(
                f"the teacher store {self.path} was made for another run:\n{listed}\nA store serves only the teacher, "
                "temperature, dataset and augmentation it was made for: point teacher_store to another folder (it is "
                "built there at the start of fit), or delete this one to rebuild it"
            )
        self.use(spec)

    def create(self, spec: StoreSpec) -> None:
        """Lay out empty arrays for ``spec`` (rank 0, before the ranks write), replacing an unfinished build."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / META).unlink(missing_ok=True)
        rows, k = spec.layout.rows, spec.topk
        shapes = {"values": (rows, k), "indices": (rows, k), "rest": (rows,), "params": (rows, spec.layout.params)}
        for name in _ARRAYS:
            file = self.path / f"{name}.npy"
            file.unlink(missing_ok=True)
            if name != "params" or spec.layout.params:
                np.lib.format.open_memmap(file, mode="w+", dtype=_dtype(name, spec.num_classes), shape=shapes[name])
        self.use(spec)

    def use(self, spec: StoreSpec) -> None:
        """Read and write the arrays as laid out for ``spec`` (unchecked: :meth:`open` checks)."""
        self.spec, self._maps = spec, {}

    def finish(self, spec: StoreSpec, seconds: float) -> None:
        """Write ``meta.json`` (atomically): the store is complete."""
        meta = {
            "format": FORMAT_VERSION,
            "complete": True,
            "spec": spec.as_dict(),
            "build_seconds": round(seconds, 3),
            "seconds_per_row": seconds / max(spec.layout.rows, 1),
        }
        temporary = self.path / f"{META}.tmp"
        temporary.write_text(json.dumps(meta, indent=2))
        temporary.replace(self.path / META)

    # ------------------------------------------------------------------------------------------- arrays
    def _array(self, name: str, writable: bool = False) -> np.ndarray:
        key = f"{name}+" if writable else name
        if key not in self._maps:
            self._maps[key] = np.load(self.path / f"{name}.npy", mmap_mode="r+" if writable else "r")
        return self._maps[key]

    def write(self, rows: Tensor, logits: Tensor, params: Tensor | None = None) -> None:
        """Store the ``(n, C)`` logits of the ``(n,)`` rows (their top-k at the spec's temperature) and the ``(n, P)``
        augmentation parameters that made their inputs."""
        assert self.spec is not None, "create() or open() the store first"
        spec, index = self.spec, rows.cpu().numpy()
        probs = (logits.detach().float() / spec.temperature).softmax(dim=-1)
        top = probs.topk(spec.topk, dim=-1)
        self._array("values", True)[index] = top.values.half().cpu().numpy()
        self._array("indices", True)[index] = top.indices.cpu().numpy().astype(_dtype("indices", spec.num_classes))
        self._array("rest", True)[index] = (1.0 - top.values.sum(-1)).clamp_min(0.0).cpu().numpy()
        if spec.layout.params and params is not None:
            self._array("params", True)[index] = params.reshape(len(index), -1).cpu().numpy()

    def flush(self) -> None:
        """Write this process's changes to disk."""
        for array in self._maps.values():
            if isinstance(array, np.memmap):
                array.flush()

    def targets(self, rows: Tensor, k: int | None = None, device: torch.device | str | None = None) -> SparseTargets:
        """The sparse targets ``(values, indices, rest)`` of ``rows`` (any shape, flattened): their first ``k`` stored
        entries (None: all; the dropped ones go to the rest), float32 / long / float32 ``(n,)`` per-class rest,
        on ``device`` (see :data:`~kd_lightning.fused.SparseTargets`)."""
        assert self.spec is not None, "open() the store first"
        index = rows.reshape(-1).cpu().numpy()
        values = torch.from_numpy(self._array("values")[index]).to(device).float()
        indices = torch.from_numpy(self._array("indices")[index]).to(device).long()
        mass = torch.from_numpy(self._array("rest")[index]).to(device)
        if k is not None and k < values.shape[1]:
            mass = mass + values[:, k:].sum(-1)
            values, indices = values[:, :k], indices[:, :k]
        others = self.spec.num_classes - values.shape[1]
        return values, indices, mass / others if others else torch.zeros_like(mass)

    def params(self, rows: Tensor | int) -> Tensor:
        """The recorded augmentation parameters of ``rows``: ``(..., P)`` int32 (``rows`` an int: ``(P,)``; ``P = 0``
        when nothing is drawn)."""
        assert self.spec is not None, "open() the store first"
        index = rows.cpu().numpy() if isinstance(rows, Tensor) else rows
        if not self.spec.layout.params:
            return torch.zeros((*np.shape(index), 0), dtype=torch.int32)
        return torch.from_numpy(np.array(self._array("params")[index]))

    def __getstate__(self) -> dict[str, Any]:
        """The path and spec only: each process maps the arrays itself."""
        return {**self.__dict__, "_maps": {}}


def _dtype(name: str, num_classes: int) -> np.dtype:
    if name == "indices":
        return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)
    return np.dtype({"values": np.float16, "rest": np.float32, "params": np.int32}[name])


def _differences(mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, mine, theirs)`` of every leaf that differs between two nested dicts."""
    found = []
    for key in sorted(mine.keys() | theirs.keys()):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def build_store(
    store: TeacherStore,
    spec: StoreSpec,
    batches: Iterable[tuple[Any, Tensor, Tensor | None]],
    teacher_logits: Callable[[Any], Tensor],
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Write a store: rank 0 lays it out, every rank writes the rows of its ``batches``, rank 0 finishes it.

    Args:
        store: the store to write.
        spec: what it is made for.
        batches: this rank's ``(inputs, rows, params)`` (the datamodule's
            :meth:`~kd_lightning.data.base.DataProtocol.teacher_store_dataloader`, on the teacher's device).
        teacher_logits: the teacher's ``(n, C)`` logits of a batch's inputs, one per element of ``rows.flatten()``.
        rank: this process's rank.
        barrier: waits for every rank (the trainer strategy's ``barrier``).
    """
    start = time.perf_counter()
    if rank == 0:
        store.create(spec)
    barrier()
    store.use(spec)
    with torch.no_grad():
        for inputs, rows, params in batches:
            store.write(rows.reshape(-1), teacher_logits(inputs), params)
    store.flush()
    barrier()
    if rank == 0:
        store.finish(spec, time.perf_counter() - start)
    barrier()
