"""NLVR² over the official BLIP annotation files (``nlvr_train.json``, ``nlvr_dev.json``,
``nlvr_test.json``): entries ``{"images": [path0, path1], "sentence": str, "label": "True" |
"False"}``, image paths relative to the image root.

The annotation is read and checked whole at construction: a bad entry raises with the file,
the entry index, the key and the value. Images are opened in ``__getitem__``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from blip_fast.data.datasets import MissingKeyError, _read_json
from blip_fast.data.images import load_image
from blip_fast.data.uint8_transforms import normalize_uint8
from blip_fast.text import pre_caption

__all__ = ["LABELS", "NLVRDataset", "collate_nlvr", "swap_left_right"]

LABELS = {"False": 0, "True": 1}  # official: index 1 of the classifier = "True"
MAX_WORDS = 40  # official ``pre_caption(sentence, 40)``


def swap_left_right(sentence: str) -> str:
    """Exchange the words ``left`` and ``right`` (whole words split on ``' '``, as official:
    ``left,`` or ``left's`` stay as they are)."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in sentence.split(" "))


def _check_entry(entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be an object, got {type(entry).__name__}")
    for key in ("images", "sentence", "label"):
        if key not in entry:
            raise MissingKeyError(f"{where} has no '{key}' key (keys: {sorted(entry)})")
    images = entry["images"]
    if not (
        isinstance(images, list) and len(images) == 2 and all(isinstance(p, str) for p in images)
    ):
        raise TypeError(f"{where}: 'images' must be a list of 2 paths, got {images!r}")
    if not isinstance(entry["sentence"], str):
        raise TypeError(f"{where}: 'sentence' must be str, got {type(entry['sentence']).__name__}")
    if not isinstance(entry["label"], str) or entry["label"] not in LABELS:
        raise ValueError(f'{where}: \'label\' must be "True" or "False", got {entry["label"]!r}')


class NLVRDataset(Dataset):
    """Official ``nlvr_dataset``: item = (image0, image1, sentence, label), label 1 = "True",
    sentence = ``pre_caption(sentence, 40)``.

    ``train=True`` applies the official augmentation: with probability 0.5 (torch's global RNG,
    seeded per ``DataLoader`` worker) the two images are swapped and the words ``left`` and
    ``right`` exchanged in the sentence. ``train=False`` never swaps: evaluation is
    deterministic here, whereas the official dataset draws the swap in every split, so its
    dev / test accuracies vary a little from run to run."""

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        train: bool = False,
    ):
        path = Path(ann_file)
        self.annotation = _read_json(path)
        if not self.annotation:
            raise ValueError(f"annotation file {path} has no entries")
        for i, entry in enumerate(self.annotation):
            _check_entry(entry, f"{path}: entry {i}")
        self.image_root, self.transform, self.train = Path(image_root), transform, train

    def __len__(self) -> int:
        return len(self.annotation)

    def entry(self, index: int, swap: bool) -> tuple[str, str, str, int]:
        """(image0 path, image1 path, sentence, label) of an entry, swapped or not."""
        ann = self.annotation[index]
        path0, path1 = (os.fspath(self.image_root / p) for p in ann["images"])
        sentence = pre_caption(ann["sentence"], MAX_WORDS)
        if swap:
            path0, path1, sentence = path1, path0, swap_left_right(sentence)
        return path0, path1, sentence, LABELS[ann["label"]]

    def __getitem__(self, index: int):
        swap = self.train and bool(torch.rand(()) < 0.5)
        path0, path1, sentence, label = self.entry(index, swap)
        return self.transform(load_image(path0)), self.transform(load_image(path1)), sentence, label


def collate_nlvr(batch: list[tuple]) -> tuple:
    """Items -> (images (2B, 3, S, S) float32: the B first images then the B second images,
    as ``BlipNLVR`` takes them; sentences (list of B str); labels (B,) int64). uint8 images
    (``Uint8TestTransform`` / ``Uint8TrainTransform``) are normalised here."""
    images = torch.stack([item[0] for item in batch] + [item[1] for item in batch])
    if images.dtype == torch.uint8:
        images = normalize_uint8(images)
    labels = torch.tensor([item[3] for item in batch], dtype=torch.long)
    return images, [item[2] for item in batch], labels
