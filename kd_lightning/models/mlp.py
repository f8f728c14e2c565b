"""Residual MLP of the synthetic experiments of Tang et al., "Understanding and Improving Knowledge Distillation"
(arXiv:2002.03532, Appendix 7.2).

Fully connected layers with ReLU, batch norm on each layer and residual connections. With ``normalized=True`` the
penultimate features and the rows of the last-layer weight are L2-normalised, so a logit is ``scale`` times the
cosine between a feature and a class weight (cosines lie in [-1, 1], hence the scale).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.models.registry import Backbone, register_backbone

__all__ = ["L2Normalize", "NormalizedLinear", "ResidualMLP", "ResidualMLPBlock"]


class L2Normalize(nn.Module):
    """Scales each row of a ``(B, D)`` input to unit L2 norm."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


class NormalizedLinear(nn.Linear):
    """Cosine classifier: ``logits = scale * x @ normalize(W).T``, each class weight row L2-normalised, no bias.

    Args:
        in_features: feature width ``D``.
        out_features: number of classes.
        scale: multiplier of the logits.
    """

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(x, F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


def linear_bn(in_features: int, out_features: int) -> nn.Sequential:
    """Linear layer (no bias, batch norm follows) and batch norm."""
    return nn.Sequential(nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features))


class ResidualMLPBlock(nn.Module):
    """``ReLU(x + BN(Linear(ReLU(BN(Linear(x))))))``: a two-layer residual block of constant width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(linear_bn(width, width), nn.ReLU(inplace=True), linear_bn(width, width))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.residual(x))


class ResidualMLP(Backbone):
    """Residual MLP: Linear-BN-ReLU stem, ``num_blocks`` residual blocks, optional L2-normalised features/weights.

    Args:
        num_classes: outputs of the classifier.
        in_features: input width (``input_shape = (in_features,)``).
        hidden: width of every hidden layer and of the features.
        num_blocks: number of residual blocks (= stages).
        normalized: L2-normalise the features (head) and the class weights (:class:`NormalizedLinear`);
            otherwise the head is the identity and the classifier a plain ``nn.Linear``.
        scale: logit scale of the normalised classifier.

    Raises:
        ValueError: ``num_blocks < 1``.
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int = 64,
        hidden: int = 128,
        num_blocks: int = 2,
        normalized: bool = True,
        scale: float = 16.0,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.input_shape = (in_features,)
        self.stem = nn.Sequential(linear_bn(in_features, hidden), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(ResidualMLPBlock(hidden) for _ in range(num_blocks))
        if normalized:
            self.head = L2Normalize()
            self.classifier = NormalizedLinear(hidden, num_classes, scale)
        else:
            self.head = nn.Identity()
            self.classifier = nn.Linear(hidden, num_classes)


@register_backbone("mlp")
def mlp(
    num_classes: int,
    in_features: int = 64,
    hidden: int = 128,
    num_blocks: int = 2,
    normalized: bool = True,
    scale: float = 16.0,
) -> ResidualMLP:
    """Residual MLP of Tang et al. (2020, App. 7.2); 88K parameters with the defaults and 100 classes.

    See :class:`ResidualMLP` for the arguments.
    """
    return ResidualMLP(num_classes, in_features, hidden, num_blocks, normalized, scale)
