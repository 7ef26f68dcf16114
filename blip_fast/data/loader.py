"""Fast CPU data loading: uint8 images out of the workers, normalised once per batch.

The workers decode (``load_image``: libjpeg-turbo through simplejpeg when installed) and apply
a uint8 transform (``blip_fast.data.uint8_transforms``); ``collate`` stacks the batch and
normalises it in one op, bit-identical to ``transforms.test_transform``'s per-image float math.
``make_loader`` picks the DALI loader (``blip_fast.data.dali``: the same transforms, decoded on
the GPU) when a GPU is there and DALI imports.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from blip_fast.data.corrupt_report import record_corrupt
from blip_fast.data.datasets import CorruptImage
from blip_fast.data.uint8_transforms import Uint8TestTransform, Uint8TrainTransform, normalize_uint8

__all__ = ["SkipCorrupt", "collate", "make_loader"]

log = logging.getLogger("blip_fast.data")


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
    ``report`` file (``blip_fast.data.corrupt_report``), and collates the rest with
    ``collate_fn``.

    A batch with no good item collates to None: the caller skips it (under DDP, every rank must
    then skip the step together, or the batch size must allow the gap).
    """

    def __init__(self, report: str | os.PathLike, collate_fn=collate):
        self.report, self.collate_fn = os.fspath(report), collate_fn

    def __call__(self, batch: list):
        good = [item for item in batch if not isinstance(item, CorruptImage)]
        if len(good) < len(batch):
            record_corrupt(self.report, [c for c in batch if isinstance(c, CorruptImage)])
        return self.collate_fn(good) if good else None


def _dali():
    """``blip_fast.data.dali``, imported when DALI is asked for or a GPU is there: importing it
    imports nvidia.dali when installed (~0.16 s on the 2-core CPU VM), which CPU runs skip."""
    from blip_fast.data import dali

    return dali


def _dali_usable(dataset, collate_fn) -> bool:
    return (
        torch.cuda.is_available()
        and _dali().available()
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
        log.info("data: DALI loader (GPU decode)")
        report = collate_fn.report if isinstance(collate_fn, SkipCorrupt) else None
        return _dali().DaliLoader(
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
