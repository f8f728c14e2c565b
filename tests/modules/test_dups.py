"""DUPSModule, ClassTargetTable, the stage arithmetic and the cyclic cosine schedule (DUPS+)."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from kd_lightning import ClassTargetTable, DUPSModule, RNGStateCheckpoint, cyclic_cosine, load_module
from kd_lightning.data import SyntheticDataModule
from kd_lightning.losses import KDSettings
from kd_lightning.modules.class_targets import _random_rank_within_class
from kd_lightning.modules.distributed import RankGroup, ShardPadding
from kd_lightning.modules.dups import StageSchedule
from kd_lightning.optim import NesterovSGD
from tests.helpers import TINY_SYNTHETIC, CrashAt, fast_trainer, tiny_mlp_kwargs

C = TINY_SYNTHETIC["num_classes"]


class FixedLogits(nn.Module):
    """A stand-in backbone that returns given logits, so loss terms can be computed by hand."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


class InStage(DUPSModule):
    """DUPSModule pinned to a stage and a statistics setting, outside any Trainer."""

    def __init__(self, stage: int, collect: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pinned = (stage, collect)

    def current_stage(self) -> int:
        return self.pinned[0]

    def collects_statistics(self) -> bool:
        return self.pinned[1]


def _kl(q: list[float], z: list[float], temperature: float) -> float:
    """KL(q || softmax(z / T)) with Python floats (zeros of q contribute 0)."""
    norm = sum(math.exp(v / temperature) for v in z)
    p = [math.exp(v / temperature) / norm for v in z]
    return sum(qc * math.log(qc / pc) for qc, pc in zip(q, p, strict=True) if qc > 0)


# --------------------------------------------------------------------------------------------------- the loss terms
@pytest.mark.parametrize("t2_scaling", [True, False])
def test_kd_term_matches_hand_computation(t2_scaling):
    logits = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [3.0, 1.0, 0.0]]
    labels = torch.tensor([0, 1, 2])
    module = InStage(stage=1, collect=False, backbone="mlp", num_classes=3, temperature=2.0, t2_scaling=t2_scaling)
    module.backbone = FixedLogits(torch.tensor(logits))
    module.class_targets.targets[0] = torch.tensor([0.1, 0.2, 0.7])
    module.class_targets.targets[1] = torch.tensor([0.6, 0.1, 0.3])  # class 2 never had a target: no KD term
    losses = module.training_losses((torch.zeros(3, 1), labels))
    kl = _kl([0.1, 0.2, 0.7], logits[0], 2.0) + _kl([0.6, 0.1, 0.3], logits[1], 2.0)
    expected_kd = 0.2 * (4.0 if t2_scaling else 1.0) * kl / 3  # lambda_KD * T^2 * batch mean
    ce = -sum(z[y] - math.log(sum(math.exp(v) for v in z)) for z, y in zip(logits, [0, 1, 2], strict=True)) / 3
    assert losses["kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(0.8 * ce, rel=1e-5)


def test_stage_zero_is_weighted_ce_only():
    module = InStage(stage=0, collect=False, backbone="mlp", num_classes=3)
    module.backbone = FixedLogits(torch.tensor([[2.0, 0.0, 0.0]]))
    losses = module.training_losses((torch.zeros(1, 1), torch.tensor([0])))
    assert set(losses) == {"ce"}
    assert losses["ce"].item() == pytest.approx(0.8 * -math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)


def test_kd_gradient_pulls_towards_the_class_target():
    """d(kd)/dz = lambda_KD * T * (softmax(z/T) - f_T(y)) / B with the T^2 scaling (Hinton et al. 2015)."""
    module = InStage(stage=1, collect=False, backbone="mlp", num_classes=3, temperature=3.0, ce_weight=0.0)
    module.backbone = FixedLogits(torch.tensor([[1.0, -1.0, 0.5]]))
    target = torch.tensor([0.1, 0.7, 0.2])
    module.class_targets.targets[2] = target
    module.training_losses((torch.zeros(1, 1), torch.tensor([2])))["kd"].backward()
    expected = 0.2 * 3.0 * ((torch.tensor([1.0, -1.0, 0.5]) / 3.0).softmax(-1) - target)
    assert torch.allclose(module.backbone.logits.grad[0], expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ ClassTargetTable
def _naive_class_means(values: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    means = {}
    for c in labels.unique().tolist():
        members = [values[i] for i in range(len(labels)) if labels[i] == c]
        means[c] = sum(members) / len(members)
    return means


@pytest.mark.parametrize("average", ["probs", "logits"])
def test_targets_are_the_per_class_means(average):
    torch.manual_seed(0)
    logits, labels = 3 * torch.randn(40, 5), torch.randint(0, 4, (40,))  # class 4 is never seen
    table = ClassTargetTable(5, KDSettings(2.0), average=average)
    for chunk in range(0, 40, 16):  # several batches
        table.update(logits[chunk : chunk + 16], labels[chunk : chunk + 16])
    counts = table.finalize()
    assert counts.tolist() == [float((labels == c).sum()) for c in range(5)]
    if average == "probs":
        expected = _naive_class_means((logits / 2.0).softmax(-1), labels)
    else:
        expected = {c: (m / 2.0).softmax(-1) for c, m in _naive_class_means(logits, labels).items()}
    for c in range(4):
        assert torch.allclose(table.targets[c], expected[c], atol=1e-6)
    assert torch.equal(table.targets[4], torch.zeros(5))
    assert table.has_target.tolist() == [True, True, True, True, False]
    assert table.counts.sum() == 0 and table.sums.abs().sum() == 0  # statistics cleared
    assert torch.equal(table(torch.tensor([1, 4])), table.targets[[1, 4]])


def test_unseen_class_keeps_its_previous_target():
    table = ClassTargetTable(3, KDSettings(1.0))
    table.update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1]))
    table.finalize()
    before = table.targets.clone()
    table.update(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([0]))
    table.finalize()
    assert torch.equal(table.targets[1], before[1])
    assert torch.allclose(table.targets[0], torch.tensor([0.0, 0.0, 5.0]).softmax(-1))
    assert table.has_target.tolist() == [True, True, False]


