"""Datasets over the official BLIP annotation JSON formats (docs/architecture.md, "Annotation
formats").

Annotation files are read and validated whole at construction; a bad file, entry, key or type
raises with the file, entry index and key in the message. Images are opened lazily in
``__getitem__``; a missing or undecodable image raises with its full path. Nothing is ever
skipped silently: a skipped sample would shift the image/text numbering of evaluation. The
training datasets may opt in to ``skip_corrupt``: the item is then a ``CorruptImage`` marker
that the training loader replaces and lists in its report (``blip_fast.data.loader.SkipCorrupt``
drops and records them likewise).

``entry(index)`` -> (image path, the item's other fields) is what ``__getitem__`` returns
without the image; the DALI loader feeds the path through its pipeline and the fields beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from blip_fast.data.images import load_image
from blip_fast.text import pre_caption

__all__ = [
    "CorruptImage",
    "MissingKeyError",
    "PretrainDataset",
    "RetrievalEvalDataset",
    "RetrievalTrainDataset",
    "load_annotations",
]

PathLike = str | os.PathLike
Transform = Callable[[Image.Image], torch.Tensor]


def draw_caption(caption: str | list[str]) -> str:
    """A pre-training caption: the text, or one of a list drawn uniformly from torch's global
    RNG (seeded per ``DataLoader`` worker / per sample by the training loop)."""
    if isinstance(caption, str):
        return caption
    return caption[int(torch.randint(len(caption), ()).item())]


@dataclass(frozen=True)
class CorruptImage:
    """Stands in for a training item whose image is missing or undecodable, or whose caption
    is empty after normalisation (``EMPTY_CAPTION``: nothing to contrast, match or generate;
    official BLIP would train on "[CLS] [SEP]"), when its dataset skips such items."""

    index: int
    path: str
    error: str


EMPTY_CAPTION = "caption is empty after normalisation"


class MissingKeyError(KeyError):
    """An annotation entry lacks a key. Prints its message plainly (KeyError quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _type_name(value) -> str:
    return type(value).__name__


def _read_json(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:  # its message gives line, column and char offset
        raise ValueError(f"invalid JSON in annotation file {path}: {err}") from err
    if not isinstance(data, list):
        raise TypeError(
            f"annotation file {path}: top level must be a list of entries, got {_type_name(data)}"
        )
    return data


def _check_caption_list(value, where: str) -> None:
    if not value:
        raise ValueError(f"{where}: 'caption' is an empty list")
    for j, c in enumerate(value):
        if not isinstance(c, str):
            raise TypeError(f"{where}: 'caption'[{j}] must be str, got {_type_name(c)}")


def load_annotations(files: PathLike | Sequence[PathLike], caption: str) -> list[dict]:
    """Concatenate the entries of ``files``, checking each one.

    ``caption`` is the required caption type: ``"str"`` (retrieval train), ``"list"`` (retrieval
    eval) or ``"str|list"`` (pre-training). Every entry needs ``"image"`` (str) and
    ``"caption"``; retrieval train entries also ``"image_id"`` (str or int).
    """
    if caption not in ("str", "list", "str|list"):
        raise ValueError(f"caption must be 'str', 'list' or 'str|list', not {caption!r}")
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    keys = ("image", "caption", "image_id") if caption == "str" else ("image", "caption")
    out = []
    for f in files:
        path = Path(f)
        entries = _read_json(path)
        if not entries:  # an empty split would train or score nothing, and say nothing
            raise ValueError(f"annotation file {path} has no entries")
        for i, entry in enumerate(entries):
            where = f"{path}: entry {i}"
            if not isinstance(entry, dict):
                raise TypeError(f"{where} must be an object, got {_type_name(entry)}")
            for key in keys:
                if key not in entry:
                    raise MissingKeyError(f"{where} has no '{key}' key (keys: {sorted(entry)})")
            if not isinstance(entry["image"], str):
                raise TypeError(f"{where}: 'image' must be str, got {_type_name(entry['image'])}")
            cap = entry["caption"]
            if not (
                (isinstance(cap, str) and caption != "list")
                or (isinstance(cap, list) and caption != "str")
            ):
                want = {"str": "str", "list": "list of str", "str|list": "str or list of str"}[
                    caption
                ]
                raise TypeError(f"{where}: 'caption' must be {want}, got {_type_name(cap)}")
            if isinstance(cap, list):
                _check_caption_list(cap, where)
            if "image_id" in keys and (
                isinstance(entry["image_id"], bool) or not isinstance(entry["image_id"], (str, int))
            ):
                raise TypeError(
                    f"{where}: 'image_id' must be str or int, got {_type_name(entry['image_id'])}"
                )
            out.append(entry)
    return out


class RetrievalTrainDataset(Dataset):
    """Official ``re_train_dataset``: one item per (image, caption) entry.

    Returns (transform(image), pre_caption(caption, max_words), img_idx) where img_idx numbers
    the distinct ``image_id`` values 0, 1, ... in order of first appearance (``img_ids``).
    """

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        image_root: PathLike,
        transform: Transform,
        max_words: int = 30,
        skip_corrupt: bool = False,
    ):
        self.annotation = load_annotations(ann_files, caption="str")
        self.image_root, self.transform, self.max_words = Path(image_root), transform, max_words
        self.skip_corrupt = skip_corrupt
        self.img_ids: dict = {}
        for ann in self.annotation:
            self.img_ids.setdefault(ann["image_id"], len(self.img_ids))

    def __len__(self) -> int:
        return len(self.annotation)

    def entry(self, index: int) -> tuple[str, tuple[str, int]]:
        ann = self.annotation[index]
        return (
            os.fspath(self.image_root / ann["image"]),
            (pre_caption(ann["caption"], self.max_words), self.img_ids[ann["image_id"]]),
        )

    def __getitem__(self, index: int):
        return _item(self, index)


class RetrievalEvalDataset(Dataset):
    """Official ``re_eval_dataset``: one item per image, captions flattened.

    ``text``: normalised captions, numbered in order of appearance; ``image``: image relpaths;
    ``img2txt[i]``: the text ids of image i; ``txt2img[t]``: the image id of text t.
    ``__getitem__(i)`` -> (transform(image i), i).
    """

    def __init__(
        self, ann_file: PathLike, image_root: PathLike, transform: Transform, max_words: int = 30
    ):
        self.annotation = load_annotations(ann_file, caption="list")
        self.image_root, self.transform = Path(image_root), transform
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_id, ann in enumerate(self.annotation):
            self.image.append(ann["image"])
            self.img2txt[img_id] = []
            for caption in ann["caption"]:
                self.img2txt[img_id].append(len(self.text))
                self.txt2img[len(self.text)] = img_id
                self.text.append(pre_caption(caption, max_words))

    def __len__(self) -> int:
        return len(self.annotation)

    def entry(self, index: int) -> tuple[str, tuple[int]]:
        return os.fspath(self.image_root / self.annotation[index]["image"]), (index,)

    def __getitem__(self, index: int):
        path, fields = self.entry(index)
        return (self.transform(load_image(path)), *fields)


class PretrainDataset(Dataset):
    """Official ``pretrain_dataset`` over ``{"image", "caption": str | [str]}`` entries.

    Returns (transform(image), pre_caption(caption, max_words)), the RGB PIL image itself when
    ``transform`` is None (CapFilt's captioner and filter apply their own transforms); a list
    caption gives one of its captions drawn uniformly from torch's global RNG (seeded per
    ``DataLoader`` worker). ``image_root`` None means the ``"image"`` paths are used as written
    (official pre-training JSONs hold absolute paths); an absolute path also ignores ``image_root``.
    ``skip_corrupt``: a missing or undecodable image gives a ``CorruptImage`` item instead of an
    error (web data is dirty); collate with ``blip_fast.data.loader.SkipCorrupt`` to drop and
    record them.
    """

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        image_root: PathLike | None = None,
        transform: Transform | None = None,
        max_words: int = 30,
        skip_corrupt: bool = False,
    ):
        self.annotation = load_annotations(ann_files, caption="str|list")
        self.image_root, self.transform, self.max_words = image_root, transform, max_words
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.annotation)

    def entry(self, index: int) -> tuple[str, tuple[str]]:
        ann = self.annotation[index]
        path = (
            ann["image"] if self.image_root is None else os.path.join(self.image_root, ann["image"])
        )
        return os.fspath(path), (pre_caption(draw_caption(ann["caption"]), self.max_words),)

    def __getitem__(self, index: int):
        return _item(self, index)


def _item(dataset, index: int):
    """(transform(image), *fields) of a training dataset's entry, or a ``CorruptImage`` for a
    missing or undecodable image or an empty caption when the dataset skips them."""
    path, fields = dataset.entry(index)
    if dataset.skip_corrupt and not fields[0]:
        return CorruptImage(index, path, EMPTY_CAPTION)
    try:
        image = load_image(path)
    except OSError as err:  # FileNotFoundError included
        if not dataset.skip_corrupt:
            raise
        return CorruptImage(index, path, str(err))
    if dataset.transform is not None:
        image = dataset.transform(image)
    return (image, *fields)
