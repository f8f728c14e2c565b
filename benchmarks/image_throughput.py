"""Decode + augment throughput of :class:`~kd_lightning.ImageFolderDataModule`, in images per second.

Writes (once) a folder of JPEGs of ImageNet's typical size (500x375, smooth colour fields plus noise, quality 90:
about 60-100 KB each, like ImageNet photos) and times full passes of the training loader (RandomResizedCrop 224 +
flip + normalise) and of the evaluation loader (resize 256, central 224 crop), for each number of workers. The
first batch of each loader (worker start-up) is left out of the time. The loaders' batches end on the CPU: this
measures what the data pipeline can feed a model per process, to compare with the model's own images/s.

Usage::

    python benchmarks/image_throughput.py [--folder /tmp/kd_jpegs] [--images 200] [--workers 0 2] [--passes 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kd_lightning.data import ImageFolderDataModule


def write_jpegs(folder: Path, count: int, classes: int = 4, seed: int = 0) -> None:
    """``count`` 500x375 JPEGs in ``classes`` class folders (kept when already there)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"class_{i % classes}" / f"img_{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (375, 500, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def images_per_second(loader: torch.utils.data.DataLoader, passes: int) -> float:
    """Images per second over ``passes`` passes of ``loader``, leaving out each pass's first batch."""
    images, seconds = 0, 0.0
    for _ in range(passes):
        batches = iter(loader)
        next(batches)
        start = time.perf_counter()
        for _, y in batches:
            images += len(y)
        seconds += time.perf_counter() - start
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/kd_lightning_jpegs"))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    write_jpegs(args.folder, args.images)
    sizes = [p.stat().st_size for p in args.folder.rglob("*.jpg")]
    rows = []
    for workers in args.workers:
        dm = ImageFolderDataModule(
            root=str(args.folder), test_size=args.images // 2, batch_size=args.batch_size, num_workers=workers
        )
        dm.setup()
        rows.append(
            {
                "workers": workers,
                "train_images_per_s": round(images_per_second(dm.train_dataloader(), args.passes), 1),
                "eval_images_per_s": round(images_per_second(dm.test_dataloader(), args.passes), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"images": len(sizes), "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1), "rows": rows}))


if __name__ == "__main__":
    main()
