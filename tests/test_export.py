"""``kd-lightning export`` and ``predict``: the inference network of each method family (nothing of training in it),
ONNX equal to PyTorch with a dynamic batch, TorchScript and safetensors loaded without kd-lightning, the metadata in
every file, predictions as CSV."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kd_lightning import (
    ClassifierModule,
    DistillModule,
    DUPSModule,
    GenerationModule,
    LanguageModelModule,
    OKDDipModule,
)
from kd_lightning.checkpoints import CONFIG_KEY, saved_model_config, write_module_checkpoint
from kd_lightning.cli import main
from kd_lightning.data import SyntheticDataModule
from kd_lightning.data.digits import DIGITS_MEAN
from kd_lightning.export import Ensemble, export_checkpoint, inference_network
from kd_lightning.predict import image_transform, is_lightning_predict
from tests.data.image_fakes import ANIMALS

CLASSES = ANIMALS
pytestmark = pytest.mark.usefixtures("single_thread")
DIGITS = {"class_path": "kd_lightning.data.DigitsDataModule"}


def folder_config(root: Path) -> dict:
    return {"class_path": "kd_lightning.data.ImageFolderDataModule", "init_args": {"root": str(root), "crop_size": 32}}


def checkpoint(module, path: Path, data: dict | None) -> Path:
    """``module``'s checkpoint at ``path`` with the datamodule options the CLI saves (``data``)."""
    write_module_checkpoint(path, module)
    saved = torch.load(path, weights_only=False)
    saved[CONFIG_KEY] = {"model": saved_model_config(saved), "data": data}
    torch.save(saved, path)
    return path


def outputs(network, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(x)


# ------------------------------------------------------------------------------------- the inference network
def test_a_distilled_student_is_exported_without_its_teacher(tmp_path):
    teacher = checkpoint(ClassifierModule(backbone="resnet20", num_classes=3), tmp_path / "teacher.ckpt", None)
    student = DistillModule(
        backbone="resnet8_w8", num_classes=3, teacher_backbone="resnet20", teacher_checkpoint=str(teacher)
    )
    path = checkpoint(student, tmp_path / "student.ckpt", DIGITS)
    teacher.unlink()  # the student ships alone: its teacher's file is not needed
    result = export_checkpoint(path, "safetensors", tmp_path / "student.safetensors")
    assert set(load_file(result.path)) == set(student.backbone.state_dict())
    assert result.metadata["network"] == "backbone" and result.metadata["method"].endswith("DistillModule")


def test_dups_exports_its_backbone_without_the_class_target_table():
    module = DUPSModule(backbone="resnet8_w8", num_classes=3, num_stages=2)
    network, what = inference_network(module)
    assert what == "backbone" and set(network.state_dict()) == set(module.backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(outputs(network, x), outputs(module.backbone, x))


def test_okddip_exports_its_leader_a_chosen_peer_or_the_peers_ensemble():
    module = OKDDipModule(backbone="resnet8_w8", num_classes=3, num_students=3).eval()
    x = torch.randn(2, 3, 32, 32)
    leader, what = inference_network(module)
    assert what == "student 2 (leader)"
    torch.testing.assert_close(outputs(leader, x), outputs(module, x))
    peer, what = inference_network(module, student=0)
    assert what == "student 0 (peer0)"
    torch.testing.assert_close(outputs(peer, x), module.group.student_logits(x, 0).detach())
    ensemble, _ = inference_network(module, ensemble=True)
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2  # the peers, not the leader
    with torch.no_grad():
        torch.testing.assert_close(outputs(ensemble, x), module.eval_outputs(x)["ensemble"])


def test_generations_export_the_last_generation_or_their_ensemble():
    module = GenerationModule(backbone="resnet8_w8", num_classes=3, score_topk=3)
    module.start_next_generation(seed=1)
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    last, what = inference_network(module)
    assert what == "generation 1 (the last)"
    torch.testing.assert_close(outputs(last, x), outputs(module.backbone, x))
    ensemble, what = inference_network(module, ensemble=True)
    assert what == "ensemble of generations 0-1"
    with torch.no_grad():
        torch.testing.assert_close(outputs(ensemble, x), module.eval_outputs(x)["ensemble"])


def test_options_that_do_not_fit_the_method_are_refused():
    module = ClassifierModule(backbone="resnet8_w8", num_classes=3)
    with pytest.raises(ValueError, match="ClassifierModule has one network: --student is for the group methods"):
        inference_network(module, student=1)
    with pytest.raises(ValueError, match="ClassifierModule has no ensemble"):
        inference_network(module, ensemble=True)
    with pytest.raises(ValueError, match="the run has 1 generation"):
        inference_network(GenerationModule(backbone="resnet8_w8", num_classes=3, score_topk=3), ensemble=True)
    lm = LanguageModelModule(backbone="lstm_small", num_classes=10, backbone_kwargs={"hidden_size": 8})
    with pytest.raises(TypeError, match="export writes the image classifiers' backbones"):
        inference_network(lm)
    with pytest.raises(ValueError, match=r"unknown format 'tflite'; choose among \['onnx', 'torchscript'"):
        export_checkpoint("any.ckpt", "tflite", "out")


# --------------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize(
    ("backbone", "num_classes"),
    [("resnet8_w8", 10), ("timm/mobilenetv3_small_050", 3), ("torchvision/mobilenet_v3_small", 3)],
    ids=["cifar-resnet", "timm", "torchvision"],
)
def test_onnx_equals_pytorch_with_a_dynamic_batch_and_carries_the_metadata(
    tmp_path, image_folder, backbone, num_classes
):
    module = ClassifierModule(backbone=backbone, num_classes=num_classes)
    data = DIGITS if num_classes == 10 else folder_config(image_folder)
    result = export_checkpoint(checkpoint(module, tmp_path / "m.ckpt", data), "onnx", tmp_path / "m.onnx")
    assert result.max_difference <= 1e-4
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's example
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert (got - outputs(module.backbone, x)).abs().max() <= 1e-4
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["kd_lightning"])
    assert metadata["input_shape"] == [3, 32, 32] and metadata["output"] == "logits"
    if num_classes == 10:
        assert metadata["mean"] == list(DIGITS_MEAN) and metadata["class_names"] is None
    else:
        assert metadata["class_names"] == CLASSES and metadata["library_model"] == backbone
        assert metadata["std"] == [0.229, 0.224, 0.225] and "CenterCrop" in metadata["preprocessing"]


