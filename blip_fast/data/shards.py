"""Pre-training samples from webdataset tar shards (img2dataset layout: ``KEY.jpg`` beside
``KEY.txt`` or ``KEY.json`` with a "caption"), as a map-style dataset.
A JSON caption may also be a list of texts (CapFilt's bootstrapped shards): each read then draws
one of them, as ``PretrainDataset`` does for a list caption.

Opening the dataset reads each shard's tar headers (not its images) once, so samples can be
addressed by index: the training sampler's sharding across ranks, per-epoch shuffle, per-sample
seeding and exact resume work as for JSON annotations. Items are those of ``PretrainDataset``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence

from torch.utils.data import Dataset

from blip_fast.data.datasets import EMPTY_CAPTION, CorruptImage, draw_caption
from blip_fast.data.images import decode_image
from blip_fast.text import pre_caption

__all__ = ["ShardDataset", "expand_shards", "write_shards"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a list, a glob or a brace range (``data/{00000..00099}.tar``)."""
    if not isinstance(spec, str):
        return [p for s in spec for p in expand_shards(s)]
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        width = len(m.group(1))
        return [
            p
            for i in range(int(m.group(1)), int(m.group(2)) + 1)
            for p in expand_shards(spec[: m.start()] + f"{i:0{width}d}" + spec[m.end() :])
        ]
    paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not paths:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """webdataset key and extension: the key ends at the first dot of the file name."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(folder, key), ext.lower()


class ShardDataset(Dataset):
    """(transform(image), pre_caption(caption)) per sample of the shards; ``skip_corrupt`` as
    in ``PretrainDataset``; a list caption gives one of its texts drawn uniformly from torch's
    global RNG (as ``PretrainDataset``). A sample without an image or a caption member raises
    at opening with the shard and key named (nothing is dropped silently). ``raw(i)`` gives a
    sample as stored (CapFilt reads the shards through it)."""

    def __init__(
        self,
        shards: str | Sequence[str],
        transform=None,
        max_words: int = 30,
        skip_corrupt: bool = False,
    ):
        self.shards = expand_shards(shards)
        self.transform, self.max_words, self.skip_corrupt = transform, max_words, skip_corrupt
        # shard, image data offset, size, caption (str | list[str]), key, image extension
        self.samples: list[tuple[int, int, int, str | list[str], str, str]] = []
        for s, path in enumerate(self.shards):
            self.samples += self._index(s, path)
        self._files: dict[int, object] = {}

    def _index(self, s: int, path: str) -> list[tuple[int, int, int, str | list[str], str, str]]:
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path) as tar:
                for info in tar:
                    if info.isfile():
                        key, ext = _split_name(info.name)
                        members.setdefault(key, {})[ext] = info
                texts = {
                    k: tar.extractfile(m["txt"] if "txt" in m else m["json"]).read()
                    for k, m in members.items()
                    if "txt" in m or "json" in m
                }
        except (OSError, tarfile.TarError) as err:
            raise OSError(f"cannot read shard {path}: {err}") from err
        out = []
        for key, m in members.items():
            ext = next((e for e in IMAGE_EXTS if e in m), None)
            if ext is None or key not in texts:
                what = (
                    "an image (" + "/".join(IMAGE_EXTS) + ")"
                    if ext is None
                    else "a .txt or .json caption"
                )
                raise ValueError(f"shard {path}: sample {key!r} has no {what}")
            raw = texts[key].decode("utf-8")
            caption = raw if "txt" in m else json.loads(raw).get("caption")
            if not (
                isinstance(caption, str)
                or (
                    isinstance(caption, list)
                    and caption
                    and all(isinstance(c, str) for c in caption)
                )
            ):
                raise ValueError(
                    f"shard {path}: {key}.json has no 'caption' string or list of strings"
                )
            out.append((s, m[ext].offset_data, m[ext].size, caption, key, ext))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, s: int, offset: int, size: int) -> bytes:
        f = self._files.get(s)
        if f is None:  # opened lazily, so each DataLoader worker has its own handles
            f = self._files[s] = open(self.shards[s], "rb")
        f.seek(offset)
        return f.read(size)

    def raw(self, index: int) -> tuple[str, str, str, bytes, str | list[str]]:
        """Sample ``index`` as stored: (shard path, key, image extension, encoded image bytes,
        caption str or list), nothing decoded."""
        s, offset, size, caption, key, ext = self.samples[index]
        return self.shards[s], key, ext, self._read(s, offset, size), caption

    def __getitem__(self, index: int):
        s, offset, size, caption = self.samples[index][:4]
        caption = pre_caption(draw_caption(caption), self.max_words)  # draw before decoding,
        where = f"{self.shards[s]}@{offset}"  # as PretrainDataset.entry does
        if self.skip_corrupt and not caption:
            return CorruptImage(index, where, EMPTY_CAPTION)
        try:
            image = decode_image(self._read(s, offset, size), where)
        except OSError as err:
            if not self.skip_corrupt:
                raise
            return CorruptImage(index, where, str(err))
        if self.transform is not None:
            image = self.transform(image)
        return image, caption

    def __getstate__(self):  # file handles stay in the process that opened them
        return {**self.__dict__, "_files": {}}


def write_shards(samples, pattern: str, per_shard: int = 1000) -> list[str]:
    """Write (key, image bytes, caption) or (key, image bytes, caption, image extension)
    samples as tar shards ``pattern % i`` (img2dataset layout; extension "jpg" when not given):
    a str caption as ``KEY.txt``, a list of texts as ``KEY.json`` {"caption": [...]}. Returns
    the shard paths."""
    paths, tar = [], None
    for n, (key, data, caption, *image_ext) in enumerate(samples):
        if n % per_shard == 0:
            if tar is not None:
                tar.close()
            paths.append(pattern % len(paths))
            tar = tarfile.open(paths[-1], "w")
        text = (
            ("txt", caption.encode("utf-8"))
            if isinstance(caption, str)
            else ("json", json.dumps({"caption": list(caption)}).encode("utf-8"))
        )
        for ext, payload in ((image_ext[0] if image_ext else "jpg", data), text):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        tar.close()
    return paths
