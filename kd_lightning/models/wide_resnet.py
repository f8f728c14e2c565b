"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Pre-activation wide basic blocks (:class:`~kd_lightning.models.preact_resnet.PreActBlock`, dropout between the
two convolutions), a 16-channel 3x3 stem, three stages of ``n = (d - 4) / 6`` blocks with ``16k``, ``32k``, ``64k``
channels, and a BN-ReLU-global-average-pooling head.
"""

from __future__ import annotations

from functools import partial

from kd_lightning.models.preact_resnet import PreActBlock, PreActResNet
from kd_lightning.models.registry import register_backbone

__all__ = ["WideResNet"]


class WideResNet(PreActResNet):
    """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016, Table 1).

    Args:
        depth: total depth ``d = 6n + 4``.
        widen_factor: width multiplier ``k``.
        num_classes: outputs of the classifier.
        dropout: dropout probability between the two convolutions of each block (0.3 in the paper's dropout runs).

    Raises:
        ValueError: ``depth`` is not of the form ``6n + 4`` with ``n >= 1``.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, dropout: float = 0.0) -> None:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        super().__init__(partial(PreActBlock, dropout=dropout), (n, n, n), widths, num_classes, stem_width=16)


@register_backbone("wrn_16_2")
def wrn_16_2(num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-16-2: 3 x 2 blocks, 32/64/128 channels; 0.70M parameters (100 classes)."""
    return WideResNet(16, 2, num_classes, dropout)


@register_backbone("wrn_16_8")
def wrn_16_8(num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-16-8: 3 x 2 blocks, 128/256/512 channels; 11.0M parameters (100 classes)."""
    return WideResNet(16, 8, num_classes, dropout)


@register_backbone("wrn_28_10")
def wrn_28_10(num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10: 3 x 4 blocks, 160/320/640 channels; 36.5M parameters (100 classes)."""
    return WideResNet(28, 10, num_classes, dropout)


@register_backbone("wrn_40_2")
def wrn_40_2(num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-40-2: 3 x 6 blocks, 32/64/128 channels; 2.26M parameters (100 classes)."""
    return WideResNet(40, 2, num_classes, dropout)


@register_backbone("wrn_40_4")
def wrn_40_4(num_classes: int, dropout: float = 0.0) -> WideResNet:
    """WRN-40-4: 3 x 6 blocks, 64/128/256 channels; 8.97M parameters (100 classes)."""
    return WideResNet(40, 4, num_classes, dropout)