def test_random_rank_within_class_is_a_permutation_per_class():
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 2, 1, 2, 0, 2])
    for _ in range(5):
        ranks = _random_rank_within_class(labels)
        for c in range(3):
            assert sorted(ranks[labels == c].tolist()) == list(range(int((labels == c).sum())))


def test_num_peers_keeps_a_uniformly_random_subset_of_n_per_class():
    values = torch.stack([2.0 ** torch.arange(10), torch.zeros(10)], dim=1)  # the kept set is the bits of the sum
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    chosen = torch.zeros(10)
    torch.manual_seed(0)
    trials = 200
    for _ in range(trials):
        table = ClassTargetTable(2, KDSettings(1.0), peers_per_class=3, average="logits")
        table.update(values[:7], labels[:7])  # class 0: 3 of its 5; class 1: samples 5 and 6
        table.update(values[7:], labels[7:])  # class 1: one more, of 7, 8, 9
        table.update(values, labels)  # classes full: adds nothing
        assert table.counts.tolist() == [3.0, 3.0]
        kept = [i for i in range(10) if int(table.sums[:, 0].sum().item()) >> i & 1]
        assert len(kept) == 6
        chosen[kept] += 1
    assert chosen[5] == chosen[6] == trials  # the first samples of a shuffled stream come first
    assert all(0.45 * trials < chosen[i] < 0.75 * trials for i in range(5))  # 3 of 5: 0.6 each
    assert all(0.2 * trials < chosen[i] < 0.47 * trials for i in (7, 8, 9))  # 1 of 3: 1/3 each