# --------------------------------------------------------------------------------- without kd-lightning
WITHOUT_KD_LIGHTNING = r"""
import importlib.abc, json, sys

class NoKDLightning(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "kd_lightning":
            raise ImportError("kd_lightning is not installed here")

sys.meta_path.insert(0, NoKDLightning())
try:
    import kd_lightning
except ImportError:
    pass
else:
    raise SystemExit("kd_lightning could be imported")

import timm, torch
from safetensors import safe_open
from safetensors.torch import load_file

x, expected = torch.load(sys.argv[1])
extra = {"kd_lightning.json": ""}
scripted = torch.jit.load(sys.argv[2], _extra_files=extra)
assert (scripted(x) - expected).abs().max() < 1e-5
with safe_open(sys.argv[3], "pt") as f:
    metadata = json.loads(f.metadata()["kd_lightning"])
assert metadata == json.loads(extra["kd_lightning.json"])
library, model = metadata["library_model"].split("/")
net = timm.create_model(model, num_classes=metadata["num_classes"]).eval()
net.load_state_dict(load_file(sys.argv[3]))
with torch.no_grad():
    assert (net(x) - expected).abs().max() < 1e-5
print("loaded without kd_lightning:", metadata["class_names"])
"""


def test_torchscript_and_safetensors_load_without_kd_lightning(tmp_path, image_folder):
    module = ClassifierModule(backbone="timm/mobilenetv3_small_050", num_classes=3)
    path = checkpoint(module, tmp_path / "m.ckpt", folder_config(image_folder))
    scripted = export_checkpoint(path, "torchscript", tmp_path / "m.pt")
    assert scripted.max_difference == 0.0
    weights = export_checkpoint(path, "safetensors", tmp_path / "m.safetensors")
    with safe_open(weights.path, "pt") as f:
        assert json.loads(f.metadata()["kd_lightning"])["class_names"] == CLASSES
    x = torch.randn(3, 3, 32, 32)
    torch.save((x, outputs(module.backbone, x)), tmp_path / "io.pt")
    script = tmp_path / "deploy.py"
    script.write_text(WITHOUT_KD_LIGHTNING)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "io.pt"), str(scripted.path), str(weights.path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "loaded without kd_lightning: ['cat', 'dog', 'fox']" in done.stdout


# ----------------------------------------------------------------------------------- the commands, as run
def test_fit_export_predict_from_the_command_line(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    main(
        [
            "fit",
            "--model=kd_lightning.ClassifierModule",
            "--model.backbone=torchvision/mobilenet_v3_small",
            "--model.num_classes=3",
            "--data=kd_lightning.data.ImageFolderDataModule",
            f"--data.root={image_folder}",
            "--data.crop_size=32",
            "--data.batch_size=4",
            "--data.num_workers=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={run}",
        ]
    )
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved[CONFIG_KEY]["data"]["init_args"]["root"] == str(image_folder)
    del saved[CONFIG_KEY]["data"]  # as a checkpoint of an earlier version: the run folder's config.yaml says it
    torch.save(saved, last)
    main(["export", f"--ckpt_path={last}", "--format=torchscript", f"--output={tmp_path / 'student.pt'}"])
    assert "written: " in capsys.readouterr().out
    extra = {"kd_lightning.json": ""}
    torch.jit.load(tmp_path / "student.pt", _extra_files=extra)
    assert json.loads(extra["kd_lightning.json"])["class_names"] == CLASSES

    images = [image_folder / "dog", image_folder / "cat" / "img_000.jpg"]
    main(
        ["predict", f"--ckpt_path={last}", "--images", *map(str, images), f"--output={tmp_path / 'p.csv'}", "--top_k=2"]
    )
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [Path(row["path"]).parent.name for row in rows] == ["dog"] * 8 + ["cat"]
    assert list(rows[0]) == ["path", "prediction", "top1_class", "top1_probability", "top2_class", "top2_probability"]
    for row in rows:
        assert row["prediction"] == row["top1_class"] in CLASSES
        assert 0 <= float(row["top2_probability"]) <= float(row["top1_probability"]) <= 1


def test_commands_have_help(capsys):
    for command in ("export", "predict"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: kd-lightning {command}" in capsys.readouterr().out


def test_predict_with_a_config_is_lightnings_own():
    assert is_lightning_predict(["--config", "c.yaml", "--ckpt_path", "x.ckpt"])
    assert is_lightning_predict(["--trainer.max_epochs=1"])
    assert not is_lightning_predict(["--ckpt_path", "x.ckpt", "--images", "folder", "--output", "p.csv"])


def test_predict_needs_an_image_datamodule():
    with pytest.raises(ValueError, match="predict reads image files, but the checkpoint's datamodule is Synthetic"):
        image_transform(SyntheticDataModule(num_train=8, num_val=0, num_test=8))
