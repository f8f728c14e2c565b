"""SelfDistillModule: data-distortion guided self-distillation (Xu & Liu, AAAI 2019) of one network on two views."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from kd_lightning.losses import empirical_mmd, kd_kl_div_logits
from kd_lightning.modules.classifier import ClassifierModule

__all__ = ["BATCH_STATS", "TERMS", "SelfDistillModule"]

#: The loss terms of each configuration of the paper's Table 6 ablation (``ce`` is the "two-branch" column).
Terms = Literal["ce", "ce+mmd", "ce+kl", "ce+kl+mmd"]
TERMS: tuple[str, ...] = get_args(Terms)
#: How BatchNorm layers see the two views: one batch of ``2B`` images, or each view's own ``B`` images.
BatchStats = Literal["joint", "per_view"]
BATCH_STATS: tuple[str, ...] = get_args(BatchStats)


class SelfDistillModule(ClassifierModule):
    """Self-distillation (Xu & Liu 2019), Eq. 5: CE(z_a,y) + CE(z_b,y) + lambda [KL(p_b||p_a) + KL(p_a||p_b)] + mu MMD.

    Data-distortion guided self-distillation (Xu & Liu 2019): one network taught by two distortions of each image.

    Every training image comes as two independently distorted views :math:`x_a, x_b` with one label (the datamodule's
    ``views=2``), and the network minimises their Eq. 5, logged as ``train/ce``, ``train/kl`` and ``train/mmd``:

    .. math::
        \\mathcal{L} = \\underbrace{\\mathrm{CE}(z_a, y) + \\mathrm{CE}(z_b, y)}_{\\texttt{ce}}
        + \\underbrace{\\lambda\\,\\big(D_{KL}(p_b \\| p_a) + D_{KL}(p_a \\| p_b)\\big)}_{\\texttt{kl}}
        + \\underbrace{\\mu\\,\\mathrm{MMD}_{emp}(h_a, h_b)}_{\\texttt{mmd}},

    with :math:`p = \\mathrm{softmax}(z / T)` (Eq. 2 with the temperature of their Sec. "The KL divergence"), each
    KL averaged over the batch (Eq. 3), :math:`h` the global features that feed the classifier
    (``backbone.forward_features``) and :math:`\\mathrm{MMD}_{emp}` the squared distance of the two views' mean
    features (Eq. 1, :func:`~kd_lightning.losses.empirical_mmd`). The target side of each KL (:math:`p_b` in
    :math:`D_{KL}(p_b \\| p_a)`) is detached, so its gradient is :math:`p_a - p_b` on the logits of view ``a`` only,
    as the gradients after Eq. 3 state; ``detach_targets=False`` lets both KL terms reach both views. Eq. 5 has no
    :math:`T^2` factor; ``t2_scaling=True`` adds Hinton et al.'s. Evaluation uses one undistorted view, as the
    paper does.

    **BatchNorm.** The paper's Caffe network has two weight-sharing branches, so each BatchNorm layer normalises each
    view with its own statistics. By default (``batch_stats="joint"``) this module runs one forward pass over the
    concatenated ``2B`` batch, which is faster on accelerators but normalises both views with the statistics of the
    ``2B`` images together (and updates the running statistics once per step, from ``2B`` images).
    ``batch_stats="per_view"`` runs one forward pass per view (the same FLOPs, less parallelism): each view is
    normalised with its own statistics, as in the paper, and the running statistics are updated twice per step.
    Both modes are identical for a network without BatchNorm.

    **Ablations** (Table 6): ``terms="ce"`` (two views, cross-entropy only: "two-branch"), ``"ce+mmd"``, ``"ce+kl"``
    and ``"ce+kl+mmd"`` (the full method). Terms left out are not computed. The one-view baseline is
    :class:`ClassifierModule` with ``views=1``.

    Args:
        temperature: :math:`T > 0` of both KL terms (the paper: 2 on CIFAR-10, 3 on CIFAR-100 and ImageNet).
        kl_weight: :math:`\\lambda \\ge 0` (the paper: 1, as in Deep Mutual Learning).
        mmd_weight: :math:`\\mu \\ge 0` (the paper: 5e-4 by default, 1e-4 to 5e-4 recommended; Table 5 sweeps it).
        terms: which terms of Eq. 5 are on (the ablations of Table 6, see above).
        detach_targets: detach the target distribution of each KL term (the paper's gradients).
        t2_scaling: multiply the KL terms by :math:`T^2` (not in Eq. 5).
        batch_stats: ``"joint"`` (one forward over ``2B`` images) or ``"per_view"`` (one forward per view), see
            above.
        detach_target: deprecated name of ``detach_targets`` (a FutureWarning; removed in the next release).
        **kwargs: :class:`ClassifierModule` arguments (``backbone``, ``num_classes``, ``optimizer`` ...).

    Raises:
        ValueError: a hyperparameter out of range, an unknown ``terms`` or ``batch_stats``.
    """

    supported_views: ClassVar[tuple[int, ...]] = (2,)

    def __init__(
        self,
        temperature: float = 3.0,
        kl_weight: float = 1.0,
        mmd_weight: float = 5e-4,
        terms: Terms = "ce+kl+mmd",
        detach_targets: bool = True,
        t2_scaling: bool = False,
        batch_stats: BatchStats = "joint",
        detach_target: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if detach_target is not None:
            warnings.warn(
                "SelfDistillModule's detach_target is deprecated: use detach_targets (the same option, named as in "
                "the group methods); detach_target will be removed in the next release",
                FutureWarning,
                stacklevel=2,
            )
            detach_targets = detach_target
        super().__init__(**kwargs)
        self.hparams.pop("detach_target", None)
        self.hparams["detach_targets"] = detach_targets
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        if mmd_weight < 0:
            raise ValueError(f"mmd_weight must be >= 0, got {mmd_weight}")
        if terms not in TERMS:
            raise ValueError(f"unknown terms={terms!r}; choose one of {list(TERMS)}")
        if batch_stats not in BATCH_STATS:
            raise ValueError(f"unknown batch_stats={batch_stats!r}; choose one of {list(BATCH_STATS)}")
        # The backbone's compiled __call__ (ClassifierModule) gives only logits: compile the features path too.
        self._features_and_logits: Callable[[Tensor], tuple[Tensor, Tensor]] = (
            torch.compile(self.features_and_logits) if self.hparams.compile else self.features_and_logits
        )

    # ----------------------------------------------------------------------------------------------- forward
    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(h, z)``: the backbone's global features ``(N, D)`` (``forward_features``) and its logits ``(N, C)``."""
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone.forward_features(x)
        return features, self.backbone.classifier(features)

    def two_view_outputs(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(h_a, h_b, z_a, z_b)``: features and logits of both views, in one or two passes (``batch_stats``)."""
        if self.hparams.batch_stats == "per_view":
            h_a, z_a = self._features_and_logits(view_a)
            h_b, z_b = self._features_and_logits(view_b)
            return h_a, h_b, z_a, z_b
        features, logits = self._features_and_logits(torch.cat([view_a, view_b]))
        n = len(view_a)
        return features[:n], features[n:], logits[:n], logits[n:]

    # ----------------------------------------------------------------------------------------------- training
    def unpack_views(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_a, x_b, y)`` of a two-view batch ``((x_a, x_b), y)``; a clear error for a single-view batch."""
        x, y = batch
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise ValueError(
                f"{type(self).__name__} trains on two-view batches ((x_a, x_b), y) but got "
                f"{'a single view' if isinstance(x, Tensor) else f'{len(x)} views'}: set the datamodule's views=2"
            )
        return x[0], x[1], y

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        view_a, view_b, y = self.unpack_views(batch)
        h_a, h_b, z_a, z_b = self.two_view_outputs(view_a, view_b)
        losses = {"ce": self.cross_entropy(z_a, y) + self.cross_entropy(z_b, y)}
        hp = self.hparams
        terms = hp.terms.split("+")
        if "kl" in terms:
            losses["kl"] = hp.kl_weight * self.mutual_kl(z_a, z_b)
        if "mmd" in terms:
            losses["mmd"] = hp.mmd_weight * empirical_mmd(h_a, h_b)
        return losses

    def mutual_kl(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        """:math:`D_{KL}(p_b \\| p_a) + D_{KL}(p_a \\| p_b)` at temperature ``T`` (Eq. 3 twice), targets detached
        unless ``detach_targets=False``, times :math:`T^2` with ``t2_scaling``."""
        hp = self.hparams
        target_a, target_b = (logits_a.detach(), logits_b.detach()) if hp.detach_targets else (logits_a, logits_b)
        t, t2 = hp.temperature, hp.t2_scaling
        return kd_kl_div_logits(logits_a, target_b, t, t2) + kd_kl_div_logits(logits_b, target_a, t, t2)
