"""Image transforms of official BLIP (docs/architecture.md, "Image preprocessing"), on PIL +
torch only (no torchvision / timm).

Randomness comes from a ``torch.Generator`` when one is given, else from torch's global RNG,
which ``DataLoader`` seeds differently in every worker. (Official BLIP's RandomAugment draws from
numpy's global RNG, which forked workers share, so their augmentations repeat across workers.)
A seeded generator passed to a transform used in several workers is copied into each of them and
repeats the same way: seed per worker (``worker_init_fn``) if that matters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "MEAN",
    "STD",
    "RandomAugment",
    "RandomResizedCrop",
    "TestTransform",
    "TrainTransform",
    "normalize",
    "test_transform",
    "to_tensor",
    "train_transform",
]

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's statistics, used by BLIP
STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 1], as torchvision's ``ToTensor``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x: (3, H, W) -> (x - MEAN) / STD per channel (subtract, then divide, as torchvision)."""
    mean = torch.tensor(MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def _uniform(lo: float, hi: float, gen: torch.Generator | None) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=gen).item()


def _randint(lo: int, hi: int, gen: torch.Generator | None) -> int:
    """Uniform in [lo, hi) (``hi`` exclusive)."""
    return int(torch.randint(lo, hi, (1,), generator=gen).item())


def _rand(gen: torch.Generator | None) -> float:
    return torch.rand(1, generator=gen).item()


class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` for PIL images: up to 10 draws of (area fraction in
    ``scale``, log-uniform aspect ratio in ``ratio``) for a crop that fits, else a centre crop
    clamped to ``ratio``; the crop is then resized to (size, size) with bicubic filtering."""

    def __init__(self, size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def get_params(
        self, img: Image.Image, gen: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop."""
        width, height = img.size
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], gen)
            aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], gen))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(0, height - h + 1, gen), _randint(0, width - w + 1, gen), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> Image.Image:
        top, left, h, w = self.get_params(img, gen)
        # crop first, then resize: resize(box=...) would filter with pixels outside the crop
        return img.crop((left, top, left + w, top + h)).resize(
            (self.size, self.size), Image.BICUBIC
        )


# Official BLIP's RandomAugment constants: levels are out of 10, translation is in pixels,
# and geometric ops fill with grey.
_MAX_LEVEL = 10
_TRANSLATE_PX = 10
_FILL = (128, 128, 128)
BLIP_AUGS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def _affine(img: Image.Image, coeffs) -> Image.Image:
    """coeffs (a, b, c, d, e, f) map an output pixel (x, y) to input (ax + by + c, dx + ey + f)."""
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_FILL)


class RandomAugment:
    """Official BLIP's ``RandomAugment(N, M, isPIL=True, augs=...)`` on PIL ops.

    Draws ``n_ops`` ops with replacement, and applies each with probability 0.5 at level
    ``magnitude``: enhance factor 0.1 + 1.8 * M / 10 (1.0 at BLIP's M = 5, so Brightness and
    Sharpness leave the image unchanged there, as in the official code), shear 0.3 * M / 10,
    translation 10 * M / 10 pixels and rotation 30 * M / 10 degrees, each with a random sign.
    Official BLIP runs these on numpy with OpenCV; the PIL versions differ from it only in
    interpolation rounding and at the border pixels.
    """

    def __init__(self, n_ops: int = 2, magnitude: float = 5, augs=BLIP_AUGS):
        unknown = set(augs) - set(BLIP_AUGS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {BLIP_AUGS}")
        self.n_ops, self.magnitude, self.augs = n_ops, magnitude, tuple(augs)

    def _signed(self, value: float, gen: torch.Generator | None) -> float:
        return -value if _rand(gen) < 0.5 else value

    def apply(self, name: str, img: Image.Image, gen: torch.Generator | None = None) -> Image.Image:
        """Apply one op at ``self.magnitude`` (sign drawn from ``gen`` for geometric ops)."""
        level = self.magnitude / _MAX_LEVEL
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)
        if name == "Equalize":
            return ImageOps.equalize(img)
        if name == "Brightness":
            return ImageEnhance.Brightness(img).enhance(0.1 + 1.8 * level)
        if name == "Sharpness":
            return ImageEnhance.Sharpness(img).enhance(0.1 + 1.8 * level)
        if name == "Rotate":
            return img.rotate(
                self._signed(30 * level, gen), resample=Image.BILINEAR, fillcolor=_FILL
            )
        if name in ("ShearX", "ShearY"):
            s = self._signed(0.3 * level, gen)
            return _affine(img, (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0))
        t = self._signed(_TRANSLATE_PX * level, gen)  # TranslateX / TranslateY
        return _affine(img, (1, 0, t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, t))

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> Image.Image:
        picks = torch.randint(len(self.augs), (self.n_ops,), generator=gen).tolist()
        for i in picks:
            if _rand(gen) < 0.5:
                img = self.apply(self.augs[i], img, gen)
        return img


class TestTransform:
    """Resize to (S, S) bicubic -> tensor -> normalise. Returns float32 (3, S, S)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        return normalize(to_tensor(img))


class TrainTransform:
    """RandomResizedCrop(S, scale=(min_scale, 1)) -> horizontal flip (p 0.5) -> RandomAugment(2, 5)
    -> tensor -> normalise, as official BLIP's training transform. Returns float32 (3, S, S)."""

    def __init__(
        self, image_size: int, min_scale: float = 0.5, generator: torch.Generator | None = None
    ):
        self.crop = RandomResizedCrop(image_size, scale=(min_scale, 1.0))
        self.augment = RandomAugment(2, 5)
        self.generator = generator

    def __call__(self, img: Image.Image) -> torch.Tensor:
        gen = self.generator
        img = self.crop(img.convert("RGB"), gen)
        if _rand(gen) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(self.augment(img, gen)))


def test_transform(image_size: int) -> TestTransform:
    """Evaluation transform of official BLIP."""
    return TestTransform(image_size)


# pytest would otherwise collect these as tests wherever they are imported into a test module
test_transform.__test__ = TestTransform.__test__ = False


def train_transform(
    image_size: int, min_scale: float = 0.5, generator: torch.Generator | None = None
) -> TrainTransform:
    """Training transform of official BLIP; ``generator`` makes it reproducible."""
    return TrainTransform(image_size, min_scale, generator)
