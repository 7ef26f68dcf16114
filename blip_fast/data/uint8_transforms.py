"""The uint8 image transforms both loaders share: the CPU ``DataLoader`` runs them in its
workers (``blip_fast.data.loader``), the DALI loader reproduces them as DALI operators
(``blip_fast.data.dali``) and reads them for the image size and crop scale.

Workers resize with PIL's bicubic filter (the official transform's pixels) and hand over uint8
(3, S, S) tensors, a quarter of float32's bytes through shared memory; ``normalize_uint8``
turns a whole batch into the official float values in one op.

Train transform: RandomResizedCrop(S, scale (min_scale, 1), bicubic) + horizontal flip, without
official BLIP's RandAugment (DALI has no equivalent; ``transforms.train_transform`` keeps it for
runs that want the official augmentation on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from blip_fast.data.transforms import MEAN, STD, RandomResizedCrop

__all__ = ["Uint8TestTransform", "Uint8TrainTransform", "normalize_uint8"]


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class Uint8TestTransform:
    """Resize to (S, S) bicubic -> uint8 (3, S, S); ``normalize_uint8`` finishes the batch."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return _to_uint8_chw(img.resize((self.image_size, self.image_size), Image.BICUBIC))


class Uint8TrainTransform:
    """RandomResizedCrop(S, scale=(min_scale, 1), bicubic) -> flip (p 0.5) -> uint8 (3, S, S).
    Draws from ``generator`` or, when None, torch's global RNG (seeded per DataLoader worker)."""

    def __init__(
        self, image_size: int, min_scale: float = 0.5, generator: torch.Generator | None = None
    ):
        self.image_size, self.min_scale, self.generator = image_size, min_scale, generator
        self.crop = RandomResizedCrop(image_size, scale=(min_scale, 1.0))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.crop(img, self.generator)
        if torch.rand(1, generator=self.generator).item() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_uint8_chw(img)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """images: uint8 (B, 3, S, S) -> float32 (x / 255 - MEAN) / STD, the same float ops in the
    same order as ``transforms.normalize(to_tensor(img))``, so the same bits."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div(255) - mean) / std
