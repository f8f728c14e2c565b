"""Image transforms: per-sample augmentations, the two-view wrapper and batch-level (on-device) augmentation.

Two recipes. The CIFAR one, "pad, random crop, (random horizontal flip), scale to [0, 1], normalise" (He et al.
2016, zero padding), can run two ways:

* per sample on the CPU, in the DataLoader workers: :func:`train_transform` / :func:`eval_transform` (torchvision
  ``transforms.v2``; they accept PIL images and ``uint8`` ``(C, H, W)`` tensors alike);
* per batch on the accelerator: :class:`BatchAugment`, applied by the datamodules with ``augment_on_device=True``
  in ``on_after_batch_transfer`` to the ``uint8`` batches their loaders yield.

The ImageNet one, per sample on PIL images, that of the PyTorch ImageNet example the papers follow (DUPS Sec. 4.2:
"the same way as the Pytorch official examples"):

* training, ``augmentation="inception"`` (default): ``RandomResizedCrop(crop_size)`` (scale 0.08-1, aspect 3/4-4/3)
  and a horizontal flip; ``augmentation="caffe"``: the image squashed to ``resize_size x resize_size``, a random
  ``crop_size`` crop and a flip (the Caffe ImageNet preprocessing of Xu & Liu's self-distillation, Sec. "Extension
  to large-scale classification task");
* evaluation: the shorter side resized to ``resize_size`` and the central ``crop_size`` crop (``"caffe"``: the
  squashed ``resize_size`` square, then the central crop);
* then scaling to [0, 1] and normalisation, by default with the ImageNet channel statistics (:data:`IMAGENET_MEAN`,
  :data:`IMAGENET_STD`).

``resize_size`` defaults to ``round(crop_size * 256 / 224)`` (256 for 224), so small crops (the tests run at 32 px)
keep the ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augmentation",
    "BatchAugment",
    "TwoViews",
    "cifar_eval_transform",
    "cifar_stats",
    "cifar_train_transform",
    "crop_and_flip",
    "eval_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "train_transform",
]

#: Per-channel mean and standard deviation of the CIFAR-10 training images in [0, 1] (computed over all pixels).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Per-channel mean and standard deviation of the CIFAR-100 training images in [0, 1].
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
#: Per-channel mean and standard deviation of the ImageNet training images in [0, 1] (torchvision's values).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The ImageNet training augmentations (see the module docstring).
Augmentation = Literal["inception", "caffe"]


class TwoViews:
    """Apply ``transform`` twice to the same image: ``img -> (transform(img), transform(img))``.

    The two calls draw their random parameters independently, so a random ``transform`` gives two different
    distortions of one image (the two views of data-distortion guided self-distillation).

    Args:
        transform: The per-sample transform to apply twice.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> tuple[Any, Any]:
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def train_transform(
    mean: Sequence[float], std: Sequence[float], size: int = 32, padding: int = 4, flip: bool = True
) -> v2.Compose:
    """Per-sample training augmentation: zero-pad by ``padding``, random ``size`` crop, optional flip, normalise.

    Args:
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
        size: Side of the square crop (the image side, to translate without resizing).
        padding: Zero padding on each side before cropping (maximum translation in pixels); 0 disables the crop.
        flip: Random horizontal flip with probability 1/2.

    Returns:
        A transform from a PIL image or a ``uint8`` ``(C, H, W)`` tensor to a normalised float32 tensor.
    """
    steps: list[nn.Module] = [v2.ToImage()]
    if padding > 0:
        steps.append(v2.RandomCrop(size, padding=padding))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Per-sample evaluation transform: scale to [0, 1] and normalise (no augmentation).

    Args:
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
    """
    return v2.Compose(_to_normalised_tensor(mean, std))


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    """A PIL image or ``uint8`` tensor to a float32 tensor scaled to [0, 1] and normalised."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def cifar_stats(dataset: Literal["cifar10", "cifar100"]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of CIFAR-10 or CIFAR-100."""
    if dataset == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if dataset == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    raise ValueError(f"Unknown CIFAR dataset {dataset!r}; expected 'cifar10' or 'cifar100'.")


def cifar_train_transform(dataset: Literal["cifar10", "cifar100"] = "cifar10") -> v2.Compose:
    """The standard CIFAR training augmentation: 4-pixel zero padding, random 32x32 crop, horizontal flip, normalise."""
    return train_transform(*cifar_stats(dataset), size=32, padding=4, flip=True)


def cifar_eval_transform(dataset: Literal["cifar10", "cifar100"] = "cifar10") -> v2.Compose:
    """The CIFAR evaluation transform: normalise only."""
    return eval_transform(*cifar_stats(dataset))


def imagenet_train_transform(
    crop_size: int = 224,
    resize_size: int | None = None,
    augmentation: Augmentation = "inception",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Per-sample ImageNet training augmentation of a PIL image (see the module docstring), to a normalised tensor.

    Args:
        crop_size: Side of the square crop the network sees.
        resize_size: Side the image is squashed to before the random crop (``"caffe"`` only); None:
            ``round(crop_size * 256 / 224)``.
        augmentation: ``"inception"`` (RandomResizedCrop + flip) or ``"caffe"`` (squash, random crop + flip).
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
    """
    if augmentation == "inception":
        geometry: list[nn.Module] = [v2.RandomResizedCrop(crop_size, antialias=True)]
    else:
        geometry = [v2.Resize((_resize(crop_size, resize_size),) * 2, antialias=True), v2.RandomCrop(crop_size)]
    return v2.Compose([*geometry, v2.RandomHorizontalFlip(), *_to_normalised_tensor(mean, std)])


def imagenet_eval_transform(
    crop_size: int = 224,
    resize_size: int | None = None,
    augmentation: Augmentation = "inception",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Per-sample ImageNet evaluation: ``Resize(resize_size)`` (shorter side; ``"caffe"``: a square) + central crop.

    Args:
        crop_size: Side of the central crop.
        resize_size: Shorter side (``"caffe"``: side of the square) before cropping; None:
            ``round(crop_size * 256 / 224)``.
        augmentation: The training augmentation this evaluation goes with (``"inception"`` or ``"caffe"``).
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
    """
    side = _resize(crop_size, resize_size)
    resize = v2.Resize(side if augmentation == "inception" else (side, side), antialias=True)
    return v2.Compose([resize, v2.CenterCrop(crop_size), *_to_normalised_tensor(mean, std)])


def _resize(crop_size: int, resize_size: int | None) -> int:
    return round(crop_size * 256 / 224) if resize_size is None else resize_size


def crop_and_flip(x: Tensor, padding: int, top: Tensor, left: Tensor, flipped: Tensor | None = None) -> Tensor:
    """The ``(B, C, H, W)`` crops of a zero-padded batch at the given offsets, mirrored where ``flipped``.

    Sample ``b`` of the result is ``pad(x[b], padding)[:, top[b] : top[b] + H, left[b] : left[b] + W]``, flipped
    horizontally where ``flipped[b]`` (None: nowhere): ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip`` with
    the given draws, as one vectorised gather (no loop over samples).

    Args:
        x: ``(B, C, H, W)`` images (any dtype).
        padding: zero padding on each side.
        top: ``(B,)`` row offsets in ``[0, 2 * padding]``.
        left: ``(B,)`` column offsets in ``[0, 2 * padding]``.
        flipped: ``(B,)`` bool, or None.
    """
    b, c, h, w = x.shape
    device = x.device
    padded = nn.functional.pad(x, (padding,) * 4) if padding > 0 else x
    # Source row/column of every output pixel: offset + position (columns reversed for flipped samples).
    rows = top.view(b, 1) + torch.arange(h, device=device)
    cols = torch.arange(w, device=device).expand(b, w)
    if flipped is not None:
        cols = torch.where(flipped.view(b, 1).bool(), cols.flip(1), cols)
    cols = cols + left.view(b, 1)
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, padded.shape[3]))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


class BatchAugment(nn.Module):
    """Batch-level augmentation on the batch's device: random crop with zero padding, random flip, normalise.

    Takes a ``uint8`` batch ``(B, C, H, W)`` on any device and returns a normalised float32 batch of the same shape.
    In training mode (``module.train()``, the default) every sample gets its own translation (offsets drawn
    uniformly in ``[0, 2 * padding]`` of the zero-padded batch, as ``RandomCrop(H, padding)``) and, when ``flip``,
    its own horizontal flip with probability 1/2; crop and flip are one vectorised gather, no loop over samples.
    In eval mode (``module.eval()``) it only converts to float and normalises. Random draws use the global RNG of
    the batch's device (``torch.randint(..., device=x.device)``).

    Args:
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
        padding: Zero padding on each side before cropping; 0 disables translation.
        flip: Random horizontal flips (off for digits, which are not mirror-symmetric).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], padding: int = 4, flip: bool = True) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}.")
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}.")
        self.padding = padding
        self.flip = flip
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` uint8 -> ``(B, C, H, W)`` float32, augmented in training mode, normalised."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(
                f"BatchAugment expects a uint8 batch (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"BatchAugment was built for {self.mean.shape[1]} channels, got {x.shape[1]}.")
        if self.training and (self.padding > 0 or self.flip):
            x = self._crop_and_flip(x)
        if self.mean.device != x.device:  # not part of the LightningModule: follow the batch once
            self.to(x.device)
        return (x.float().div_(255.0) - self.mean) / self.std

    def _crop_and_flip(self, x: Tensor) -> Tensor:
        b, device, span = len(x), x.device, 2 * self.padding + 1
        top = torch.randint(0, span, (b,), device=device)  # the draws in their earlier order: top, flip, left
        flipped = torch.rand(b, device=device) < 0.5 if self.flip else None
        return crop_and_flip(x, self.padding, top, torch.randint(0, span, (b,), device=device), flipped)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, flip={self.flip}, channels={self.mean.shape[1]}"