def test_peers_per_rank_split_n_exactly():
    table = ClassTargetTable(2, KDSettings(1.0), peers_per_class=5)
    assert [table.peers_per_rank(r, 2) for r in range(2)] == [3, 2]
    assert [table.peers_per_rank(r, 3) for r in range(3)] == [2, 2, 1]
    one = ClassTargetTable(2, KDSettings(1.0), peers_per_class=1)
    assert [one.peers_per_rank(r, 2) for r in range(2)] == [1, 0]
    assert ClassTargetTable(2, KDSettings(1.0)).peers_per_rank(1, 4) is None


def test_finalize_sums_over_ranks_before_dividing():
    torch.manual_seed(1)
    logits, labels = torch.randn(30, 3), torch.tensor([0] * 4 + [1] * 6 + [0] * 16 + [2] * 4)
    ranks = [ClassTargetTable(3, KDSettings(1.0)) for _ in range(2)]
    ranks[0].update(logits[:10], labels[:10])
    ranks[1].update(logits[10:], labels[10:])
    local = [torch.cat([t.sums, t.counts[:, None]], dim=1) for t in ranks]

    def all_reduce_sum(stats: torch.Tensor) -> torch.Tensor:
        return local[0] + local[1]

    ranks[0].ranks = RankGroup(0, 2, all_reduce_sum)
    ranks[0].finalize()
    expected = _naive_class_means(logits.softmax(-1), labels)
    for c in range(3):
        assert torch.allclose(ranks[0].targets[c], expected[c], atol=1e-6)
    mean_of_means = (logits[:4].softmax(-1).mean(0) + logits[10:26].softmax(-1).mean(0)) / 2
    assert not torch.allclose(mean_of_means, expected[0], atol=1e-3)  # dividing first would differ


# ---------------------------------------------------------------------------- a distributed sampler's padding
@pytest.mark.parametrize("num_peers", [None, 2])
@pytest.mark.parametrize("average", ["probs", "logits"])
def test_masked_samples_are_not_counted(num_peers, average):
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    mask = torch.tensor([True] * 9 + [False] * 3)  # the padding: the last samples of a shard
    masked, subset = (
        ClassTargetTable(3, KDSettings(1.0), peers_per_class=num_peers, average=average) for _ in range(2)
    )
    masked.update(logits, labels, mask=mask)
    subset.update(logits[:9], labels[:9])
    assert masked.counts.tolist() == subset.counts.tolist() == [min(3, num_peers or 3)] * 3
    if num_peers is None:
        assert torch.equal(masked.sums, subset.sums)


def test_a_masked_sample_takes_no_place_in_its_class_quota():
    """Whatever the random order within the batch, the quota of 2 goes to the two unmasked samples."""
    values = torch.tensor([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [8.0, 0.0]])  # the kept set is the bits of the sum
    labels, mask = torch.zeros(4, dtype=torch.long), torch.tensor([False, True, False, True])
    for seed in range(20):
        torch.manual_seed(seed)
        table = ClassTargetTable(2, KDSettings(1.0), peers_per_class=2, average="logits")
        table.update(values, labels, mask=mask)
        assert table.counts.tolist() == [2.0, 0.0] and table.sums[0, 0] == 2.0 + 8.0


@pytest.mark.parametrize("num_peers", [None, 2])
def test_an_all_true_mask_changes_nothing_not_even_the_rng(num_peers):
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    tables = []
    for mask in (None, torch.ones(10, dtype=torch.bool)):
        torch.manual_seed(0)
        table = ClassTargetTable(3, KDSettings(1.0), peers_per_class=num_peers)
        table.update(logits, labels, mask=mask)
        tables.append((table.sums, table.counts, torch.rand(1)))
    assert all(torch.equal(a, b) for a, b in zip(*tables, strict=True))


