"""What an index covers: the image items of a source, and reading one back.

A source is one of
- a folder: every ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` file under it, any depth, in
  sorted path order, and with ``videos`` every ``.mp4`` / ``.avi`` / ``.mov`` / ``.mkv`` /
  ``.webm`` file too (other files are counted and left out);
- a JSON file holding a list of image paths, relative ones taken from the JSON file's folder;
- webdataset shards (``.tar``: a path, a glob or a brace range ``web/{00000..00009}.tar``, as
  ``blip_fast.data.shards.expand_shards`` reads them): every image member, captions or not.

An item is ``(path, member)``: ``member`` is None for a file, the member name inside the tar
``path`` for a shard. Paths are stored absolute, so an index can be searched from any folder.
A video item is read as ``NUM_FRAMES`` frames (``blip_fast.data.video.read_frames``, official
BLIP's sampler); shown as an image (``open_item``), it is its first frame.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from blip_fast.data.images import decode_image, load_image
from blip_fast.data.shards import IMAGE_EXTS, expand_shards

__all__ = ["NUM_FRAMES", "VIDEO_EXTS", "Item", "is_video", "list_items", "open_frames", "open_item"]

VIDEO_EXTS = ("mp4", "avi", "mov", "mkv", "webm")
NUM_FRAMES = 8  # frames per video, as official BLIP's video retrieval


class Item(NamedTuple):
    path: str
    member: str | None = None

    def __str__(self) -> str:
        return self.path if self.member is None else f"{self.path}:{self.member}"


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTS


def is_video(item: Item) -> bool:
    return item.member is None and item.path.rpartition(".")[2].lower() in VIDEO_EXTS


def _folder_items(root: Path, videos: bool) -> tuple[list[Item], int]:
    items, ignored = [], 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if _is_image(name) or (videos and is_video(Item(name))):
                items.append(Item(os.path.abspath(os.path.join(folder, name))))
            else:
                ignored += 1
    return items, ignored


def _json_items(path: Path) -> list[Item]:
    try:
        paths = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON list of image paths ({err})") from None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{path}: expected a JSON list of image paths (strings)")
    return [Item(os.path.abspath(path.parent / p)) for p in paths]


def _shard_items(spec: str) -> list[Item]:
    items = []
    for shard in expand_shards(spec):
        try:
            with tarfile.open(shard) as tar:
                names = [m.name for m in tar if m.isfile() and _is_image(m.name)]
        except (OSError, tarfile.TarError) as err:
            raise OSError(f"cannot read shard {shard}: {err}") from err
        items += [Item(os.path.abspath(shard), name) for name in names]
    return items


def list_items(src: str | os.PathLike, videos: bool = False) -> tuple[list[Item], int]:
    """(items of ``src`` in a fixed order, duplicates dropped; number of files left out of a
    folder: not images, nor videos with ``videos``)."""
    text = os.fspath(src)
    path = Path(text)
    if path.is_dir():
        items, ignored = _folder_items(path, videos)
    elif text.endswith(".tar") or "{" in text or any(c in text for c in "*?["):
        items, ignored = _shard_items(text), 0
    elif path.suffix.lower() == ".json" and path.is_file():
        items, ignored = _json_items(path), 0
    elif not path.exists():
        raise FileNotFoundError(f"image source not found: {text}")
    else:
        raise ValueError(
            f"{text}: an image source is a folder, a JSON list of image paths or .tar shards"
        )
    return list(dict.fromkeys(items)), ignored


def open_frames(item: Item) -> list[Image.Image]:
    """The ``NUM_FRAMES`` RGB frames of a video item; ``UnreadableVideo`` (a ValueError) or
    FileNotFoundError naming it when it cannot be read."""
    from blip_fast.data.video import read_frames  # PyAV, the "video" extra

    return [frame.convert("RGB") for frame in read_frames(item.path, NUM_FRAMES)]


def open_item(item: Item) -> Image.Image:
    """The item's image as RGB (a video's first frame); OSError (ValueError for a video)
    naming the item when it cannot be read or decoded."""
    if is_video(item):
        from blip_fast.data.video import read_frames

        return read_frames(item.path, 1)[0].convert("RGB")
    if item.member is None:
        return load_image(item.path)
    try:
        with tarfile.open(item.path) as tar:
            data = tar.extractfile(item.member).read()
    except (OSError, tarfile.TarError, KeyError, AttributeError) as err:
        raise OSError(f"cannot read {item}: {err}") from err
    return decode_image(data, str(item))
