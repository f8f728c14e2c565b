"""The online-distillation methods OKDDip is compared with: DML, CL-ILR and ONE.

Each is a :class:`~kd_lightning.modules.student_group.DistillationGroupModule` that adds one distillation term to the
students' cross-entropies and states only the arguments whose defaults it changes.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd_lightning.losses import aggregate_targets, group_kd_kl_div, mutual_kl_div
from kd_lightning.models.branches import GroupOutput
from kd_lightning.modules.student_group import DistillationGroupModule

__all__ = ["CLILRModule", "DMLModule", "ONEModule"]


class DMLModule(DistillationGroupModule):
    """DML (Zhang et al. 2018): L = sum_i [CE(z_i, y) + 1/(m-1) sum_{j!=i} T^2 KL(p_j^T || p_i^T)].

    Deep mutual learning (Zhang et al., CVPR 2018): every student also learns from each of the others.

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y) + w(t) \\sum_i \\frac{1}{m-1} \\sum_{j \\ne i}
        T^2\\, \\mathrm{KL}(p_j^T \\,\\|\\, p_i^T),

    logged as ``train/ce`` and ``train/kd`` (see :func:`~kd_lightning.losses.mutual_kl_div`). As OKDDip ran it:
    network-based, T = 3, no ramp-up (:math:`w(t) = 1`); the peers' predictions are constants by default
    (``detach_targets``), as in DML's alternating updates.

    Args:
        network_based: independent networks (DML) or branches.
        rampup_epochs: ramp-up length of the KL term (0: none).
        **kwargs: :class:`DistillationGroupModule` arguments (``num_students``, ``temperature`` ...).
    """

    def __init__(self, network_based: bool = True, rampup_epochs: float = 0.0, **kwargs: Any) -> None:
        super().__init__(network_based=network_based, rampup_epochs=rampup_epochs, **kwargs)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        logits = self.run_group(x).logits
        kd = mutual_kl_div(logits, self.as_target(logits), self.hparams.temperature)
        return {"ce": self.group_cross_entropy(logits, y), "kd": self.distill_weight() * kd}


class CLILRModule(DistillationGroupModule):
    """CL-ILR (Song & Chai 2018): L = sum_i [CE(z_i, y) + w(t) T^2 KL(softmax(mean_{j!=i} z_j / T) || p_i^T)].

    Collaborative learning with intermediate-level representation sharing (Song & Chai, NeurIPS 2018).

    Branch ``i`` learns from the mean of the other branches' logits, softened at ``T``; the gradient that flows from
    the branches into the shared trunk is divided by the number of branches (backpropagation rescaling):

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y) + w(t) \\sum_i T^2\\,
        \\mathrm{KL}\\Big(\\mathrm{softmax}\\big(\\tfrac{1}{m-1}\\textstyle\\sum_{j \\ne i} z_j / T\\big) \\,\\big\\|\\,
        p_i^T\\Big),

    logged as ``train/ce`` and ``train/kd``. Its arguments are those of :class:`DistillationGroupModule` (a ramp-up
    over 80 epochs, as OKDDip's runs).
    """

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        m, temperature = self.num_students, self.hparams.temperature
        logits = self.run_group(x, trunk_grad_scale=1.0 / m).logits
        others = (torch.ones(m, m, device=logits.device) - torch.eye(m, device=logits.device)) / (m - 1)
        targets = aggregate_targets(self.as_target(logits), others, temperature, "logits")
        kd = group_kd_kl_div(logits, targets, temperature)
        return {"ce": self.group_cross_entropy(logits, y), "kd": self.distill_weight() * kd}


class ONEModule(DistillationGroupModule):
    """ONE (Lan et al. 2018): L = sum_i CE(z_i,y) + CE(z_e,y) + w(t) sum_i T^2 KL(p_e^T || p_i^T), z_e = sum_i g_i z_i.

    On-the-fly native ensemble (Lan et al., NeurIPS 2018): the branches distil a gated ensemble of themselves.

    The gate reads the shared trunk's globally pooled output: ``g = softmax(ReLU(BN(W h)))`` over the ``m``
    branches (the authors' code). The gated ensemble's logits :math:`z_e = \\sum_i g_i z_i` are trained with a
    cross-entropy (what trains the gate) and are every branch's target, detached by default:

    .. math:: \\mathcal{L} = \\sum_i \\mathrm{CE}(z_i, y) + \\mathrm{CE}(z_e, y)
        + w(t) \\sum_i T^2\\, \\mathrm{KL}(p_e^T \\,\\|\\, p_i^T),

    logged as ``train/ce``, ``train/ce_ensemble`` and ``train/kd``. Branch-based only (the gate reads the trunk), so
    ONE has no ``network_based`` option. Evaluation also logs the gated ensemble (``<stage>/gated_ensemble/acc1``).

    Args:
        **kwargs: :class:`DistillationGroupModule` arguments (a ramp-up over 80 epochs, as ONE's and OKDDip's runs),
            ``network_based`` excepted.

    Raises:
        ValueError: ``network_based=True``.
    """

    #: ``network_based`` is not an option of ONE (always False), so it is not kept in ``hparams`` either.
    hparams_ignore: ClassVar[tuple[str, ...]] = (*DistillationGroupModule.hparams_ignore, "network_based")

    def __init__(self, **kwargs: Any) -> None:
        _drop_network_based(kwargs)
        super().__init__(network_based=False, **kwargs)
        m = self.num_students
        self.gate = nn.Sequential(nn.Linear(self.group.trunk_width(), m), nn.BatchNorm1d(m), nn.ReLU())

    def gate_weights(self, trunk: Tensor) -> Tensor:
        """``(B, m)`` gate of the trunk output ``(B, C, ...)``, pooled over its spatial dimensions."""
        pooled = trunk.flatten(2).mean(dim=-1) if trunk.dim() > 2 else trunk
        return self.gate(pooled).float().softmax(dim=-1)

    def gated_ensemble(self, output: GroupOutput) -> Tensor:
        """``(B, C)`` gated ensemble logits :math:`\\sum_i g_i z_i`."""
        gate = self.gate_weights(output.trunk)
        return (gate.t()[:, :, None] * output.logits.float()).sum(dim=0)

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = self.unpack_batch(batch)
        output = self.run_group(x)
        logits, temperature = output.logits, self.hparams.temperature
        ensemble = self.gated_ensemble(output)
        target = (self.as_target(ensemble) / temperature).softmax(dim=-1)
        kd = group_kd_kl_div(logits, target.expand_as(logits), temperature)
        return {
            "ce": self.group_cross_entropy(logits, y),
            "ce_ensemble": self.cross_entropy(ensemble, y),
            "kd": self.distill_weight() * kd,
        }

    def eval_output_names(self) -> list[str]:
        return [*super().eval_output_names(), "gated_ensemble"]

    def named_outputs(self, output: GroupOutput) -> dict[str, Tensor]:
        return {**super().named_outputs(output), "gated_ensemble": self.gated_ensemble(output)}


def _drop_network_based(kwargs: dict[str, Any]) -> None:
    """Take ``network_based`` out of :class:`ONEModule`'s ``kwargs``: ``False`` (what configs and checkpoints of
    earlier versions hold) is ignored with a deprecation warning, ``True`` refused.

    Kept out of ``ONEModule.__init__`` so that jsonargparse, which reads its source, does not make it an option.

    Raises:
        ValueError: ``network_based=True``.
    """
    if "network_based" not in kwargs:
        return
    if kwargs.pop("network_based"):
        raise ValueError("ONE is branch-based only: its gate reads the shared trunk (network_based=True given)")
    warnings.warn(
        "ONEModule has no network_based option any more (it is always branch-based): network_based=False is "
        "ignored; remove it (a checkpoint of an earlier version still loads)",
        FutureWarning,
        stacklevel=3,
    )