def _shards(size: int, world_size: int, batch_size: int, drop_last: bool = False) -> list[list[tuple[int, bool]]]:
    """Every rank's ``(index, own)`` of an epoch of Lightning's distributed sampler, own from ShardPadding."""
    dataset = torch.utils.data.TensorDataset(torch.arange(size))
    shards = []
    for rank in range(world_size):
        sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last)
        padding, shard = ShardPadding.of_loader(loader), []
        for (indices,) in loader:
            mask = padding.next_mask(len(indices))
            own = [True] * len(indices) if mask is None else mask.tolist()
            shard += list(zip(indices.tolist(), own, strict=True))
        shards.append(shard)
    return shards


@pytest.mark.parametrize(("size", "world_size", "batch_size"), [(191, 2, 16), (23, 4, 5), (10, 5, 3), (3, 5, 2)])
def test_shard_padding_counts_every_sample_once(size, world_size, batch_size):
    shards = _shards(size, world_size, batch_size)
    assert sorted(index for shard in shards for index, own in shard if own) == list(range(size))
    for rank, shard in enumerate(shards):  # the padding is the end of the shard: ranks size mod W .. W - 1
        assert [own for _, own in shard] == [i * world_size + rank < size for i in range(len(shard))]


def test_shard_padding_with_the_loaders_drop_last():
    shards = _shards(191, 2, 16, drop_last=True)  # 96 per rank: 6 full batches, the padding included
    assert sorted(index for shard in shards for index, own in shard if own) == list(range(191))
    shards = _shards(23, 4, 5, drop_last=True)  # 6 per rank: the last batch, padding and all, dropped
    counted = [index for shard in shards for index, own in shard if own]
    assert len(counted) == len(set(counted)) == 20


def test_no_padding_to_mask():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    even = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=1)
    dropped = torch.utils.data.DistributedSampler(dataset, num_replicas=3, rank=2, drop_last=True)
    for loader in [
        torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True),  # one process
        torch.utils.data.DataLoader(dataset, batch_size=4, sampler=even),  # 10 samples over 2 ranks
        torch.utils.data.DataLoader(dataset, batch_size=4, sampler=dropped),  # the sampler drops the tail
        None,  # not a DataLoader (an iterable, several loaders ...)
    ]:
        padding = ShardPadding.of_loader(loader)
        assert padding.own_samples is None and padding.next_mask(10) is None


