"""Figures that explain a distillation run (Tang et al., "Understanding and Improving Knowledge Distillation").

:class:`DistillDiagnostics` draws, on the validation data:

(a) Fig. 1: the Pearson correlation between classes of the teacher's distribution :math:`p^t_T` over the examples,
    classes ordered by super-class, at one or several temperatures (a block-diagonal pattern = class relationships);
(b) Fig. 2: the teacher's confidence on the ground truth :math:`p^t_t` against the student's per-example gradient
    rescaling factor :math:`w_t` (Eq. 3, Proposition 2; :func:`~kd_lightning.targets.gradient_rescaling`).

matplotlib is an optional dependency (``pip install 'kd-lightning[figures]'``), imported only when drawing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from kd_lightning.data.base import data_attribute
from kd_lightning.modules.distributed import distributed_sampler_of
from kd_lightning.targets import gradient_rescaling, kd_target

__all__ = ["DistillDiagnostics", "class_correlation", "spearman", "superclass_contrast", "superclass_order"]


def class_correlation(probs: Tensor) -> Tensor:
    """``(C, C)`` Pearson correlation between the classes' probabilities over ``N`` examples (Fig. 1).

    .. math:: R_{ij} = \\frac{\\mathrm{cov}(p_{:,i}, p_{:,j})}{\\sigma(p_{:,i})\\,\\sigma(p_{:,j})}

    Args:
        probs: ``(N, C)`` distributions.
    """
    return torch.corrcoef(probs.double().T).float()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two ``(N,)`` samples (Pearson correlation of their ranks; ties broken by order).

    Robust to the outliers of :math:`w_t`, which explodes where the student's :math:`p_t \\to 1`.
    """
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return torch.corrcoef(ranks)[0, 1].item()


def superclass_order(superclass_map: Tensor) -> Tensor:
    """Class indices sorted by super-class (stable: classes keep their order inside a super-class)."""
    return torch.sort(superclass_map, stable=True).indices


def superclass_contrast(corr: Tensor, superclass_map: Tensor) -> float:
    """Mean correlation between distinct classes of one super-class minus that between classes of different ones.

    A scalar summary of Fig. 1's block-diagonal pattern: near 0 without class relationships, positive with them.
    """
    same = superclass_map[:, None] == superclass_map[None, :]
    off_diagonal = ~torch.eye(len(superclass_map), dtype=torch.bool)
    return (corr[same & off_diagonal].nanmean() - corr[~same].nanmean()).item()


