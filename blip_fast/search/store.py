"""The on-disk index: a folder of plain files, no pickle anywhere.

    index.json           manifest: format, version, model, embed_dim, image_size, sources,
                         chunks [{"name", "items"}] in order (the commit record)
    chunk-NNNNNN.npy     float16 (items, embed_dim): normalised ITC image features
    chunk-NNNNNN.json    {"items": [[path, member|null], ...], "skipped": [[path, member, error]]}
    corrupt_images.tsv   unreadable files, ``index<TAB>path<TAB>error`` (data.corrupt_report)
    chunk-NNNNNN.tokens.npy (and .scales.npy)  the images' ViT tokens, if the manifest's
                         "tokens" names their format (``blip_fast.search.tokens``)

Row r of the index is row r of the concatenated chunks. A chunk is committed by writing its two
files (each atomically: temporary file, fsync, rename) and then the manifest that lists it; a
process killed at any point leaves the last committed state, and files of an uncommitted chunk
are overwritten by the next one. The manifest is the only record that a chunk exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from blip_fast.search import tokens as stored_tokens
from blip_fast.search.sources import Item
from blip_fast.train.checkpoint import atomic_write

__all__ = ["FORMAT", "MANIFEST", "Store"]

FORMAT, VERSION = "blip-fast-image-index", 1
MANIFEST = "index.json"
CORRUPT_REPORT = "corrupt_images.tsv"


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8") + b"\n"))


class Store:
    """An index folder: its manifest, the items of every committed chunk, features by block."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self.items: list[Item] = []  # row order
        self.skipped: list[tuple[Item, str]] = []

    @classmethod
    def create(cls, root: str | os.PathLike, header: dict) -> Store:
        """A new, empty index in ``root`` (created; it must not hold an index)."""
        root = Path(root)
        if (root / MANIFEST).exists():
            raise FileExistsError(f"{root} already holds an index")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, {"format": FORMAT, "version": VERSION, **header, "chunks": []})
        _write_json(root / MANIFEST, store.manifest)
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> Store:
        """The committed state of the index in ``root``."""
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            what = "folder not found" if not root.is_dir() else f"no {MANIFEST} in it"
            raise FileNotFoundError(f"not an index: {root} ({what})") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{root / MANIFEST}: not JSON ({err})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(
                f"{root / MANIFEST}: format {manifest.get('format')!r} version "
                f"{manifest.get('version')!r}; expected {FORMAT!r} version {VERSION}"
            )
        store = cls(root, manifest)
        for chunk in manifest["chunks"]:
            record = json.loads((root / f"{chunk['name']}.json").read_text(encoding="utf-8"))
            items = [Item(p, m) for p, m in record["items"]]
            if len(items) != chunk["items"]:
                raise ValueError(
                    f"{root / chunk['name']}.json lists {len(items)} items, the manifest "
                    f"{chunk['items']}"
                )
            store.items += items
            store.skipped += [(Item(p, m), e) for p, m, e in record["skipped"]]
        return store

    def __len__(self) -> int:
        return sum(c["items"] for c in self.manifest["chunks"])

    def seen(self) -> set[Item]:
        """Items indexed or skipped as unreadable: a rerun or ``add`` does not try them again."""
        return set(self.items) | {item for item, _ in self.skipped}

    def update(self, **fields) -> None:
        """Rewrite the manifest with ``fields`` changed (atomically)."""
        manifest = {**self.manifest, **fields}
        _write_json(self.root / MANIFEST, manifest)
        self.manifest = manifest

    def commit(
        self,
        features: np.ndarray,
        items: list[Item],
        skipped: list[tuple[Item, str]],
        tokens: tuple[np.ndarray, ...] | None = None,
    ):
        """Append one chunk: features (n, embed_dim) of ``items`` (n), plus the ``skipped``
        items with their errors, atomically (module docstring); ``tokens``: the items' stored
        ViT tokens, as ``tokens.encode`` in the manifest's format, if it names one."""
        dim, fmt = self.manifest["embed_dim"], self.manifest.get("tokens")
        if features.shape != (len(items), dim):
            raise ValueError(f"chunk features {features.shape} for {len(items)} items of {dim}")
        if fmt and items and (tokens is None or any(len(a) != len(items) for a in tokens)):
            raise ValueError(f"{self.root} stores {fmt} tokens: a chunk needs them for each item")
        name = f"chunk-{len(self.manifest['chunks']):06d}"
        features = np.ascontiguousarray(features, dtype=np.float16)
        atomic_write(self.root / f"{name}.npy", lambda f: np.save(f, features))
        if fmt and items:
            for suffix, array in zip(stored_tokens.suffixes(fmt), tokens):
                atomic_write(self.root / f"{name}.{suffix}.npy", lambda f, a=array: np.save(f, a))
        record = {"items": [list(i) for i in items], "skipped": [[*i, e] for i, e in skipped]}
        _write_json(self.root / f"{name}.json", record)
        chunks = [*self.manifest["chunks"], {"name": name, "items": len(items)}]
        self.update(chunks=chunks)
        self.items += items
        self.skipped += skipped

    def chunk(self, i: int) -> tuple[np.ndarray, list[Item], list[tuple[Item, str]], tuple | None]:
        """Chunk ``i`` as ``commit`` took it: (features, items, skipped, stored token arrays or
        None), the arrays memory-mapped."""
        name, fmt = self.manifest["chunks"][i]["name"], self.manifest.get("tokens")
        record = json.loads((self.root / f"{name}.json").read_text(encoding="utf-8"))
        items = [Item(p, m) for p, m in record["items"]]
        skipped = [(Item(p, m), e) for p, m, e in record["skipped"]]
        token_files = [f"{name}.{s}" for s in stored_tokens.suffixes(fmt)] if fmt and items else []
        arrays = [
            np.load(self.root / f"{n}.npy", mmap_mode="r", allow_pickle=False)
            for n in [name, *token_files]
        ]
        return arrays[0], items, skipped, tuple(arrays[1:]) or None

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float16 features (<= rows, embed_dim)) over the whole index, read from
        memory-mapped chunks, so an index larger than memory streams through."""
        start = 0
        for chunk in self.manifest["chunks"]:
            feats = np.load(self.root / f"{chunk['name']}.npy", mmap_mode="r", allow_pickle=False)
            if feats.shape != (chunk["items"], self.manifest["embed_dim"]):
                raise ValueError(
                    f"{self.root / chunk['name']}.npy has shape {feats.shape}; the manifest "
                    f"says ({chunk['items']}, {self.manifest['embed_dim']})"
                )
            for r in range(0, feats.shape[0], rows):
                yield start + r, feats[r : r + rows]
            start += feats.shape[0]

    def tokens(self, rows: list[int]) -> torch.Tensor:
        """The stored ViT tokens of ``rows``, float32 (len(rows), Li, W), in that order."""
        fmt = self.manifest.get("tokens")
        if not fmt:
            raise ValueError(f"{self.root}: built without stored tokens")
        chunks = self.manifest["chunks"]
        starts = np.cumsum([0] + [c["items"] for c in chunks])
        rows = np.asarray(rows)
        which = np.searchsorted(starts, rows, side="right") - 1
        out = [None] * len(rows)
        for c in np.unique(which):
            name, at = chunks[c]["name"], np.flatnonzero(which == c)
            arrays = [
                np.load(self.root / f"{name}.{suffix}.npy", mmap_mode="r", allow_pickle=False)
                for suffix in stored_tokens.suffixes(fmt)
            ]
            decoded = stored_tokens.decode(tuple(a[rows[at] - starts[c]] for a in arrays))
            for i, t in zip(at, decoded):
                out[i] = t
        return torch.stack(out)

    def features(self) -> np.ndarray:
        """All features, float16 (len, embed_dim), in memory."""
        parts = [block for _, block in self.blocks(1 << 30)]
        return (
            np.concatenate(parts)
            if parts
            else np.zeros((0, self.manifest["embed_dim"]), np.float16)
        )