class PairBatches(torch.utils.data.Sampler):
    """A batch sampler of its own: pairs of the sampler's indices, last first."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        indices = list(self.sampler)
        return iter([indices[i : i + 2] for i in range(0, len(indices), 2)][::-1])

    def __len__(self) -> int:
        return (len(self.sampler) + 1) // 2


def test_padding_behind_an_unknown_batch_sampler_warns_and_counts_all():
    dataset = torch.utils.data.TensorDataset(torch.arange(9))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=PairBatches(sampler))
    with pytest.warns(UserWarning, match=r"pads rank 1's shard with 1 repeated sample\(s\) \(9 samples over 2 ranks\)"):
        padding = ShardPadding.of_loader(loader)
    assert padding.own_samples is None


def test_dups_maps_a_windows_mask_onto_its_tokens():
    module = DUPSModule(**tiny_mlp_kwargs())
    module.shard_padding = ShardPadding(own_samples=3)
    labels = torch.zeros(2 * 4, dtype=torch.long)  # 2 samples (windows) of 4 labels (tokens) each
    assert module._own_samples(2, labels) is None  # samples 0 and 1
    assert module._own_samples(2, labels).tolist() == [True] * 4 + [False] * 4  # sample 2 and the padding


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"peers_per_class": 0}, r"peers_per_class must be >= 1 or None"),
        ({"average": "median"}, "average must be 'probs' or 'logits'"),
    ],
)
def test_table_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassTargetTable(**{"num_classes": 3, "settings": KDSettings(1.0), **kwargs})


# ----------------------------------------------------------------------------------------------- stage arithmetic
def test_stage_schedule_of_the_paper():
    schedule = StageSchedule.resolve(160, num_stages=10, epochs_per_stage=None)
    assert schedule == StageSchedule(10, 16)
    assert [schedule.stage_of(e) for e in (0, 15, 16, 31, 32, 159)] == [0, 0, 1, 1, 2, 9]
    assert [e for e in range(160) if schedule.is_last_epoch_of_stage(e)] == list(range(15, 160, 16))
    assert StageSchedule.resolve(160, None, epochs_per_stage=40) == StageSchedule(4, 40)


@pytest.mark.parametrize(
    ("max_epochs", "num_stages", "epochs_per_stage", "match"),
    [
        (None, 10, None, r"needs trainer\.max_epochs >= 1"),
        (-1, 10, None, r"needs trainer\.max_epochs >= 1"),
        (5, 10, None, r"num_stages=10 > trainer\.max_epochs=5"),
        (12, 5, None, r"max_epochs=12 is not a multiple of num_stages=5"),
        (12, None, 5, r"max_epochs=12 is not a multiple of epochs_per_stage=5"),
        (12, None, 13, r"max_epochs=12 is not a multiple of epochs_per_stage=13"),
    ],
)
def test_stage_schedule_errors(max_epochs, num_stages, epochs_per_stage, match):
    with pytest.raises(ValueError, match=match):
        StageSchedule.resolve(max_epochs, num_stages, epochs_per_stage)


def test_bad_stages_fail_at_the_start_of_fit(tmp_path, tiny_synthetic):
    module = DUPSModule(**tiny_mlp_kwargs(), num_stages=10)
    with pytest.raises(ValueError, match=r"num_stages=10 > trainer\.max_epochs=5"):
        fast_trainer(tmp_path, max_epochs=5).fit(module, datamodule=tiny_synthetic)
    assert module.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_stages": None}, "set exactly one of num_stages and epochs_per_stage"),
        ({"epochs_per_stage": 4}, "set exactly one of num_stages and epochs_per_stage"),
        ({"num_stages": 0}, "num_stages must be >= 1"),
        ({"num_stages": None, "epochs_per_stage": 0}, "epochs_per_stage must be >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -6.0}, "temperature must be > 0"),
        ({"ce_weight": -0.1}, "ce_weight and kd_weight must be >= 0"),
        ({"kd_weight": -0.2}, "ce_weight and kd_weight must be >= 0"),
        ({"cyclic_lr": True, "warmup_epochs": 2}, "cyclic_lr builds its own schedule"),
        ({"cyclic_lr": True, "lr_scheduler": torch.optim.lr_scheduler.StepLR}, "cyclic_lr builds its own schedule"),
        ({"statistics": "offline"}, "statistics must be 'online' or 'recompute'"),
        ({"peers_per_class": 0}, r"peers_per_class must be >= 1 or None"),
        ({"peers_per_class": 2, "num_peers": 2}, "set peers_per_class only"),
        ({"table_dtype": "float8"}, "table_dtype must be 'float32', 'float16' or 'bfloat16', got 'float8'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DUPSModule(**{**tiny_mlp_kwargs(), **kwargs})


class PhaseRecorder(Callback):
    """Per epoch: the stage, whether statistics are collected, and the targets in use."""

    def __init__(self) -> None:
        self.stages, self.collects, self.targets, self.kd_epochs = [], [], [], set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.stages.append(pl_module.current_stage())
            self.collects.append(pl_module.collects_statistics())
            self.targets.append(pl_module.class_targets.targets.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train/kd" in trainer.callback_metrics and pl_module.current_stage() > 0:
            self.kd_epochs.add(trainer.current_epoch)


class RecordingDUPS(DUPSModule):
    """Keeps the (logits, labels) it feeds to the statistics, to check the targets against a naive mean."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def training_losses(self, batch):
        if self.collects_statistics():
            x, y = batch
            with torch.no_grad():  # same train-mode forward as the step's (BN in train mode, batch statistics)
                self.fed.setdefault(self.current_epoch, []).append((copy.deepcopy(self.backbone)(x), y))
        return super().training_losses(batch)


