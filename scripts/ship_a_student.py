"""From a pretrained teacher to a shipped student, on scikit-learn's digits as image files (docs/deployment.md).

The whole path, each step a documented ``kd-lightning`` command run in this process:

1. the data: the 1,797 digits written as PNG files, ``OUT/digits/{train,val}/<digit>/`` (``val`` is the test set);
2. the teacher's pretrained weights, ``OUT/convnext_atto.pth``: timm's ImageNet weights of ConvNeXt-Atto, or, with
   ``--offline`` (no internet), a fresh initialisation written to the same file;
3. ``kd-lightning fit`` with the configs of ``configs/recipes/ship_digits``: the teacher fine-tuned from that file, the
   student (torchvision's ShuffleNetV2 1.0x) alone, with KD from the teacher, with DUPS;
4. the best student exported as ``OUT/best_student.onnx`` (``kd-lightning export``), the teacher as
   ``OUT/teacher.onnx``, both timed in onnxruntime (batch 1, one thread; the students share one architecture, hence
   one latency);
5. the best student run on the test images by ``kd-lightning predict`` (``OUT/predictions.csv``).

The comparison (test top-1, parameters, latency per image) is printed and written to ``OUT/report.md``. ``--smoke``
runs every step on a few batches (what the tests run).

Usage: ``python scripts/ship_a_student.py [--out runs/ship_digits] [--offline] [--smoke]``
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

from kd_lightning.checkpoints import read_checkpoint
from kd_lightning.cli import main as kd_lightning
from kd_lightning.data.digits import write_digits_images
from kd_lightning.export import METADATA_KEY, export_checkpoint, inference_network, load_for_inference

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "recipes" / "ship_digits"
#: The runs, in order (the teacher first: KD reads its checkpoint), and what each is.
RUNS = {
    "teacher": "teacher: timm ConvNeXt-Atto, fine-tuned",
    "student_alone": "student alone: torchvision ShuffleNetV2 1.0x",
    "kd": "student + KD from the teacher",
    "dups": "student + DUPS (no teacher)",
}
#: The few batches of ``--smoke``.
SMOKE = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
]


def write_pretrained(path: Path, offline: bool) -> None:
    """The teacher's starting weights: timm's pretrained ConvNeXt-Atto (downloaded), or a fresh one when offline."""
    torch.save(timm.create_model("convnext_atto", pretrained=not offline).state_dict(), path)


def fit(name: str, out: Path, smoke: bool) -> dict[str, float]:
    """``kd-lightning fit`` of the run ``name`` with its paths under ``out``; its final metrics."""
    paths = [
        f"--trainer.default_root_dir={out / name}",
        f"--data.init_args.root={out / 'digits'}",
        "--overwrite=true",
        "--trainer.enable_progress_bar=false",
    ]
    if name == "teacher":
        paths.append(f'--model.init_args.backbone_kwargs={{"pretrained_file": "{out / "convnext_atto.pth"}"}}')
    if name == "kd":
        paths.append(f"--model.init_args.teacher_checkpoint={checkpoint_of(out, 'teacher')}")
    smoke_args = [*SMOKE, *(["--model.init_args.num_stages=2"] if name == "dups" else [])] if smoke else []
    kd_lightning(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *paths, *smoke_args])
    return json.loads((out / name / "summary.json").read_text())["metrics"]


def checkpoint_of(out: Path, name: str) -> Path:
    return out / name / "checkpoints" / "last.ckpt"


def parameters(ckpt: Path) -> int:
    """Parameters of the checkpoint's inference network (what is shipped)."""
    network, _ = inference_network(load_for_inference(ckpt, read_checkpoint(ckpt)))
    return sum(p.numel() for p in network.parameters())


def latency_ms(onnx_file: Path, repeats: int) -> float:
    """Median milliseconds per image of the ONNX network in onnxruntime: batch 1 of the input shape its metadata
    gives, one thread, after a warm-up."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    shape = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])["input_shape"]
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, *shape), np.float32)}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def prediction_accuracy(csv_file: Path) -> float:
    """Top-1 of a predictions file whose images lie in folders named by their class."""
    rows = list(csv.DictReader(csv_file.open()))
    return sum(Path(row["path"]).parent.name == row["prediction"] for row in rows) / len(rows)


def report(rows: list[dict], best: str, predicted: float, out: Path) -> str:
    lines = [
        "| run | test top-1 | parameters | ONNX latency per image (ms, 1 thread) |",
        "|---|---|---|---|",
        *(
            f"| {RUNS[r['run']]}{' (shipped)' if r['run'] == best else ''} | {100 * r['acc1']:.2f}% | "
            f"{r['params'] / 1e6:.2f}M | {r['latency']:.2f} |"
            for r in rows
        ),
        "",
        f"Shipped: {out / 'best_student.onnx'}; `kd-lightning predict` on the {out / 'digits' / 'val'} images: "
        f"top-1 {100 * predicted:.2f}% ({out / 'predictions.csv'}).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the recipe; returns the report (also in ``OUT/report.md``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ship_digits"), help="where everything is written")
    parser.add_argument("--offline", action="store_true", help="no download: the teacher starts from a fresh init")
    parser.add_argument("--smoke", action="store_true", help="a few batches per step (the tests' run)")
    options = parser.parse_args(argv)
    out = options.out.resolve()
    if not (out / "digits").is_dir():
        write_digits_images(out / "digits")
    if not (out / "convnext_atto.pth").is_file():
        write_pretrained(out / "convnext_atto.pth", options.offline)
    accuracy = {name: fit(name, out, options.smoke)["test/acc1"] for name in RUNS}
    best = max((name for name in RUNS if name != "teacher"), key=accuracy.get)
    shipped = out / "best_student.onnx"
    kd_lightning(["export", f"--ckpt_path={checkpoint_of(out, best)}", "--format=onnx", f"--output={shipped}"])
    teacher = export_checkpoint(checkpoint_of(out, "teacher"), "onnx", out / "teacher.onnx").path
    repeats = 20 if options.smoke else 500
    latency = {"teacher": latency_ms(teacher, repeats), "student": latency_ms(shipped, repeats)}  # one per architecture
    rows = [
        {
            "run": name,
            "acc1": accuracy[name],
            "params": parameters(checkpoint_of(out, name)),
            "latency": latency["teacher" if name == "teacher" else "student"],
        }
        for name in RUNS
    ]
    predictions = out / "predictions.csv"
    images = str(out / "digits" / "val")
    kd_lightning(
        ["predict", f"--ckpt_path={checkpoint_of(out, best)}", "--images", images, "--output", str(predictions)]
    )
    text = report(rows, best, prediction_accuracy(predictions), out)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
