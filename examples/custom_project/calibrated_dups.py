"""A user's own backbone and method: a small CNN for 8x8 digits, and DUPS that also reports its calibration.

Importing this module registers the backbone ``tiny_digits_cnn``; the CLI imports it when it resolves
``model.class_path: calibrated_dups.CalibratedDUPS``, so configs can name the backbone.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning import Backbone, DUPSModule, register_backbone


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyDigitsCNN(Backbone):
    """A 3-layer CNN for 1x8x8 inputs that honours kd-lightning's backbone contract.

    ``stem`` -> ``stages`` (an ``nn.ModuleList``) -> ``head`` (ending in ``(B, D)`` features) -> ``classifier``
    (an ``nn.Linear``); :class:`~kd_lightning.Backbone` provides ``forward_features`` and ``forward`` from them, so
    feature-based methods (OKDDip's attention, self-distillation's MMD) and branch-based student groups work too.

    Args:
        num_classes: outputs of the classifier.
        width: channels of the first stage (the second has twice as many).
    """

    input_shape = (1, 8, 8)

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, width)
        self.stages = nn.ModuleList([conv_bn_relu(width, width), conv_bn_relu(width, 2 * width, stride=2)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)


@register_backbone("tiny_digits_cnn")
def tiny_digits_cnn(num_classes: int, width: int = 32) -> TinyDigitsCNN:
    """The registry's factory: ``create_backbone("tiny_digits_cnn", num_classes, width=...)``."""
    return TinyDigitsCNN(num_classes, width)


class CalibratedDUPS(DUPSModule):
    """DUPS (Alg. 1: CE, then CE + KL to the class's mean peer prediction) that also logs its calibration.

    The one overridden hook is :meth:`eval_extra_metrics`: besides the accuracies of every evaluation epoch it logs
    ``<stage>/confidence``, the mean top-1 probability, and ``<stage>/overconfidence``, the mean of
    ``confidence - correct`` (above 0: over-confident). DUPS, like label smoothing, should keep it small.
    Everything else (stages, class targets, losses, checkpoints) is :class:`~kd_lightning.DUPSModule`'s.
    """

    def eval_extra_metrics(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        metrics = super().eval_extra_metrics(outputs, target)
        prediction_logits = next(iter(outputs.values()))  # the first output is the model's prediction
        confidence, predicted = prediction_logits.float().softmax(dim=-1).max(dim=-1)
        correct = (predicted == target).float()
        return {**metrics, "confidence": confidence.mean(), "overconfidence": (confidence - correct).mean()}