def test_stage_boundaries_are_where_algorithm_1_puts_them(tmp_path, tiny_synthetic):
    pl.seed_everything(0)
    module = RecordingDUPS(**tiny_mlp_kwargs(), num_stages=3)
    recorder = PhaseRecorder()
    fast_trainer(tmp_path, max_epochs=6, callbacks=[recorder]).fit(module, datamodule=tiny_synthetic)
    # t = 2: stage s covers epochs 2s, 2s+1; statistics in epochs 1 and 3 (not 5: the last stage's are unused)
    assert recorder.stages == [0, 0, 1, 1, 2, 2]
    assert recorder.collects == [False, True, False, True, False, False]
    assert sorted(module.fed) == [1, 3]
    assert recorder.kd_epochs == {2, 3, 4, 5}
    zero = torch.zeros(C, C)
    assert torch.equal(recorder.targets[0], zero) and torch.equal(recorder.targets[1], zero)
    # targets change exactly at the first epoch of stages 1 and 2, to the naive mean of the previous epoch's outputs
    for epoch, stats_epoch in ((2, 1), (4, 3)):
        logits = torch.cat([z for z, _ in module.fed[stats_epoch]])
        labels = torch.cat([y for _, y in module.fed[stats_epoch]])
        naive = _naive_class_means((logits / 6.0).softmax(-1), labels)
        assert not torch.equal(recorder.targets[epoch], recorder.targets[epoch - 1])
        assert torch.equal(recorder.targets[epoch], recorder.targets[epoch + 1])
        for c in range(C):
            assert torch.allclose(recorder.targets[epoch][c], naive[c], atol=1e-5)
    assert int(module.targets_stage) == 2
    assert float(fast_trainer_metric(module, "dups/classes_covered")) == C


def fast_trainer_metric(module: pl.LightningModule, key: str) -> torch.Tensor:
    return module.trainer.callback_metrics[key]


class EndOfEpochWeights(Callback):
    def __init__(self) -> None:
        self.backbones: list[nn.Module] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.backbones.append(copy.deepcopy(pl_module.backbone))


@pytest.mark.parametrize("num_peers", [None, 7])
def test_recompute_mode_uses_the_stage_end_model_in_eval_mode(tmp_path, num_peers):
    pl.seed_everything(0)
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    module = DUPSModule(**tiny_mlp_kwargs(), num_stages=2, statistics="recompute", peers_per_class=num_peers)
    weights = EndOfEpochWeights()
    recorder = PhaseRecorder()
    counts: list[torch.Tensor] = []
    finalize = module.class_targets.finalize
    module.class_targets.finalize = lambda: counts.append(finalize()) or counts[-1]
    fast_trainer(tmp_path, max_epochs=2, callbacks=[weights, recorder]).fit(module, datamodule=data)
    assert recorder.collects == [False, False]  # no statistics from the training steps
    stage_end = weights.backbones[0].eval()
    x, y = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=len(data.train_set))))
    with torch.no_grad():
        probs = (stage_end(x) / 6.0).softmax(-1)
    targets = recorder.targets[1]
    class_sizes = torch.bincount(y, minlength=C).float()
    assert torch.equal(counts[0], class_sizes if num_peers is None else class_sizes.clamp(max=num_peers))
    for c in range(C):
        members = probs[y == c]
        if num_peers is None:
            assert torch.allclose(targets[c], members.mean(0), atol=1e-5)
        else:  # the mean of exactly num_peers of the class's samples: it lies in their convex hull, not at the mean
            gaps = (members[:, None, :] - targets[c]).abs().sum(-1)
            assert gaps.min() > 1e-6 or len(members) == 1
            assert not torch.allclose(targets[c], members.mean(0), atol=1e-6)
    assert int(module.targets_stage) == 1


