"""Tiny image datasets written in their real on-disk layouts, for the image-file datamodule tests.

Every image of class ``c`` has the colour :func:`class_color` (``c``) plus a small ramp, so a test can tell an image's
class from its pixels after any crop, resize or flip (:func:`labels_from_pixels`). Images are small JPEGs of varying
sizes (about a kilobyte each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch import Tensor

from kd_lightning.data import ImageFolderDataModule
from kd_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZES = ((48, 40), (40, 56), (64, 48))  # (width, height), cycled
#: Classes of the ``image_folder`` fixture (tests/conftest.py).
ANIMALS = ["cat", "dog", "fox"]
#: Classes of :func:`write_imagenet` (ImageNet wnids).
WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root: Path, train_per_class: int = 6, val_per_class: int = 2) -> Path:
    """``root/train/<wnid>/`` and ``root/val/<wnid>/`` with images of the :data:`WNIDS`, as ImageNet after
    valprep.sh."""
    write_class_folders(root / "train", WNIDS, train_per_class)
    write_class_folders(root / "val", WNIDS, val_per_class)
    return root


def folder_datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    """An :class:`ImageFolderDataModule` of ``root`` with 32-pixel crops, batches of 4 and no workers."""
    return ImageFolderDataModule(**{"root": str(root), "crop_size": 32, "batch_size": 4, "num_workers": 0, **kwargs})


def all_batches(loader) -> tuple[Tensor, Tensor]:
    """All the ``(x, y)`` batches of ``loader``, concatenated."""
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def class_color(label: int) -> tuple[int, int, int]:
    """The RGB colour of every image of class ``label`` (distinct for labels 0..20, far from each other)."""
    return (40 + 60 * (label % 4), 40 + 60 * ((label // 4) % 4), 40 + 60 * ((label // 16) % 4))


def write_image(path: Path, label: int, index: int = 0, fmt: str = "JPEG") -> Path:
    """Write an image of class ``label`` at ``path`` (parents created): its colour plus a left-to-right ramp of
    -10..+10 (so crops and flips differ, while any crop's mean stays within 18 of the class colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = SIZES[index % len(SIZES)]
    ramp = np.linspace(-10, 10, width).round().astype(np.int16)
    pixels = np.array(class_color(label), dtype=np.int16)[None, None, :] + ramp[None, :, None]
    Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8)).save(path, fmt)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: PIL opens its header but fails to decode it."""
    write_image(path, 0, index=2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def labels_from_pixels(x: Tensor) -> Tensor:
    """``(B,)`` class of each normalised image of a batch ``(B, 3, H, W)``, read back from its colour."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean(dim=(2, 3))  # (B, 3)
    palette = torch.tensor([class_color(c) for c in range(64)], dtype=torch.float32)
    return torch.cdist(rgb, palette).argmin(dim=1)


def write_class_folders(root: Path, classes: list[str], per_class: int, start: int = 0) -> None:
    """``root/<class>/img_<k>.jpg``, ``per_class`` images per class, class ``i`` coloured as label ``i``."""
    for label, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / name / f"img_{start + k:03d}.jpg", label, k)


def write_flowers102(root: Path, labels_per_split: dict[str, list[int]]) -> dict[str, list[int]]:
    """``root/flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}``, as torchvision's Flowers102 reads them.

    ``labels_per_split``: the 0-based labels of the images of ``train``, ``val`` and ``test`` (at least 2 each, as
    ``loadmat(squeeze_me=True)`` turns 1-element arrays into scalars). Image ids are 1-based, in split order.
    """
    base = root / "flowers-102"
    ids: dict[str, list[int]] = {}
    all_labels: list[int] = []
    for split in ("train", "val", "test"):
        ids[split] = []
        for label in labels_per_split[split]:
            all_labels.append(label)
            image_id = len(all_labels)
            ids[split].append(image_id)
            write_image(base / "jpg" / f"image_{image_id:05d}.jpg", label, image_id)
    # integer arrays, 1-based, as in the real files (torchvision formats the ids with :05d)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(all_labels, dtype=np.uint8) + 1})
    setid = {
        key: np.array(ids[split], dtype=np.uint16)
        for key, split in (("trnid", "train"), ("valid", "val"), ("tstid", "test"))
    }
    scipy.io.savemat(base / "setid.mat", setid)
    return ids


