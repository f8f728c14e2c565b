"""timm and torchvision models as backbones: the contract, the library's own forward and weights, stages, pretrained
files (never downloaded), re-initialisation, errors."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import models as tv_models

from kd_lightning.cli import main
from kd_lightning.models import StudentGroup, create_backbone
from kd_lightning.models.library import LibraryBackbone, library_models
from kd_lightning.models.registry import weights_loaded_later

pytestmark = pytest.mark.usefixtures("single_thread")
NUM_CLASSES = 5
#: One small model of each family split at its stages, and timm's GhostNet, built as one stage.
MODELS = [
    ("timm/convnext_atto", 4),
    ("timm/resnet10t", 4),
    ("timm/mobilenetv3_small_050", 6),
    ("timm/efficientnet_lite0", 7),
    ("timm/regnetx_002", 4),
    ("torchvision/mobilenet_v3_small", 4),
    ("torchvision/mobilenet_v2", 5),
    ("torchvision/shufflenet_v2_x0_5", 3),
    ("torchvision/regnet_x_400mf", 4),
    ("timm/ghostnet_050", 1),
]


def library_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The library's own model of ``timm/<model>`` or ``torchvision/<model>``."""
    library, model = name.split("/")
    if library == "timm":
        return timm.create_model(model, num_classes=num_classes)
    return tv_models.get_model(model, num_classes=num_classes)


@pytest.mark.parametrize(("name", "stages"), MODELS, ids=[name for name, _ in MODELS])
def test_library_backbone_is_the_library_model_in_the_contract(name: str, stages: int) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name, NUM_CLASSES)
    assert isinstance(backbone, LibraryBackbone) and isinstance(backbone.classifier, nn.Linear)
    assert len(backbone.stages) == stages
    assert (backbone.unsplittable_reason is None) == (stages > 1)
    reference = library_model(name)
    reference.load_state_dict(backbone.library_state_dict())  # the library's own keys
    backbone.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone.forward_features(x)
        assert features.shape == (2, backbone.num_features)
        torch.testing.assert_close(backbone(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(backbone.classifier(features), backbone(x))
    backbone.train()
    nn.functional.cross_entropy(backbone(x), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_branches_split_a_library_backbone_at_its_stages() -> None:
    group = StudentGroup("torchvision/mobilenet_v3_small", NUM_CLASSES, num_students=2, shared_stages=3)
    output = group(torch.randn(2, 3, 32, 32))
    assert output.logits.shape == (2, 2, NUM_CLASSES)
    student = group.export(1)
    student.eval(), group.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(x), group.student_logits(x, 1))


def test_a_one_stage_family_refuses_branches_and_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"'torchvision/mnasnet0_5' \(MNASNet\) is one stage .*\(network_based=True\)"):
        StudentGroup("torchvision/mnasnet0_5", NUM_CLASSES, num_students=2, shared_stages=0)
    assert StudentGroup("torchvision/mnasnet0_5", NUM_CLASSES, num_students=2, shared_stages=None).num_students == 2


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_file_is_loaded_and_the_classifier_replaced(tmp_path, suffix: str) -> None:
    source = timm.create_model("convnext_atto")  # 1000 classes, as the published weights
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    else:
        torch.save(source.state_dict(), path)
    backbone = create_backbone("timm/convnext_atto", NUM_CLASSES, pretrained_file=str(path))
    torch.testing.assert_close(backbone.stem[0][0].weight, source.stem[0].weight)
    assert backbone.classifier.weight.shape == (NUM_CLASSES, 320)


def test_pretrained_file_of_the_same_class_count_keeps_its_classifier(tmp_path) -> None:
    source = tv_models.get_model("mobilenet_v3_small", num_classes=NUM_CLASSES)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "fine_tuned.pth")
    backbone = create_backbone(
        "torchvision/mobilenet_v3_small", NUM_CLASSES, pretrained_file=str(tmp_path / "fine_tuned.pth")
    )
    torch.testing.assert_close(backbone.classifier.weight, source.classifier[3].weight)


def test_a_pretrained_file_of_another_model_is_refused(tmp_path) -> None:
    torch.save(tv_models.get_model("shufflenet_v2_x0_5").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"pretrained_file .*other\.pth does not fit torchvision/mobilenet_v3_small"):
        create_backbone("torchvision/mobilenet_v3_small", NUM_CLASSES, pretrained_file=str(tmp_path / "other.pth"))


def test_pretrained_options_are_exclusive_and_files_must_exist(tmp_path) -> None:
    with pytest.raises(ValueError, match="give pretrained or pretrained_file, not both"):
        create_backbone("timm/convnext_atto", NUM_CLASSES, pretrained=True, pretrained_file="w.pth")
    with pytest.raises(FileNotFoundError, match="no pretrained_file at"):
        create_backbone("timm/convnext_atto", NUM_CLASSES, pretrained_file=str(tmp_path / "missing.pth"))
    with weights_loaded_later():  # a checkpoint's weights follow: neither read nor downloaded
        create_backbone("timm/convnext_atto", NUM_CLASSES, pretrained_file=str(tmp_path / "missing.pth"))
        create_backbone("torchvision/mobilenet_v3_small", NUM_CLASSES, pretrained=True)


def test_a_new_seed_reinitialises_a_library_backbone() -> None:
    """GenerationalKD re-initialises through the registry: the same seed gives the same network, another another."""

    def built(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_backbone("timm/mobilenetv3_small_050", NUM_CLASSES)

    first, again, other = built(1), built(1), built(2)
    torch.testing.assert_close(first.state_dict(), again.state_dict())
    assert not torch.equal(first.classifier.weight, other.classifier.weight)


def test_unknown_models_are_named_with_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'convnext_atoo'; close names: convnext_atto"):
        create_backbone("timm/convnext_atoo", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"unknown torchvision model 'mobilenet_v3_smal'; close names: mobilenet_v3"):
        create_backbone("torchvision/mobilenet_v3_smal", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"unknown backbone 'keras/resnet'.*timm/<model>, torchvision/<model>"):
        create_backbone("keras/resnet", NUM_CLASSES)


def test_models_without_a_linear_classifier_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'torchvision/squeezenet1_0' has no nn\.Linear classifier"):
        create_backbone("torchvision/squeezenet1_0", NUM_CLASSES)
    with pytest.raises(ValueError, match=r"'timm/resnetv2_18' ends in a Conv2d \(head.fc\), not an nn.Linear"):
        create_backbone("timm/resnetv2_18", NUM_CLASSES)


def test_a_timm_name_without_timm_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"'timm/convnext_atto' needs timm: .*pip install 'kd-lightning\[timm\]'"):
        create_backbone("timm/convnext_atto", NUM_CLASSES)


def test_backbones_command_lists_the_libraries(capsys) -> None:
    main(["backbones"])
    printed = capsys.readouterr().out
    assert "# timm: branch-based groups can split ConvNeXt" in printed and "torchvision" in printed
    main(["backbones", "timm", "convnext_at*"])
    assert "timm/convnext_atto" in capsys.readouterr().out.split()
    main(["backbones", "torchvision", "mobilenet_v3*"])
    assert capsys.readouterr().out.split() == ["torchvision/mobilenet_v3_large", "torchvision/mobilenet_v3_small"]
    with pytest.raises(ValueError, match=r"unknown library 'keras'; choose among \['timm', 'torchvision'\]"):
        library_models("keras")