# ------------------------------------------------------------------------------------------------ resume and state
def _fit(root, seed: int, crash_at: int | None = None, ckpt_path=None) -> DUPSModule:
    pl.seed_everything(seed)
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    module = DUPSModule(**tiny_mlp_kwargs(), num_stages=3, peers_per_class=4)  # peers: the statistics draw from the RNG
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True), RNGStateCheckpoint()]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = fast_trainer(root, max_epochs=6, deterministic=True, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> DUPSModule:
    return _fit(tmp_path_factory.mktemp("full"), seed=0)


@pytest.mark.parametrize("crash_at", [2, 3], ids=["stage-start", "mid-stage"])
def test_resume_uses_the_same_targets(tmp_path, uninterrupted, crash_at):
    """Crash at the first epoch of stage 1 (statistics pending) or in its middle (targets in use); resume."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, seed=0, crash_at=crash_at)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    if crash_at == 2:
        assert checkpoint["class_targets.counts"].sum() > 0 and int(checkpoint["targets_stage"]) == 0
    else:
        assert checkpoint["class_targets.has_target"].all() and int(checkpoint["targets_stage"]) == 1
    resumed = _fit(tmp_path, seed=123, ckpt_path=tmp_path / "last.ckpt")
    assert _same_state(uninterrupted, resumed)
    assert uninterrupted.class_targets.has_target.all()


def test_resume_without_the_targets_would_differ(tmp_path, uninterrupted):
    """The negative control of the resume test: the same resume with the targets wiped ends elsewhere."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, seed=0, crash_at=3)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    checkpoint["state_dict"]["class_targets.targets"].zero_()
    torch.save(checkpoint, tmp_path / "wiped.ckpt")
    resumed = _fit(tmp_path, seed=123, ckpt_path=tmp_path / "wiped.ckpt")
    assert not _same_state(uninterrupted, resumed)


def test_load_module_restores_dups_and_its_targets(tmp_path, uninterrupted):
    path = tmp_path / "dups.ckpt"
    uninterrupted.trainer.save_checkpoint(path)
    loaded = load_module(path)
    assert type(loaded) is DUPSModule
    assert loaded.hparams.peers_per_class == 4 and loaded.hparams.num_stages == 3
    assert _same_state(uninterrupted, loaded)


# ---------------------------------------------------------------------------------------------- DUPS+: cyclic LR
def test_cyclic_cosine_matches_formula():
    optimizer = NesterovSGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = cyclic_cosine(optimizer, cycle_epochs=4)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * (e % 4) / 4)) for e in range(10)], rel=1e-6)
    with pytest.raises(ValueError, match="cycle_epochs >= 1"):
        cyclic_cosine(optimizer, cycle_epochs=0)


@pytest.mark.parametrize("cyclic_lr", [True, False])
def test_dups_plus_restarts_the_lr_at_every_stage(tmp_path, tiny_synthetic, cyclic_lr):
    class LrRecorder(Callback):
        lrs: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    recorder = LrRecorder()
    recorder.lrs = []
    module = DUPSModule(**tiny_mlp_kwargs(), num_stages=2, cyclic_lr=cyclic_lr)
    trainer = fast_trainer(tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, datamodule=tiny_synthetic)
    expected = [0.1, 0.05, 0.1, 0.05] if cyclic_lr else [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-6)


def test_the_table_is_left_out_of_ddp_buffer_broadcast():
    """DDP's broadcast_buffers would overwrite each rank's statistics with rank 0's (test_dups_ddp.py shows it)."""
    module = DUPSModule(**tiny_mlp_kwargs())
    names = {f"class_targets.{n}" for n in ("targets", "has_target", "sums", "counts")}
    assert set(module._ddp_params_and_buffers_to_ignore) == names
    assert all(getattr(b, "_ddp_ignored", False) for n, b in module.named_buffers() if n in names)


