"""Fast CPU data loading: uint8 images out of the workers, normalised once per batch.

The workers decode (``load_image``: libjpeg-turbo through simplejpeg when installed), resize with
PIL's bicubic filter (the official transform's pixels) and hand over uint8 (3, S, S) tensors:
a quarter of float32's bytes through shared memory. ``collate`` stacks them and normalises the
whole batch in one op, bit-identical to ``transforms.test_transform``'s per-image float math.
The uint8 transforms here are also what the DALI loader (``blip_fast.data.dali``) reproduces on
the GPU: ``make_loader`` picks DALI when a GPU is there and DALI imports.

Train transform: RandomResizedCrop(S, scale (min_scale, 1), bicubic) + horizontal flip, without
official BLIP's RandAugment (DALI has no equivalent; ``transforms.train_transform`` keeps it for
runs that want the official augmentation on the CPU).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from blip_fast.data.datasets import CorruptImage
from blip_fast.data.transforms import MEAN, STD, RandomResizedCrop

__all__ = [
    "SkipCorrupt",
    "Uint8TestTransform",
    "Uint8TrainTransform",
    "collate",
    "make_loader",
    "normalize_uint8",
    "read_corrupt_report",
    "record_corrupt",
]

log = logging.getLogger("blip_fast.data")


def _to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class Uint8TestTransform:
    """Resize to (S, S) bicubic -> uint8 (3, S, S); ``collate`` normalises."""

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


def collate(batch: list[tuple]) -> tuple:
    """Items (image, *fields) -> (images (B, 3, S, S) float32, *fields): uint8 images are
    normalised here, float ones stacked as they are; fields by ``default_collate`` (str -> list,
    int -> tensor)."""
    images = torch.stack([item[0] for item in batch])
    if images.dtype == torch.uint8:
        images = normalize_uint8(images)
    return (images, *default_collate([item[1:] for item in batch]))


class SkipCorrupt:
    """Collate that drops ``CorruptImage`` items, appends one line per dropped item to the
    ``report`` file (``index<TAB>path<TAB>error``), and collates the rest with ``collate_fn``.

    Runs inside DataLoader workers, so it records to a file rather than to memory: each batch's
    lines are one small ``O_APPEND`` write, which workers and ranks can share without
    interleaving. A batch with no good item collates to None: the caller skips it (under DDP,
    every rank must then skip the step together, or the batch size must allow the gap).
    """

    def __init__(self, report: str | os.PathLike, collate_fn=collate):
        self.report, self.collate_fn = os.fspath(report), collate_fn

    def __call__(self, batch: list):
        good = [item for item in batch if not isinstance(item, CorruptImage)]
        if len(good) < len(batch):
            record_corrupt(self.report, [c for c in batch if isinstance(c, CorruptImage)])
        return self.collate_fn(good) if good else None


def record_corrupt(report: str | os.PathLike, items: list[CorruptImage]) -> None:
    """Append ``items`` to the ``report`` file in one write (see ``SkipCorrupt``)."""
    lines = "".join(f"{c.index}\t{c.path}\t{' '.join(c.error.split())}\n" for c in items)
    with open(report, "a", encoding="utf-8") as f:
        f.write(lines)
    log.warning("skipped %d corrupt image(s); listed in %s", len(items), os.fspath(report))


def read_corrupt_report(report: str | os.PathLike) -> list[dict]:
    """The entries ``SkipCorrupt`` recorded, in the order written ([] when there is no file)."""
    try:
        with open(report, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t", 2) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [{"index": int(i), "path": p, "error": e} for i, p, e in rows]


def _dali_usable(dataset, collate_fn) -> bool:
    from blip_fast.data import dali

    return (
        torch.cuda.is_available()
        and dali.available()
        and isinstance(
            getattr(dataset, "transform", None), (Uint8TestTransform, Uint8TrainTransform)
        )
        and (collate_fn is None or isinstance(collate_fn, SkipCorrupt))
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    num_workers: int = 4,
    drop_last: bool = False,
    collate_fn=None,
    pin_memory: bool | None = None,
    backend: str = "auto",
    prefetch_factor: int | None = None,
):
    """The loader training and CapFilt use: (images float32 (B, 3, S, S), *fields) per batch.

    backend: ``cpu`` (a DataLoader with ``num_workers`` processes; pinned memory when CUDA is
    there unless ``pin_memory`` says otherwise), ``dali`` (GPU decode, ``DaliLoader``; the
    dataset's transform must be a ``Uint8TestTransform`` / ``Uint8TrainTransform``) or ``auto``:
    DALI where it can run (a GPU, DALI imports, a uint8 transform, ``collate_fn`` None or
    ``SkipCorrupt``, whose report DALI writes too), else the CPU loader.
    ``sampler`` (e.g. a DistributedSampler) decides the order and each rank's share for both.
    """
    if backend not in ("auto", "cpu", "dali"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'dali', not {backend!r}")
    if backend == "dali" or (backend == "auto" and _dali_usable(dataset, collate_fn)):
        from blip_fast.data.dali import DaliLoader

        log.info("data: DALI loader (GPU decode)")
        report = collate_fn.report if isinstance(collate_fn, SkipCorrupt) else None
        return DaliLoader(
            dataset,
            batch_size,
            sampler=sampler,
            shuffle=shuffle,
            drop_last=drop_last,
            num_threads=max(num_workers, 1),
            corrupt_report=report,
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        shuffle=shuffle and sampler is None,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn or collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor,
    )
