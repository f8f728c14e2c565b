"""``kd-lightning predict``: classify image files with a checkpoint's inference network, one CSV row per image.

The network is the one :func:`~kd_lightning.export.inference_network` exports; each image goes through the
evaluation transform of the datamodule the checkpoint was trained with (an image-folder datamodule's resize and
centre crop, or a small-image datamodule's resize to its input size, then its normalisation). The rows: ``path``,
``prediction`` (the class name, or the class index when the datamodule names none), then ``top<i>_class`` and
``top<i>_probability`` for ``i = 1..k``.

With ``--config`` (or any ``--model``/``--data``/``--trainer`` option), ``kd-lightning predict`` is LightningCLI's own
``predict`` (``trainer.predict`` over the datamodule's prediction set) instead.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from kd_lightning.checkpoints import checkpoint_datamodule, read_checkpoint
from kd_lightning.data.image_files import ImageFileDataModule, load_rgb
from kd_lightning.data.small_images import SmallImageDataModule
from kd_lightning.data.transforms import eval_transform
from kd_lightning.export import class_names, inference_network, load_for_inference

__all__ = ["LIGHTNING_OPTIONS", "image_files", "image_transform", "is_lightning_predict", "main", "predict_images"]

#: The two columns of each of the top-k classes: ``top<i>_class``, ``top<i>_probability``.
COLUMN_KINDS = ("class", "probability")
#: Options that make ``kd-lightning predict`` LightningCLI's ``predict``.
LIGHTNING_OPTIONS = ("-c", "--config", "--model", "--data", "--trainer", "--print_config")


def is_lightning_predict(argv: Sequence[str]) -> bool:
    """Whether the arguments of ``kd-lightning predict`` are LightningCLI's (a config, model, data or trainer
    option)."""
    return any(arg.split("=", 1)[0].split(".", 1)[0] in LIGHTNING_OPTIONS for arg in argv)


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files of ``inputs``: a file as it is, a folder's images (any depth, image extensions of any case,
    sorted).

    Raises:
        FileNotFoundError: an input that does not exist.
        ValueError: no image at all.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(
                Path(folder, name)
                for folder, _, names in os.walk(item, followlinks=True)
                for name in names
                if name.lower().endswith(IMG_EXTENSIONS)
            )
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no image or folder at {item}")
    if not files:
        raise ValueError(f"no image files in {', '.join(map(str, inputs))} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return files


def image_transform(datamodule: pl.LightningDataModule | None) -> Callable[[Image.Image], Tensor]:
    """The datamodule's evaluation transform of a decoded RGB image, to the network's normalised input.

    Raises:
        ValueError: a datamodule of other than images (or none known).
    """
    if isinstance(datamodule, ImageFileDataModule):
        return datamodule.evaluation_transform()
    if isinstance(datamodule, SmallImageDataModule):
        return v2.Compose(
            [v2.Resize(list(datamodule.input_shape[1:])), eval_transform(datamodule.mean, datamodule.std)]
        )
    raise ValueError(
        f"predict reads image files, but the checkpoint's datamodule is {type(datamodule).__name__}: train with an "
        "image datamodule (ImageFolderDataModule, DigitsDataModule, CIFARDataModule ...) through kd-lightning fit"
    )


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def predict_images(
    ckpt_path: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    top_k: int = 5,
    batch_size: int = 64,
    student: int | None = None,
    ensemble: bool = False,
) -> Path:
    """Classify the images of ``inputs`` (files or folders) with the checkpoint's inference network and write one CSV
    row per image to ``output`` (see the module docstring). Returns ``output``.

    Raises:
        ValueError: ``top_k < 1``, a datamodule of other than images, or no image.
        FileNotFoundError: a missing input.
        UnreadableImageError: an image that cannot be decoded (the message names it).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    checkpoint = read_checkpoint(ckpt_path)
    datamodule = checkpoint_datamodule(checkpoint, ckpt_path)
    transform = image_transform(datamodule)
    files = image_files(inputs)
    module = load_for_inference(ckpt_path, checkpoint)
    network, _ = inference_network(module, student, ensemble)
    names = class_names(datamodule)
    k = min(top_k, module.num_classes)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "prediction", *[f"top{i}_{kind}" for i in range(1, k + 1) for kind in COLUMN_KINDS]])
        for chunk in _batches(files, batch_size):
            with torch.no_grad():
                probs = network(torch.stack([transform(load_rgb(path)) for path in chunk])).float().softmax(dim=-1)
            values, indices = probs.topk(k, dim=-1)
            for path, top_p, top_i in zip(chunk, values.tolist(), indices.tolist(), strict=True):
                labels = [names[i] if names is not None else str(i) for i in top_i]
                pairs = zip(labels, (f"{p:.6f}" for p in top_p), strict=True)
                writer.writerow([str(path), labels[0], *(item for pair in pairs for item in pair)])
    return output


def build_parser() -> argparse.ArgumentParser:
    """The ``kd-lightning predict`` options."""
    parser = argparse.ArgumentParser(
        prog="kd-lightning predict",
        description="Classify image files with a checkpoint's inference network (the network `kd-lightning export` "
        "writes) and the evaluation transform of its datamodule; one CSV row per image: path, prediction, top-k "
        "classes and probabilities. With --config, `kd-lightning predict` is LightningCLI's predict loop instead.",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="the checkpoint, e.g. RUN/checkpoints/last.ckpt")
    parser.add_argument("--images", nargs="+", type=Path, required=True, help="image files and/or folders of images")
    parser.add_argument("--output", type=Path, required=True, help="the CSV file to write")
    parser.add_argument("--top_k", type=int, default=5, help="classes and probabilities per row (default: 5)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--student", type=int, help="a group method's student (default: its inference one)")
    parser.add_argument("--ensemble", action="store_true", help="predict with the ensemble (groups, generations)")
    return parser


def main(argv: Sequence[str]) -> int:
    """``kd-lightning predict`` on image files: returns the exit status."""
    options: Any = build_parser().parse_args(list(argv))
    written = predict_images(
        options.ckpt_path,
        options.images,
        options.output,
        options.top_k,
        options.batch_size,
        options.student,
        options.ensemble,
    )
    print(f"written: {written}")
    return 0
