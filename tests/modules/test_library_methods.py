"""The methods with timm and torchvision backbones on small image folders: a KD run whose teacher is a pretrained
library model fine-tuned on the folder and whose student is of the other library, DUPS runs, generations."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torchvision import models as tv_models

from kd_lightning import ClassifierModule, DistillModule, DUPSModule, GenerationModule
from kd_lightning.checkpoints import write_module_checkpoint
from tests.data.image_fakes import folder_datamodule
from tests.helpers import fast_trainer

pytestmark = pytest.mark.usefixtures("single_thread")
#: A tiny run: two batches of four 32-pixel images per epoch.
RUN = {"limit_train_batches": 2, "limit_val_batches": 1}
#: (teacher, student): a teacher of one library, a student of the other.
PAIRS = [("timm/convnext_atto", "torchvision/mobilenet_v3_small"), ("torchvision/mobilenet_v2", "timm/resnet10t")]


def pretrained_file(name: str, path: Path) -> str:
    """Stands for the published weights of ``name`` (1000 classes), saved to ``path``: tests never download."""
    library, model = name.split("/")
    network = timm.create_model(model) if library == "timm" else tv_models.get_model(model)
    torch.save(network.state_dict(), path)
    return str(path)


def fit(module, root: Path, tmp_path: Path, **trainer) -> dict[str, float]:
    """Fit ``module`` on the image folder; the logged metrics."""
    run = fast_trainer(tmp_path, **{**RUN, **trainer})
    run.fit(module, datamodule=folder_datamodule(root, val_size=3))
    return {key: float(value) for key, value in run.callback_metrics.items()}


@pytest.mark.parametrize(("teacher", "student"), PAIRS, ids=["convnext-teaches-mobilenet", "mobilenet-teaches-resnet"])
def test_kd_from_a_fine_tuned_pretrained_teacher_of_another_library(image_folder, tmp_path, teacher, student):
    weights = pretrained_file(teacher, tmp_path / "pretrained.pth")
    tuned = ClassifierModule(backbone=teacher, num_classes=3, backbone_kwargs={"pretrained_file": weights})
    fit(tuned, image_folder, tmp_path / "teacher")
    checkpoint = write_module_checkpoint(tmp_path / "teacher.ckpt", tuned)
    Path(weights).unlink()  # the teacher is rebuilt from its checkpoint alone

    kd = DistillModule(backbone=student, num_classes=3, teacher_backbone=teacher, teacher_checkpoint=str(checkpoint))
    before = {k: v.clone() for k, v in kd.teacher.network.state_dict().items()}
    torch.testing.assert_close(before, tuned.backbone.state_dict())
    metrics = fit(kd, image_folder, tmp_path / "student")
    assert torch.isfinite(torch.tensor(metrics["train/kd"])) and "val/acc1" in metrics
    torch.testing.assert_close(kd.teacher.network.state_dict(), before)  # frozen, BatchNorm statistics included


@pytest.mark.parametrize("backbone", ["timm/mobilenetv3_small_050", "torchvision/mobilenet_v3_small"])
def test_dups_with_a_library_backbone(image_folder, tmp_path, backbone):
    module = DUPSModule(backbone=backbone, num_classes=3, num_stages=2)
    metrics = fit(module, image_folder, tmp_path, max_epochs=2)  # stage 1 learns from stage 0's class targets
    assert metrics["train/kd"] > 0
    assert torch.allclose(module.class_targets.targets.sum(dim=1), torch.ones(3))


def test_a_new_generation_of_a_pretrained_library_backbone_restarts_from_its_weights(tmp_path):
    weights = pretrained_file("timm/mobilenetv3_small_050", tmp_path / "pretrained.pth")
    module = GenerationModule(
        backbone="timm/mobilenetv3_small_050", num_classes=3, score_topk=3, backbone_kwargs={"pretrained_file": weights}
    )
    pretrained_stem = module.backbone.stem[0].weight.detach().clone()
    with torch.no_grad():
        module.backbone.stem[0].weight.add_(1.0)  # as if trained
    module.start_next_generation(seed=1)
    torch.testing.assert_close(module.backbone.stem[0].weight, pretrained_stem)
    torch.testing.assert_close(module.finished[0].network.stem[0].weight, pretrained_stem + 1.0)
    assert module.backbone.training