class DistillDiagnostics(Callback):
    """Draws Figs. 1 and 2 of Tang et al. at the end of fit (and every ``every_n_epochs``), logs and saves them.

    The examples are the first ``max_samples`` of the whole validation set, on rank 0 (a trainer's validation loader
    with a distributed sampler is read without it, so the figures do not depend on the number of devices).
    Figure (a) needs a teacher: ``pl_module.teacher`` (a :class:`~kd_lightning.DistillModule`), or the module itself
    when it has none (a teacher being trained). Figure (b) needs a student with a teacher, and reads its ``alpha``
    and ``temperature``. Each figure is saved as a PNG under ``dirpath`` and sent to every logger that takes
    figures (TensorBoard's ``add_figure``, or ``log_image`` as in W&B); the scalar summaries
    ``diagnostics/superclass_contrast_T<T>`` (see :func:`superclass_contrast`) and
    ``diagnostics/rescaling_confidence_spearman`` (rank correlation of :math:`p^t_t` and :math:`w_t`) go to the loggers
    and to :attr:`stats`.

    Args:
        temperatures: temperatures of the heatmaps (Fig. 1 shows a low and a high one).
        every_n_epochs: also draw after every n-th validation epoch; 0: only at the end of fit.
        max_samples: validation examples used at most.
        dirpath: where the PNGs go; None: ``<trainer.log_dir or default_root_dir>/diagnostics``.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: an argument out of range.
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (1.0, 4.0),
        every_n_epochs: int = 0,
        max_samples: int = 10_000,
        dirpath: str | None = None,
    ) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("DistillDiagnostics needs matplotlib: pip install 'kd-lightning[figures]'")
        if not temperatures or any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be a non-empty list of values > 0, got {list(temperatures)}")
        if every_n_epochs < 0 or max_samples < 2:
            raise ValueError(f"need every_n_epochs >= 0 and max_samples >= 2, got {every_n_epochs}, {max_samples}")
        self.temperatures = [float(t) for t in temperatures]
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.dirpath = dirpath
        #: The scalar summaries of the last drawing.
        self.stats: dict[str, float] = {}

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and not trainer.sanity_checking and epoch % self.every_n_epochs == 0:
            self.draw(trainer, pl_module, f"epoch{trainer.current_epoch}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, "final")

    @rank_zero_only
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str = "final") -> None:
        """Computes, draws, saves (as ``<figure>_<tag>.png``) and logs both figures now."""
        outputs = self._collect(trainer, pl_module)
        if outputs is None:
            rank_zero_warn("DistillDiagnostics: no validation data to draw the figures from")
            return
        teacher_logits, student_logits, y = outputs
        superclass_map = data_attribute(trainer.datamodule, "superclass_map")
        step = trainer.global_step
        figures = {"teacher_correlation": self._correlation_figure(teacher_logits, superclass_map)}
        if student_logits is not None:
            figures["gradient_rescaling"] = self._rescaling_figure(teacher_logits, student_logits, y, pl_module)
        directory = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "diagnostics")
        directory.mkdir(parents=True, exist_ok=True)
        for name, figure in figures.items():
            path = directory / f"{name}_{tag}.png"
            figure.savefig(path, dpi=100)
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_figure"):
                    logger.experiment.add_figure(f"diagnostics/{name}", figure, step)
                elif hasattr(logger, "log_image"):
                    logger.log_image(key=f"diagnostics/{name}", images=[str(path)], step=step)
        for logger in trainer.loggers:
            logger.log_metrics(self.stats, step)

    def _collect(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Tensor, Tensor | None, Tensor] | None:
        """Teacher logits, student logits (None without a teacher) and labels of up to ``max_samples`` examples."""
        datamodule = trainer.datamodule
        loaders = datamodule.val_dataloader() if datamodule else trainer.val_dataloaders
        device_transform = data_attribute(datamodule, "device_transform")
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if not loader:
            return None
        loader = _unsharded(loader)
        teacher = getattr(pl_module, "teacher", None)
        was_training = pl_module.training
        pl_module.eval()
        teachers, students, labels, seen = [], [], [], 0
        with torch.no_grad():
            for batch in loader:
                x, y = (t.to(pl_module.device) for t in batch)
                if device_transform is not None:  # on-device normalisation of uint8 batches (augment_on_device)
                    x, y = device_transform((x, y), train=False)
                student = pl_module(x)
                teachers.append((teacher(x) if teacher is not None else student).float().cpu())
                students.append(student.float().cpu())
                labels.append(y.cpu())
                seen += len(y)
                if seen >= self.max_samples:
                    break
        pl_module.train(was_training)
        n = self.max_samples
        students_out = torch.cat(students)[:n] if teacher is not None else None
        return torch.cat(teachers)[:n], students_out, torch.cat(labels)[:n]

    def _correlation_figure(self, teacher_logits: Tensor, superclass_map: Tensor | None) -> Any:
        from matplotlib.figure import Figure

        num_classes = teacher_logits.shape[1]
        order = superclass_order(superclass_map) if superclass_map is not None else torch.arange(num_classes)
        figure = Figure(figsize=(4.5 * len(self.temperatures), 4.0), layout="constrained")
        axes = figure.subplots(1, len(self.temperatures), squeeze=False)[0]
        for ax, temperature in zip(axes, self.temperatures, strict=True):
            corr = class_correlation(kd_target(teacher_logits, temperature))
            if superclass_map is not None:
                key = f"diagnostics/superclass_contrast_T{temperature:g}"
                self.stats[key] = superclass_contrast(corr, superclass_map)
            image = ax.imshow(corr[order][:, order].numpy(), cmap="viridis", vmin=-1, vmax=1)
            ax.set_title(f"teacher Pearson correlation, T={temperature:g}")
            ax.set_xlabel("class (by super-class)" if superclass_map is not None else "class")
        figure.colorbar(image, ax=list(axes), shrink=0.8)
        return figure

    def _rescaling_figure(self, teacher_logits: Tensor, student_logits: Tensor, y: Tensor, pl_module: Any) -> Any:
        from matplotlib.figure import Figure

        alpha, temperature = pl_module.hparams.alpha, pl_module.hparams.temperature
        rho = kd_target(teacher_logits, temperature)
        confidence = rho.gather(1, y[:, None]).squeeze(1)
        weights = gradient_rescaling(student_logits, rho, y, alpha, temperature)
        keep = weights.isfinite()
        rank_correlation = spearman(confidence[keep], weights[keep])
        self.stats["diagnostics/rescaling_confidence_spearman"] = rank_correlation
        figure = Figure(figsize=(5.0, 4.0), layout="constrained")
        ax = figure.subplots()
        ax.scatter(confidence[keep].numpy(), weights[keep].numpy(), s=4, alpha=0.4)
        low, high = weights[keep].quantile(torch.tensor([0.02, 0.98])).tolist()  # w_t explodes where p_t -> 1
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
        ax.set_xlabel(f"teacher confidence on the ground truth $p^t_t$ (T={temperature:g})")
        ax.set_ylabel("gradient rescaling factor $w_t$")
        ax.set_title(f"Proposition 2: Spearman rho = {rank_correlation:.2f} (alpha={alpha:g})")
        return figure


def _unsharded(loader: DataLoader) -> DataLoader:
    """``loader`` over its whole dataset, in order, when it has a distributed sampler.

    The trainer's validation loaders (used when there is no datamodule) carry Lightning's distributed sampler: on
    rank 0, the one that draws, they would yield only its shard (rank 0's shard is never padded, so no sample would
    be repeated, but the figures would depend on the number of devices). A datamodule's fresh loader has none.
    """
    if distributed_sampler_of(loader) is None:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=getattr(loader.batch_sampler, "batch_size", None) or 1,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )
