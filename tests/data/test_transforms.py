import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from kd_lightning.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    BatchAugment,
    TwoViews,
    cifar_eval_transform,
    cifar_stats,
    cifar_train_transform,
    eval_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
    train_transform,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_batch(b: int = 16, c: int = 3, h: int = 32, w: int = 32, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def test_two_views_calls_the_transform_twice_independently():
    views = TwoViews(lambda x: x + torch.randn(()))
    a, b = views(torch.zeros(3))
    assert a.shape == b.shape == (3,)
    assert not torch.equal(a, b)
    assert "TwoViews(" in repr(views)


def test_cifar_train_transform_on_pil_and_tensor():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transform = cifar_train_transform("cifar100")
    for sample in (Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1)):
        out = transform(sample)
        assert type(out) is torch.Tensor
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    kinds = [type(t) for t in transform.transforms]
    assert v2.RandomCrop in kinds and v2.RandomHorizontalFlip in kinds


def test_eval_transform_normalises_exactly():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))
    out = cifar_eval_transform("cifar10")(img)
    torch.testing.assert_close(out, normalise(img[None], CIFAR10_MEAN, CIFAR10_STD)[0])


def test_train_transform_without_flip_or_padding_is_the_eval_transform():
    transform = train_transform((0.5,), (0.25,), padding=0, flip=False)
    img = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(transform(img), eval_transform((0.5,), (0.25,))(img))


def test_cifar_stats():
    assert cifar_stats("cifar100")[0] == CIFAR100_MEAN
    with pytest.raises(ValueError, match="Unknown CIFAR dataset 'svhn'"):
        cifar_stats("svhn")  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_augment_eval_mode_only_normalises(device):
    x = random_batch(device=device)
    augment = BatchAugment(CIFAR10_MEAN, CIFAR10_STD).eval()
    out = augment(x)
    assert out.device == x.device and out.dtype == torch.float32
    torch.testing.assert_close(out, normalise(x, CIFAR10_MEAN, CIFAR10_STD))


def all_crops(img: torch.Tensor, padding: int, flip: bool) -> list[torch.Tensor]:
    """Every output a (pad, crop, flip) augmentation can give for one (C, H, W) image."""
    h, w = img.shape[1:]
    padded = torch.nn.functional.pad(img, (padding,) * 4)
    sources = [padded, padded.flip(2)] if flip else [padded]
    return [s[:, i : i + h, j : j + w] for s in sources for i in range(2 * padding + 1) for j in range(2 * padding + 1)]


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_batch_augment_is_a_per_sample_crop_and_flip_of_the_padded_image(flip, device):
    torch.manual_seed(0)
    x = random_batch(b=32, h=12, w=10, device=device)
    augment = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, padding=2, flip=flip)
    out = augment(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    # Undo the normalisation; zero padding normalises to -mean/std, i.e. back to 0.
    std = torch.tensor(CIFAR10_STD, device=device).view(1, -1, 1, 1)
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, -1, 1, 1)
    pixels = ((out * std + mean) * 255).round().to(torch.uint8)
    matches = []
    for img, got in zip(x, pixels, strict=True):
        candidates = all_crops(img, 2, flip)
        found = [k for k, c in enumerate(candidates) if torch.equal(c, got)]
        assert found, "output is not a crop of the padded image"
        matches.append(found[0])
    assert len(set(matches)) > 5  # per-sample offsets, not one offset for the batch
    if flip:
        assert any(k >= 25 for k in matches) and any(k < 25 for k in matches)  # some flipped, some not


def test_batch_augment_draws_new_parameters_each_call():
    x = random_batch()
    augment = BatchAugment(CIFAR10_MEAN, CIFAR10_STD)
    assert not torch.equal(augment(x), augment(x))


def test_batch_augment_without_padding_and_flip_is_normalisation():
    x = random_batch()
    augment = BatchAugment((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), padding=0, flip=False)
    torch.testing.assert_close(augment(x), normalise(x, (0.5,) * 3, (0.2,) * 3))
    assert "padding=0, flip=False, channels=3" in repr(augment)


def test_batch_augment_errors():
    augment = BatchAugment(CIFAR10_MEAN, CIFAR10_STD)
    with pytest.raises(ValueError, match=r"expects a uint8 batch \(B, C, H, W\), got torch.float32"):
        augment(torch.zeros(2, 3, 32, 32))
    with pytest.raises(
        ValueError, match=r"expects a uint8 batch \(B, C, H, W\), got torch.uint8 of shape \(3, 32, 32\)"
    ):
        augment(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="built for 3 channels, got 1"):
        augment(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        BatchAugment(CIFAR10_MEAN, CIFAR10_STD, padding=-1)
    with pytest.raises(ValueError, match="one value per channel, got 3 and 1"):
        BatchAugment(CIFAR10_MEAN, (0.2,))


def test_transforms_are_the_imagenet_ones():
    train = [type(t) for t in imagenet_train_transform().transforms]
    assert train[:2] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    resize, crop = imagenet_eval_transform().transforms[:2]
    assert (resize.size, crop.size) == ([256], (224, 224))  # shorter side 256, central 224 crop
    resize, crop = imagenet_eval_transform(32).transforms[:2]
    assert (resize.size, crop.size) == ([37], (32, 32))  # the 256/224 ratio kept for small crops
    caffe = imagenet_train_transform(224, augmentation="caffe").transforms
    assert (caffe[0].size, type(caffe[1]), caffe[1].size) == ([256, 256], v2.RandomCrop, (224, 224))
    assert imagenet_eval_transform(224, augmentation="caffe").transforms[0].size == [256, 256]