#: A small FGVC-Aircraft hierarchy: variant -> (family, manufacturer).
AIRCRAFT = {
    "707-320": ("Boeing 707", "Boeing"),
    "727-200": ("Boeing 727", "Boeing"),
    "A300B4": ("A300", "Airbus"),
    "Cessna 172": ("Cessna 172", "Cessna"),
}


def write_fgvc_aircraft(root: Path, per_split: dict[str, int]) -> dict[str, list[str]]:
    """``root/fgvc-aircraft-2013b/data/``: ``images/<id>.jpg``, ``variants.txt`` / ``families.txt`` /
    ``manufacturers.txt`` and ``images_<level>_<split>.txt`` (``"<id> <name>"``) for train, val, trainval, test.

    ``per_split[split]`` images per variant in ``train``, ``val`` and ``test``; ``trainval`` is train + val.
    Returns the variant of each image of each split.
    """
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = list(AIRCRAFT)
    families = sorted({f for f, _ in AIRCRAFT.values()})
    makers = sorted({m for _, m in AIRCRAFT.values()})
    data.mkdir(parents=True)
    for name, values in (("variants", variants), ("families", families), ("manufacturers", makers)):
        (data / f"{name}.txt").write_text("".join(f"{v}\n" for v in values))
    image_id = 1000000
    rows: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "val", "test"):
        rows[split] = []
        for k in range(per_split[split]):
            for label, variant in enumerate(variants):
                image_id += 1
                write_image(data / "images" / f"{image_id}.jpg", label, k)
                rows[split].append((str(image_id), variant))
    rows["trainval"] = rows["train"] + rows["val"]
    for split, split_rows in rows.items():
        for level, column in (("variant", None), ("family", 0), ("manufacturer", 1)):
            lines = [f"{i} {v if column is None else AIRCRAFT[v][column]}\n" for i, v in split_rows]
            (data / f"images_{level}_{split}.txt").write_text("".join(lines))
    return {split: [v for _, v in split_rows] for split, split_rows in rows.items()}


DTD_CLASSES = ["banded", "dotted", "zigzagged"]


def write_dtd(root: Path, per_split: dict[str, int], partition: int = 1) -> None:
    """``root/dtd/dtd/images/<class>/<class>_<k>.jpg`` and ``root/dtd/dtd/labels/{train,val,test}<p>.txt``
    (``"<class>/<file>"`` lines), as the archive dtd-r1.0.1.tar.gz unpacks into ``root/dtd``."""
    data = root / "dtd" / "dtd"
    k = 0
    for split in ("train", "val", "test"):
        lines = []
        for label, name in enumerate(DTD_CLASSES):
            for _ in range(per_split[split]):
                k += 1
                write_image(data / "images" / name / f"{name}_{k:04d}.jpg", label, k)
                lines.append(f"{name}/{name}_{k:04d}.jpg\n")
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}{partition}.txt").write_text("".join(lines))


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_cub(root: Path, train_per_class: int, test_per_class: int) -> None:
    """``root/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/...}``,
    the released layout (1-based image and class ids, ``"<id> <value>"`` lines)."""
    base = root / "CUB_200_2011"
    images, labels, split = [], [], []
    image_id = 0
    for label, name in enumerate(CUB_CLASSES):
        for k in range(train_per_class + test_per_class):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}_{image_id}.jpg"
            write_image(base / "images" / rel, label, k)
            images.append(f"{image_id} {rel}\n")
            labels.append(f"{image_id} {label + 1}\n")
            split.append(f"{image_id} {int(k < train_per_class)}\n")
    (base / "images.txt").write_text("".join(images))
    (base / "image_class_labels.txt").write_text("".join(labels))
    (base / "train_test_split.txt").write_text("".join(split))
    (base / "classes.txt").write_text("".join(f"{i + 1} {name}\n" for i, name in enumerate(CUB_CLASSES)))
