"""Augmentations replayed from recorded parameters, and the datasets and sampler of a teacher store's views.

A teacher store (:mod:`kd_lightning.teacher_store`) keeps, for every training sample, ``R`` draws of the datamodule's
random augmentation as parameters (crop box, flip), so the student sees exactly the view the teacher saw. A
:class:`RecordedAugmentation` draws such parameters (:meth:`~RecordedAugmentation.draw`) and makes the view from them
(:meth:`~RecordedAugmentation.replay`); the two recipes of :mod:`kd_lightning.data.transforms`:

* :class:`PadCropFlip`: the CIFAR recipe (zero padding, a random crop of the image size, a flip), per sample or, with
  :meth:`~PadCropFlip.replay_batch`, on the device (the ``augment_on_device`` path: the same pixels);
* :class:`ResizedCropFlip`: ``RandomResizedCrop`` + flip of the image-folder datamodules (torchvision's draw, with
  a generator);
* :class:`Unaugmented`: no random augmentation (nothing to record).

The datasets and the sampler that serve a store's views are in :mod:`kd_lightning.data.store_views`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from kd_lightning.data.transforms import _to_normalised_tensor, crop_and_flip

__all__ = ["PadCropFlip", "RecordedAugmentation", "ResizedCropFlip", "Unaugmented", "sample_generator"]


def sample_generator(*seeds: int) -> torch.Generator:
    """A generator seeded from several integers (e.g. a seed and a sample index), independent streams for each."""
    state = np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class RecordedAugmentation:
    """A random augmentation whose draws are recorded as ``num_params`` integers and replayed from them.

    A subclass gives :meth:`draw`, :meth:`replay` and :meth:`describe` (what a store records to refuse another
    augmentation). This base is the identity: nothing is drawn.
    """

    #: Integers per draw.
    num_params: int = 0

    def draw(self, image: Any, count: int, generator: torch.Generator) -> Tensor:
        """``(count, num_params)`` int32 parameters of ``count`` independent draws for ``image``."""
        return torch.zeros(count, self.num_params, dtype=torch.int32)

    def replay(self, image: Any, params: Tensor) -> Any:
        """The view of ``image`` that the ``(num_params,)`` parameters describe."""
        return image

    def describe(self) -> dict[str, Any]:
        """The augmentation's kind and settings."""
        return {"kind": "none"}


class Unaugmented(RecordedAugmentation):
    """No random augmentation: the raw sample is the view (one draw is all a store needs)."""


class _Normalise:
    """Scaling of ``uint8`` pixels to [0, 1] and per-channel normalisation, as :class:`BatchAugment` does it."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - self._mean.to(x.device)) / self._std.to(x.device)


class PadCropFlip(RecordedAugmentation):
    """The CIFAR recipe (:func:`~kd_lightning.data.transforms.train_transform`, :class:`BatchAugment`) replayed.

    Parameters: ``(top, left, flip)``, the crop's offsets in ``[0, 2 * padding]`` of the zero-padded image and the
    flip (0 or 1), drawn as ``RandomCrop(size, padding)`` and ``RandomHorizontalFlip`` draw them.

    Args:
        size: the image side (the crop is the image size).
        padding: zero padding on each side.
        flip: horizontal flips with probability 1/2.
        mean: per-channel mean of the [0, 1]-scaled images.
        std: per-channel standard deviation.
    """

    num_params = 3

    def __init__(self, size: int, padding: int, flip: bool, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.padding, self.flip = size, padding, flip
        self.normalise = _Normalise(mean, std)

    def draw(self, image: Any, count: int, generator: torch.Generator) -> Tensor:
        offsets = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator)
        flips = (torch.rand(count, 1, generator=generator) < 0.5).long() * int(self.flip)
        return torch.cat([offsets, flips], dim=1).int()

    def replay(self, image: Any, params: Tensor) -> Tensor:
        """The normalised float32 ``(C, H, W)`` view of a PIL image or ``uint8`` tensor (slices of the padded image:
        the pixels of :meth:`replay_batch`)."""
        pixels = v2.functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image
        top, left, flip = params.tolist()
        height, width = pixels.shape[-2:]
        padded = torch.nn.functional.pad(pixels, (self.padding,) * 4) if self.padding else pixels
        view = padded[:, top : top + height, left : left + width]
        return self.normalise((view.flip(-1) if flip else view)[None])[0]

    def replay_batch(self, x: Tensor, params: Tensor) -> Tensor:
        """The normalised float32 views of a ``uint8`` ``(B, C, H, W)`` batch with ``(B, 3)`` parameters (on the
        batch's device, one gather; pixel for pixel :meth:`replay`'s)."""
        params = params.to(x.device).long()
        views = crop_and_flip(x, self.padding, params[:, 0], params[:, 1], params[:, 2].bool())
        return self.normalise(views)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "pad_crop_flip",
            "size": self.size,
            "padding": self.padding,
            "flip": self.flip,
            "mean": list(self.normalise.mean),
            "std": list(self.normalise.std),
        }


class ResizedCropFlip(RecordedAugmentation):
    """``RandomResizedCrop(crop_size)`` + ``RandomHorizontalFlip`` + normalisation of a PIL image, replayed.

    Parameters: ``(top, left, height, width, flip)``, the crop box in the image's pixels (torchvision's draw: up to
    10 tries of a random area and aspect ratio, else the central crop) and the flip.

    Args:
        crop_size: side of the square output.
        mean: per-channel mean of the [0, 1]-scaled images.
        std: per-channel standard deviation.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
    """

    num_params = 5

    def __init__(
        self,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.crop_size, self.scale, self.ratio = crop_size, tuple(scale), tuple(ratio)
        self.mean, self.std = tuple(mean), tuple(std)
        self.to_tensor = v2.Compose(_to_normalised_tensor(mean, std))

    def draw(self, image: Any, count: int, generator: torch.Generator) -> Tensor:
        height, width = v2.functional.get_size(image)
        boxes = [self._box(height, width, generator) for _ in range(count)]
        flips = (torch.rand(count, generator=generator) < 0.5).tolist()
        return torch.tensor([[*box, int(flip)] for box, flip in zip(boxes, flips, strict=True)], dtype=torch.int32)

    def _box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's ``RandomResizedCrop.make_params``, drawing from ``generator``."""
        area, log_ratio = height * width, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                return top, int(torch.randint(0, width - w + 1, (1,), generator=generator)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def replay(self, image: Any, params: Tensor) -> Tensor:
        top, left, height, width, flip = params.tolist()
        size = [self.crop_size, self.crop_size]
        view = v2.functional.resized_crop(image, top, left, height, width, size, antialias=True)
        return self.to_tensor(v2.functional.horizontal_flip(view) if flip else view)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "resized_crop_flip",
            "crop_size": self.crop_size,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "mean": list(self.mean),
            "std": list(self.std),
        }
