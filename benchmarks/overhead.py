"""Training-step overhead of every method against plain cross-entropy training of the same backbone.

Every row trains the same backbone on the same in-memory batch; the methods and the baseline are interleaved
(``--repeats`` rounds, each round times every row once) in one process, so machine noise hits them alike. A
row's ``step_ms`` is the median over rounds of the median step time within a round; ``ratio`` divides it by
the ``ce`` row's. Extra rows: ``raw_loop`` (a plain PyTorch loop: the cost of Lightning itself) and the
augmentation pipelines (``augment:per_image``: torchvision transforms image by image, as a DataLoader worker
runs them; ``augment:batch``: :class:`~kd_lightning.data.transforms.BatchAugment` on the whole uint8 batch).

Usage::

    python benchmarks/overhead.py [--methods ce,raw_loop] [--backbone resnet20] [--batch-size 128] [--json PATH]
    python benchmarks/overhead.py --reference lm --methods lm,lm_dups_dense,lm_dups_topk  # language models
    python benchmarks/overhead.py --methods ce,ce+teacher_forward,kd,kd_cached,store_build --teacher resnet56

The teacher-store rows (:mod:`kd_lightning.teacher_store`): ``kd_cached`` is DistillModule reading the batch's
targets from a store (``R = 4`` draws, top-10, memory-mapped) instead of running its teacher (``--teacher``, default
the student's backbone, is also the teacher of ``kd`` and ``ce+teacher_forward``); ``store_build`` is the time to
write the store rows of one batch of samples (the teacher's forward on their ``R = 4`` views, top-k, the memory-map
writes: divide by the batch size for the time per sample); ``augment:replay_per_image`` makes the batch's views
from recorded parameters, as the store's loader does (compare with ``augment:per_image``). ``lm_kd`` and
``lm_kd_cached`` are KD for the language model with a live teacher (the student's architecture) and from a store.

A method issue adds its row by registering a builder in ``METHODS`` (a function of :class:`BenchConfig` that
returns the LightningModule, put in the state of the phase measured, and the batch it trains on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torchvision.transforms import v2

from kd_lightning.data.replay import PadCropFlip
from kd_lightning.data.transforms import BatchAugment, cifar_stats, cifar_train_transform
from kd_lightning.models.lstm_lm import create_language_model
from kd_lightning.models.registry import create_backbone
from kd_lightning.modules.class_targets import ClassTargetTable
from kd_lightning.modules.classifier import ClassifierModule
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.dups import DUPSModule
from kd_lightning.modules.generations import GenerationModule
from kd_lightning.modules.language_model import LanguageModelDistillModule, LanguageModelMixin, LanguageModelModule
from kd_lightning.modules.okddip import OKDDipModule
from kd_lightning.modules.self_distill import SelfDistillModule
from kd_lightning.modules.snapshot import SnapshotDistillModule
from kd_lightning.modules.stored_teacher import StoredTeacher
from kd_lightning.modules.student_group import StudentGroupModule
from kd_lightning.modules.teacher import FrozenTeacher
from kd_lightning.optim import NesterovSGD
from kd_lightning.teacher_store import StoreLayout, StoreSpec, build_store


@dataclass
class BenchConfig:
    backbone: str = "resnet20"
    batch_size: int = 128
    num_classes: int = 100
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    seed: int = 0
    teacher: str | None = None

    @property
    def teacher_backbone(self) -> str:
        """The teacher of the KD rows: ``teacher``, else the student's backbone."""
        return self.teacher or self.backbone


