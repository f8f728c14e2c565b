"""The backbone contract for every registered backbone, parameter counts against the papers, registry errors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.models import Backbone, create_backbone, list_backbones, register_backbone
from kd_lightning.models.densenet import DenseNet
from kd_lightning.models.mlp import NormalizedLinear, ResidualMLP
from kd_lightning.models.torchvision_models import resolve_weights
from kd_lightning.models.wide_resnet import WideResNet

NUM_CLASSES = 7
MAX_SIDE = 64  # ImageNet-sized inputs are shrunk to 64x64 to keep the tests fast; adaptive pooling copes.


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Run this module on one thread.

    Batch-2 forwards gain little from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads
    slowed them down 5-10x (255 s instead of 32 s for this file).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_input(model: Backbone, batch: int = 2) -> torch.Tensor:
    """A random batch of the model's ``input_shape``, spatial sides capped at ``MAX_SIDE``."""
    shape = model.input_shape
    if len(shape) == 3:
        shape = (shape[0], min(shape[1], MAX_SIDE), min(shape[2], MAX_SIDE))
    return torch.randn(batch, *shape)


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=NUM_CLASSES)
    assert isinstance(model, Backbone)
    assert isinstance(model.stages, nn.ModuleList) and len(model.stages) >= 1
    assert isinstance(model.classifier, nn.Linear) and model.num_classes == NUM_CLASSES
    x = small_input(model)

    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.classifier.in_features)
        torch.testing.assert_close(model(x), model.classifier(features))


# (num_classes, parameters in millions) from the papers, recomputed for the classifier and shortcuts used here.
PAPER_PARAMETERS = {
    # He et al. give 0.46M / 1.7M for CIFAR-10 with parameter-free (option A) shortcuts; option B's projections and
    # a 100-way classifier add ~9K: 0.47M / 1.74M (as KD codebases with option B report).
    "resnet32": (100, 0.47),
    "resnet110": (100, 1.74),
    "wrn_16_8": (100, 11.0),  # Zagoruyko & Komodakis, Table 4
    "wrn_28_10": (100, 36.5),
    "preact_resnet18": (100, 11.2),
    # Huang et al. (Table 2) give 1.0M for CIFAR-10; the 100-way classifier on 448-d features adds 40K.
    "densenet40_12": (100, 1.06),
    "densenet100_12": (100, 7.0),  # Huang et al., Table 2
    "densenet_bc100_12": (100, 0.8),
    "densenet_bc190_40": (100, 25.6),
    "resnext29_8x64d": (100, 34.4),  # Xie et al., Table 7
    "resnet50": (1000, 25.6),  # torchvision
}


@pytest.mark.parametrize(("name", "num_classes", "millions"), [(n, *v) for n, v in PAPER_PARAMETERS.items()])
def test_parameter_count_matches_paper(name: str, num_classes: int, millions: float) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = create_backbone(name, num_classes=num_classes)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(millions * 1e6, rel=0.03)


@pytest.mark.parametrize("name", ["okddip_resnet110", "okddip_wrn_20_8"])
def test_okddip_networks_have_256d_features(name: str) -> None:
    with torch.device("meta"):
        assert create_backbone(name, num_classes=100).num_features == 256


def test_he_initialisation() -> None:
    model = create_backbone("resnet20", num_classes=10)
    conv = model.stages[2][1].residual[0][0]  # a 64 -> 64 3x3 convolution: 36,864 weights
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet21'; registered backbones: .*resnet20, resnet32"):
        create_backbone("resnet21", num_classes=10)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        create_backbone("resnet20", num_classes=0)


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="backbone 'resnet20' is already registered"):
        register_backbone("resnet20")(lambda num_classes: ResidualMLP(num_classes))


def test_pretrained_weights_are_resolved_without_download() -> None:
    assert resolve_weights("resnet50", False) is None
    assert resolve_weights("resnet50", True).name == "IMAGENET1K_V2"
    assert resolve_weights("resnet50", "IMAGENET1K_V1").name == "IMAGENET1K_V1"


def test_unknown_pretrained_weights_list_valid_names() -> None:
    match = r"unknown weights 'IMAGENET1K_V9' for resnet50; use True, False or one of: IMAGENET1K_V1, IMAGENET1K_V2"
    with pytest.raises(ValueError, match=match):
        create_backbone("resnet50", num_classes=10, pretrained="IMAGENET1K_V9")


def test_wide_resnet_rejects_bad_depth_and_applies_dropout() -> None:
    with pytest.raises(ValueError, match="WRN depth must be 6n \\+ 4 with n >= 1"):
        WideResNet(depth=20, widen_factor=2, num_classes=10)
    model = create_backbone("wrn_16_2", num_classes=10, dropout=0.3)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_densenet_rejects_bad_depth_and_compression() -> None:
    with pytest.raises(ValueError, match="DenseNet depth must be 6n \\+ 4 with n >= 1, got 41"):
        DenseNet(depth=41, growth_rate=12, num_classes=10, bottleneck=True)
    with pytest.raises(ValueError, match="compression must be in \\(0, 1\\], got 0"):
        DenseNet(depth=40, growth_rate=12, num_classes=10, compression=0)


def test_mlp_cosine_logits_and_plain_variant() -> None:
    model = create_backbone("mlp", num_classes=5, in_features=8, hidden=16, scale=4.0).eval()
    assert model.input_shape == (8,) and isinstance(model.classifier, NormalizedLinear)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model.forward_features(x).norm(dim=1), torch.ones(3))
    assert model(x).abs().max() <= 4.0 + 1e-5
    plain = create_backbone("mlp", num_classes=5, in_features=8, normalized=False)
    assert type(plain.classifier) is nn.Linear and isinstance(plain.head, nn.Identity)
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        ResidualMLP(num_classes=5, num_blocks=0)