def test_benchmark_rows_time_the_distillation_and_statistics_phases():
    from benchmarks.overhead import METHODS, BenchConfig, time_lightning

    cfg = BenchConfig(backbone="mlp", batch_size=8, num_classes=C, steps=1, warmup=1)
    module, (x, y) = METHODS["dups_stats"](cfg)
    assert module.current_stage() == 1 and module.collects_statistics()
    losses = module.training_losses((x, y))
    assert set(losses) == {"ce", "kd"} and module.class_targets.counts.sum() == 8
    module, _ = METHODS["dups_kd"](cfg)
    assert module.current_stage() == 1 and not module.collects_statistics()
    for name in ("dups_stats", "sd"):
        assert time_lightning(METHODS[name], cfg) > 0


def test_num_peers_is_a_deprecated_name_of_peers_per_class(tmp_path):
    with pytest.warns(FutureWarning, match="num_peers is deprecated: use peers_per_class"):
        module = DUPSModule(**tiny_mlp_kwargs(), num_peers=3)
    assert module.hparams.peers_per_class == 3 and "num_peers" not in module.hparams
    assert module.class_targets.peers_per_class == 3


def test_recompute_needs_a_datamodule_that_gives_the_shard_loader(tmp_path):
    data = SyntheticDataModule(**TINY_SYNTHETIC)
    data.setup("fit")
    module = DUPSModule(**tiny_mlp_kwargs(), num_stages=2, statistics="recompute")
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=16)
    with pytest.raises(ValueError, match="train_shard_dataloader"):
        fast_trainer(tmp_path, max_epochs=2).fit(module, train_dataloaders=loader)


# ------------------------------------------------------------------------------------------- 16-bit tables
@pytest.mark.parametrize("table_topk", [None, 3])
def test_16_bit_tables_hold_the_float32_targets_rounded_once(tmp_path, table_topk):
    tables = {}
    for dtype in ("float32", "float16"):
        pl.seed_everything(0)
        module = DUPSModule(**tiny_mlp_kwargs(), num_stages=2, table_topk=table_topk, table_dtype=dtype)
        data = SyntheticDataModule(**TINY_SYNTHETIC)
        fast_trainer(tmp_path, max_epochs=2, limit_val_batches=0).fit(module, datamodule=data)
        tables[dtype] = module.class_targets
    half, full = tables["float16"], tables["float32"]
    stored = half.targets if table_topk is None else half.values
    assert stored.dtype == torch.float16 and (table_topk is None or half.rest.dtype == torch.float16)
    reference = full.targets if table_topk is None else full.values
    torch.testing.assert_close(stored.float(), reference, atol=1e-3, rtol=1e-3)
    labels = torch.arange(C)
    for a, b in zip(half.batch_targets(labels)[1:], full.batch_targets(labels)[1:], strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)  # the entropy terms and masses, in float32


def test_checkpoints_hold_the_dense_sums_only_while_statistics_are_pending():
    table = ClassTargetTable(4, KDSettings(2.0), dtype=torch.float16)
    assert table.state_dict()["sums"].numel() == 0
    table.update(torch.randn(6, 4), torch.tensor([0, 1, 1, 2, 3, 3]))
    pending = copy.deepcopy(table.state_dict())
    assert pending["sums"].shape == (4, 4)
    table.finalize()
    empty = table.state_dict()
    assert empty["sums"].numel() == 0 and empty["targets"].dtype == torch.float16
    restored = ClassTargetTable(4, KDSettings(2.0), dtype=torch.float16)
    restored.load_state_dict(empty)
    assert torch.equal(restored.targets, table.targets) and torch.equal(restored.sums, torch.zeros(4, 4))
    restored.load_state_dict(pending)
    assert torch.equal(restored.sums, pending["sums"])