def make_batch(cfg: BenchConfig, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed random batch ``(x, y)`` for the backbone's input shape."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((cfg.batch_size, *input_shape), generator=gen)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=gen)
    return x, y


def build_ce(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    module = ClassifierModule(backbone=cfg.backbone, num_classes=cfg.num_classes)
    return module, make_batch(cfg, module.backbone.input_shape)


#: method name -> builder of (module in the measured phase, batch). Method issues add their rows here.
METHODS: dict[str, Callable[[BenchConfig], tuple[pl.LightningModule, Any]]] = {"ce": build_ce}


class _CEWithTeacherForward(ClassifierModule):
    """The reference of the ``kd`` row: a CE step plus a frozen teacher's forward on the same batch (result unused)."""

    def __init__(self, teacher: FrozenTeacher, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frozen.set("teacher", [teacher])  # out of the module tree, as in DistillModule

    def training_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        self.frozen.first("teacher")(batch[0])
        return super().training_losses(batch)


def build_ce_teacher_forward(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    teacher = FrozenTeacher(create_backbone(cfg.teacher_backbone, cfg.num_classes))
    module = _CEWithTeacherForward(teacher, backbone=cfg.backbone, num_classes=cfg.num_classes)
    return module, make_batch(cfg, module.backbone.input_shape)


def build_kd(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    """DistillModule (vanilla KD) with the teacher ``--teacher``: compare with ``ce+teacher_forward``."""
    teacher = create_backbone(cfg.teacher_backbone, cfg.num_classes)
    module = DistillModule(teacher=teacher, backbone=cfg.backbone, num_classes=cfg.num_classes)
    return module, make_batch(cfg, module.backbone.input_shape)


def build_generation_student(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    """A GenerationModule in generation 1 (Eq. 4, teacher = generation 0 of the same backbone): compare with ``kd``."""
    module = GenerationModule(backbone=cfg.backbone, num_classes=cfg.num_classes)
    module.start_next_generation(seed=0)
    return module, make_batch(cfg, module.backbone.input_shape)


METHODS["ce+teacher_forward"] = build_ce_teacher_forward
METHODS["kd"] = build_kd
METHODS["generation_student"] = build_generation_student


class _DUPSInStageOne(DUPSModule):
    """DUPSModule held in stage 1 with a full class table (dense or top-k), in a statistics epoch or not, for timing."""

    def __init__(self, statistics_epoch: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._statistics_epoch = statistics_epoch
        table, classes = self.class_targets, self.num_classes
        if isinstance(table, ClassTargetTable):
            table.targets.copy_(torch.randn(classes, classes).softmax(-1))
        else:
            table.values.copy_(0.5 * torch.rand(classes, table.k).softmax(-1))
            offsets = torch.randint(0, classes, (classes, 1))
            table.indices.copy_((offsets + torch.arange(table.k)) % classes)
            table.rest.fill_(0.5 / (classes - table.k))
        table.has_target.fill_(True)

    def current_stage(self) -> int:
        return 1

    def collects_statistics(self) -> bool:
        return self._statistics_epoch


class _SnapshotInStageOne(SnapshotDistillModule):
    """SnapshotDistillModule held in stage 1 (KD from the snapshot teacher), for timing."""

    def current_stage(self) -> int:
        return 1


def build_dups(cfg: BenchConfig, statistics_epoch: bool) -> tuple[pl.LightningModule, Any]:
    """DUPS in a distillation stage (``dups_kd``) or in its last epoch, also collecting statistics (``dups_stats``)."""
    module = _DUPSInStageOne(statistics_epoch, backbone=cfg.backbone, num_classes=cfg.num_classes, num_stages=1)
    return module, make_batch(cfg, module.backbone.input_shape)


def build_snapshot(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    """Snapshot Distillation in a distillation stage (one extra forward of the snapshot per step)."""
    module = _SnapshotInStageOne(backbone=cfg.backbone, num_classes=cfg.num_classes, num_stages=1)
    return module, make_batch(cfg, module.backbone.input_shape)


METHODS["dups_kd"] = lambda cfg: build_dups(cfg, statistics_epoch=False)
METHODS["dups_stats"] = lambda cfg: build_dups(cfg, statistics_epoch=True)
METHODS["sd"] = build_snapshot


def build_group(cfg: BenchConfig, cls: type[StudentGroupModule], network_based: bool) -> tuple[pl.LightningModule, Any]:
    """4 students: OKDDip (3 peers + a leader, attention) or "Ind" (each student CE only), branches or networks.

    Compare ``okddip_branch`` with ``ind_branch`` (same branches, OKDDip's extra work: projections, attention,
    aggregation, KL terms) and ``okddip_net`` with ``ind_net`` (4 independent CE steps in one step) or 4 x ``ce``.
    """
    module = cls(backbone=cfg.backbone, num_classes=cfg.num_classes, num_students=4, network_based=network_based)
    return module, make_batch(cfg, module.group.input_shape)


METHODS["okddip_branch"] = lambda cfg: build_group(cfg, OKDDipModule, network_based=False)
METHODS["ind_branch"] = lambda cfg: build_group(cfg, StudentGroupModule, network_based=False)
METHODS["okddip_net"] = lambda cfg: build_group(cfg, OKDDipModule, network_based=True)
METHODS["ind_net"] = lambda cfg: build_group(cfg, StudentGroupModule, network_based=True)


def build_self_distill(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    """Data-distortion guided self-distillation: two views of the batch (2B images in one forward), CE + KL + MMD."""
    module = SelfDistillModule(backbone=cfg.backbone, num_classes=cfg.num_classes)
    x, y = make_batch(cfg, module.backbone.input_shape)
    return module, ((x, x + 0.1 * torch.randn_like(x)), y)


METHODS["self_distill"] = build_self_distill

#: The language-model rows' fixed setting (DUPS paper, Table 5 small): lstm_small, 10k words, 20 rows x 35 tokens.
LM_VOCAB, LM_ROWS, LM_BPTT = 10000, 20, 35


def lm_batch(cfg: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, LM_VOCAB, (LM_ROWS, LM_BPTT + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


class _LMDUPSInStageOne(LanguageModelMixin, _DUPSInStageOne):
    """LanguageModelDUPSModule's composition (the mixin over DUPS), held in stage 1 with a full word table."""


def build_lm(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    """The language-model reference: lstm_small trained with cross-entropy over the next word (truncated BPTT)."""
    return LanguageModelModule(backbone="lstm_small", num_classes=LM_VOCAB), lm_batch(cfg)


def build_lm_dups(cfg: BenchConfig, table_topk: int | None, statistics_epoch: bool) -> tuple[pl.LightningModule, Any]:
    """DUPS for the language model in a distillation stage, with the dense or the top-100 word table."""
    module = _LMDUPSInStageOne(
        statistics_epoch=statistics_epoch,
        backbone="lstm_small",
        num_classes=LM_VOCAB,
        num_stages=1,
        table_topk=table_topk,
    )
    return module, lm_batch(cfg)


METHODS["lm"] = build_lm
for _name, _topk in (("dense", None), ("topk", 100)):
    METHODS[f"lm_dups_{_name}"] = partial(build_lm_dups, table_topk=_topk, statistics_epoch=False)
    METHODS[f"lm_dups_{_name}_stats"] = partial(build_lm_dups, table_topk=_topk, statistics_epoch=True)


#: Draws and entries per row of the benchmark's teacher stores.
STORE_DRAWS, STORE_TOPK = 4, 10
_STORES: dict[tuple[int, int], tuple[StoredTeacher, tempfile.TemporaryDirectory]] = {}


def random_store(rows: int, classes: int) -> StoredTeacher:
    """An opened store of ``rows`` rows of random teacher outputs (top-10), made once per process (in a temporary
    folder, deleted at exit)."""
    if (rows, classes) not in _STORES:
        folder = tempfile.TemporaryDirectory(prefix="kd_store_")
        stored = StoredTeacher(folder.name, STORE_DRAWS, STORE_TOPK, 4.0, classes)
        spec = StoreSpec("random", 4.0, classes, STORE_TOPK, STORE_DRAWS, StoreLayout(rows, 0))
        chunks = torch.arange(rows).split(max(1, 2**22 // classes))
        build_store(stored.store, spec, ((torch.randn(len(c), classes), c, None) for c in chunks), lambda z: 3 * z)
        stored.store.open(spec)
        _STORES[rows, classes] = stored, folder
    return _STORES[rows, classes][0]


class _DistillFromStore(DistillModule):
    """DistillModule reading an opened store (no datamodule to attach it to: the benchmark's batch has its rows)."""

    def __init__(self, stored: StoredTeacher, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._opened = stored

    def on_fit_start(self) -> None:
        # Not KDStudentModule's: it warns that a module without a teacher trains with CE only, but this one reads the
        # store's targets.
        self.stored_teacher = self._opened


def build_kd_cached(cfg: BenchConfig) -> tuple[pl.LightningModule, Any]:
    """KD from a store of a CIFAR-sized training set's rows (50k samples x R = 4), the batch's rows random."""
    store = random_store(50_000 * STORE_DRAWS, cfg.num_classes)
    module = _DistillFromStore(store, backbone=cfg.backbone, num_classes=cfg.num_classes)
    rows = torch.randint(0, 50_000 * STORE_DRAWS, (cfg.batch_size,), generator=torch.Generator().manual_seed(1))
    return module, (*make_batch(cfg, module.backbone.input_shape), rows)


class _LMDistillFromStore(LanguageModelMixin, _DistillFromStore):
    """LanguageModelDistillModule's composition reading an opened store."""


def build_lm_kd(cfg: BenchConfig, cached: bool) -> tuple[pl.LightningModule, Any]:
    """KD for the language model: a live lstm_small teacher, or a store of 8 windows' next-word rows (top-10)."""
    lm = {"backbone": "lstm_small", "num_classes": LM_VOCAB}
    if not cached:
        return LanguageModelDistillModule(teacher=create_language_model("lstm_small", LM_VOCAB), **lm), lm_batch(cfg)
    tokens = LM_ROWS * LM_BPTT
    rows = torch.arange(tokens).view(LM_ROWS, LM_BPTT) + 3 * tokens  # the 4th of 8 windows
    return _LMDistillFromStore(stored=random_store(8 * tokens, LM_VOCAB), **lm), (*lm_batch(cfg), rows)


METHODS["kd_cached"] = build_kd_cached
METHODS["lm_kd"] = partial(build_lm_kd, cached=False)
METHODS["lm_kd_cached"] = partial(build_lm_kd, cached=True)


class _StepTimer(Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls: one whole training step, hooks included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class _RepeatedBatch:
    """An iterable loader that yields the same batch ``length`` times (no collate or copy cost)."""

    def __init__(self, batch: Any, length: int) -> None:
        self.batch, self.length = batch, length

    def __iter__(self):
        return (self.batch for _ in range(self.length))

    def __len__(self) -> int:
        return self.length


def time_lightning(builder: Callable, cfg: BenchConfig) -> float:
    """Median seconds per Lightning training step of the module ``builder`` makes."""
    torch.manual_seed(cfg.seed)
    module, batch = builder(cfg)
    timer = _StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=_RepeatedBatch(batch, cfg.warmup + cfg.steps + 1))
    return statistics.median(timer.times[cfg.warmup :])


def _median_time(cfg: BenchConfig, run: Callable[[], Any]) -> float:
    """Median seconds of ``run()`` over ``cfg.steps`` calls after ``cfg.warmup``."""
    times = []
    for _ in range(cfg.warmup + cfg.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times[cfg.warmup :])


def time_raw_loop(cfg: BenchConfig) -> float:
    """Median seconds per step of a plain PyTorch loop: same backbone, optimizer, schedule and batch."""
    torch.manual_seed(cfg.seed)
    model = create_backbone(cfg.backbone, cfg.num_classes).train()
    x, y = make_batch(cfg, model.input_shape)
    optimizer = NesterovSGD(model.parameters())

    def step() -> None:
        loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _median_time(cfg, step)


def time_augment(cfg: BenchConfig, on_batch: bool) -> float:
    """Median seconds to augment one CIFAR-sized batch, per image (torchvision) or as one batch op."""
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=gen)
    if on_batch:
        augment = BatchAugment(*cifar_stats("cifar10")).train()

        def run() -> None:
            augment(images)

    else:
        pil = [v2.functional.to_pil_image(img) for img in images]
        transform = cifar_train_transform()

        def run() -> None:
            torch.stack([transform(img) for img in pil])

    return _median_time(cfg, run)


def time_replay(cfg: BenchConfig) -> float:
    """Median seconds to make one CIFAR-sized batch's views from recorded parameters, image by image."""
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=gen)
    augmentation = PadCropFlip(32, 4, True, *cifar_stats("cifar10"))
    pil = [v2.functional.to_pil_image(img) for img in images]
    params = augmentation.draw(None, cfg.batch_size, gen)
    return _median_time(cfg, lambda: torch.stack([augmentation.replay(i, p) for i, p in zip(pil, params, strict=True)]))


def time_store_build(cfg: BenchConfig) -> float:
    """Median seconds to write the store rows of one batch of samples: the teacher's forward on their R views (eval
    mode, no gradients), their top-k at T and the memory-mapped writes."""
    teacher = FrozenTeacher(create_backbone(cfg.teacher_backbone, cfg.num_classes))
    x, _ = make_batch(cfg, teacher.network.input_shape)
    views = x[:, None].expand(-1, STORE_DRAWS, *x.shape[1:])
    store = random_store(cfg.batch_size * STORE_DRAWS, cfg.num_classes).store
    rows = torch.arange(cfg.batch_size * STORE_DRAWS)
    return _median_time(cfg, lambda: store.write(rows, teacher(views.flatten(0, 1))))


EXTRA_ROWS: dict[str, Callable[[BenchConfig], float]] = {
    "raw_loop": time_raw_loop,
    "augment:per_image": lambda cfg: time_augment(cfg, on_batch=False),
    "augment:batch": lambda cfg: time_augment(cfg, on_batch=True),
    "augment:replay_per_image": time_replay,
    "store_build": time_store_build,
}


def run_benchmark(methods: list[str], cfg: BenchConfig, reference: str = "ce") -> list[dict[str, Any]]:
    """Interleaved rounds over ``methods`` (``reference`` always included); rows with ``step_ms`` and ``ratio``
    (to the reference: ``ce`` for the image rows, ``lm`` for the language-model rows)."""
    names = [reference, *[m for m in methods if m != reference]]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(cfg.repeats):
        for name in names:
            seconds = EXTRA_ROWS[name](cfg) if name in EXTRA_ROWS else time_lightning(METHODS[name], cfg)
            samples[name].append(seconds)
    ce_ms = 1000 * statistics.median(samples[reference])
    rows = []
    for name in names:
        step_ms = 1000 * statistics.median(samples[name])
        row = {
            "method": name,
            "backbone": cfg.backbone,
            "batch_size": cfg.batch_size,
            "step_ms": round(step_ms, 3),
            "ratio": round(step_ms / ce_ms, 4),
            "samples_per_s": round(1000 * cfg.batch_size / step_ms, 1),
            "rounds_ms": [round(1000 * s, 3) for s in samples[name]],
        }
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<26}{'step ms':>10}{'ratio vs ' + rows[0]['method']:>13}{'samples/s':>12}"]
    lines += [f"{r['method']:<26}{r['step_ms']:>10.2f}{r['ratio']:>13.3f}{r['samples_per_s']:>12.1f}" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = sorted({*METHODS, *EXTRA_ROWS})
    parser.add_argument("--methods", default=",".join(choices), help=f"comma-separated rows among {choices}")
    parser.add_argument("--reference", default="ce", help="the row ratios divide by (lm for the lm_* rows)")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--teacher", default=None, help="teacher backbone of the KD rows (default: --backbone)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    unknown = [m for m in [*args.methods.split(","), args.reference] if m not in choices]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose among {choices}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging interval).*")
    cfg = BenchConfig(
        args.backbone, args.batch_size, args.num_classes, args.steps, args.warmup, args.repeats, teacher=args.teacher
    )
    rows = run_benchmark(args.methods.split(","), cfg, args.reference)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
