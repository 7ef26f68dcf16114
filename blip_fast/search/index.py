"""``Index``: search over a folder of one's own images with a BLIP retrieval model.

    model = blip_fast.load("model_base_retrieval_coco.pth", task="retrieval")
    index = Index.build(model, "~/Pictures", "pictures.index")   # resumable; rerun to continue
    index.add("~/Pictures/2027")                                 # only the new files
    for hit in Index.load("pictures.index", model).search("a dog on a beach", k=5):
        print(f"{hit.score:.3f} {hit.path}")

The index stores one float16 ITC feature per image (``blip_fast.search.store`` describes the
folder); text queries rank them exactly by ITC similarity, then rerank the top candidates with
ITM (``blip_fast.search.rank``); image queries rank by ITC similarity alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip_fast.data.images import to_rgb
from blip_fast.data.transforms import test_transform
from blip_fast.search import rank
from blip_fast.search.ann import AnnIndex
from blip_fast.search.encode import (
    UNREADABLE,
    encode_pixels,
    encode_videos,
    index_items,
    item_pixels,
)
from blip_fast.search.rank import reranker_dtype, reranker_precision
from blip_fast.search.sources import Item, list_items, open_item
from blip_fast.search.store import CORRUPT_REPORT, Store
from blip_fast.search.tokens import FORMATS

__all__ = ["Hit", "Index", "model_fingerprint", "source_id"]

log = logging.getLogger("blip_fast")
COMPACT_ROWS = 1 << 20  # images per chunk of a saved copy: 512 MiB of float16 at embed_dim 256


@dataclass(frozen=True)
class Hit:
    """One result: ``path`` (``shard.tar:member`` for a shard image), ``score`` (what the
    results are ordered by: ITM + ITC when reranked, else ITC), ``itc`` the ITC similarity,
    ``itm`` the ITM match logit (None without reranking)."""

    path: str
    score: float
    itc: float
    itm: float | None = None


def model_fingerprint(model, modules=("visual_encoder", "vision_proj")) -> str:
    """Hash of the weights of ``modules`` (by default those image features depend on): an
    index answers only the model that built it. Remembered on the model while no weight
    changes (hashing ViT-B's weights takes half a second)."""
    states = [sorted(model.get_submodule(m).state_dict().items()) for m in modules]
    # in-place updates (optimizer steps, load_state_dict) bump _version; .to() moves data
    key = (modules, tuple((t.data_ptr(), t._version) for state in states for _, t in state))
    cached = getattr(model, "_search_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.blake2b(digest_size=8)
    for state in states:
        for name, tensor in state:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    model._search_fingerprint = (key, digest.hexdigest())
    return model._search_fingerprint[1]


def _device(model) -> torch.device:
    return next(model.parameters()).device


class Index:
    """An image index on disk, with the model that answers its queries. Build it with
    ``Index.build`` or open one with ``Index.load``; ``len(index)`` images, ``index.paths``
    their paths in row order, ``index.skipped`` the unreadable ones with their errors."""

    def __init__(self, store: Store, model=None, precision: str = "fp32"):
        self.store, self.model, self._ann = store, model, None
        self._itm = self._vit = None  # the reranker's snapshots of the model, built on first use
        self.precision = reranker_precision(precision, model)
        if model is not None:
            found, built = model_fingerprint(model), store.manifest["model"]["fingerprint"]
            if found != built:
                raise ValueError(
                    f"{store.root}: built with another model (weights {built}, given {found}; "
                    f"built from {store.manifest['model']['path']})"
                )
            model.eval()

    @classmethod
    def build(
        cls, model, src, out, store_tokens: str | None = None, videos: bool = False, **options
    ) -> Index:
        """Index the images of ``src`` (folder, JSON list of paths or .tar shards; see
        ``blip_fast.search.sources``) into the folder ``out`` with ``model``'s ITC image
        features. If ``out`` holds an interrupted build of the same ``src`` and model, it
        continues it. ``options``: batch_size (32), chunk_size (items per commit, 1024),
        num_workers (image-decoding processes, 0), progress (a line per chunk on stderr).
        ``store_tokens`` "fp16" or "int8" also keeps every image's ViT tokens, read back by
        reranking instead of recomputed from the files (``blip_fast.search.tokens``).
        ``videos`` indexes a folder's videos too (``encode_videos``: the mean of 8 frames'
        features; ITM reads all 8 frames' tokens, recomputed at search time)."""
        index, items = cls.prepare(model, src, out, store_tokens, videos)
        index_items(model, index.store, items, device=_device(model), **options)
        return index

    @classmethod
    def prepare(
        cls, model, src, out, store_tokens: str | None = None, videos: bool = False
    ) -> tuple[Index, list[Item]]:
        """(the index ``build`` fills: new in ``out``, or the interrupted build of the same
        ``src``, model and ``videos`` found there; the items of ``src``)."""
        if store_tokens not in (None, *FORMATS):
            raise ValueError(f"store_tokens must be None or one of {FORMATS}, got {store_tokens!r}")
        if store_tokens and videos:
            raise ValueError("store_tokens keeps image tokens: not with videos")
        src_id = source_id(src)
        items, ignored = list_items(src_id, videos)
        if not items:
            kinds = "images or videos" if videos else "images (.jpg, .jpeg, .png, .webp)"
            raise ValueError(f"{src}: no {kinds} found")
        if (Path(out) / "index.json").exists():
            index = cls.load(out, model)
            manifest = index.store.manifest
            if manifest["sources"] != [src_id]:
                raise FileExistsError(
                    f"{out} already holds an index of {manifest['sources']}; "
                    f"use add to add {src_id}"
                )
            if manifest.get("videos", False) != videos:
                raise ValueError(f"{out}: built with videos={manifest.get('videos', False)}")
        else:
            header = {
                "model": {"path": _model_path(model), "fingerprint": model_fingerprint(model)},
                "embed_dim": model.cfg.embed_dim,
                "image_size": model.cfg.vision.image_size,
                "sources": [src_id],
                "tokens": store_tokens,
                "videos": videos,
            }
            index = cls(Store.create(out, header), model)
        if ignored:
            what = "images or videos" if videos else "images (videos are indexed with --videos)"
            log.warning("%s: %d file(s) left out: not %s", src, ignored, what)
        return index, items

    def add(self, src, **options) -> int:
        """Index the images of ``src`` this index does not hold yet (by path; nothing already
        indexed is read again); ``options`` as for ``build``. Returns the number added."""
        items = self.add_source(src)
        return index_items(self._need_model(), self.store, items, device=self._device, **options)

    def add_source(self, src) -> list[Item]:
        """Record ``src`` among the index's sources; its items (``add`` indexes the new ones)."""
        src_id = source_id(src)
        if src_id not in self.store.manifest["sources"]:
            self.store.update(sources=[*self.store.manifest["sources"], src_id])
        return self.items_of(src)

    def items_of(self, src) -> list[Item]:
        """The items of ``src`` this index covers (videos too if it was built with them)."""
        return list_items(source_id(src), self.store.manifest.get("videos", False))[0]

    @classmethod
    def load(cls, path, model=None, precision: str = "fp32") -> Index:
        """The index in the folder ``path``; ``model`` (the one that built it, checked) is
        needed for ``search`` and ``add``, not for reading paths and features. ``precision``
        "bf16" reranks in bf16 (``reranker_precision``)."""
        return cls(Store.open(path), model, precision)

    def save(self, path) -> Index:
        """A compacted copy in the new folder ``path`` (chunks of ``COMPACT_ROWS`` images or
        more); returns it."""
        dropped = ("format", "version", "tokens")  # stored tokens stay with the original
        header = {k: v for k, v in self.store.manifest.items() if k not in dropped}
        copy = Store.create(path, {**header, "chunks": []})
        items, skipped, buffer, start = self.store.items, self.store.skipped, [], 0
        for _, block in self.store.blocks(COMPACT_ROWS):
            buffer.append(np.asarray(block))
            rows = sum(map(len, buffer))
            if rows >= COMPACT_ROWS:
                copy.commit(np.concatenate(buffer), items[start : start + rows], skipped)
                buffer, skipped, start = [], [], start + rows
        if buffer or skipped:
            feats = np.concatenate(buffer) if buffer else np.zeros((0, copy.manifest["embed_dim"]))
            copy.commit(feats, items[start:], skipped)
        report = self.store.root / CORRUPT_REPORT
        if report.exists():
            shutil.copyfile(report, copy.root / CORRUPT_REPORT)
        return Index(copy, self.model)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def paths(self) -> list[str]:
        return [str(item) for item in self.store.items]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(str(item), error) for item, error in self.store.skipped]

    def features(self) -> torch.Tensor:
        """All stored features, float16 (len, embed_dim), row i for ``paths[i]``."""
        return torch.from_numpy(self.store.features())

    def search(
        self, query, k: int = 10, rerank: bool = True, candidates: int = 128, exact: bool = True
    ):
        """The ``k`` best images for ``query``, best first, as ``Hit``s.

        A ``str`` is a text query: exact ITC top-N over the whole index, N = max(k,
        ``candidates``), then (``rerank``) ITM over those N through the gathered
        cross-attention, ordered by ITM + ITC as the official evaluation. A ``PIL.Image`` or an
        ``os.PathLike`` (``pathlib.Path``) is an image query: the most similar images by ITC.
        ``exact=False`` takes the ITC top-N from a faiss index instead (``blip_fast.search.ann``;
        built and saved beside the index at the first such search)."""
        self._check_search(k, candidates)
        if isinstance(query, str):
            return self._text_search([query], k, rerank, candidates, exact)[0]
        if isinstance(query, (Image.Image, os.PathLike)):
            return self._image_search(query, k, exact)
        raise TypeError(f"query must be a str (text), PIL.Image or path, not {type(query)}")

    def search_texts(
        self,
        texts: list[str],
        k: int = 10,
        rerank: bool = True,
        candidates: int = 128,
        exact: bool = True,
    ) -> list[list[Hit]]:
        """``search`` for several text queries, a list of hits per text: the texts are encoded
        as one batch and ranked in one pass over the index; ITM reranking is per text."""
        self._check_search(k, candidates)
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("search_texts: every query must be a str")
        return self._text_search(list(texts), k, rerank, candidates, exact) if texts else []

    def _check_search(self, k, candidates) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates!r}")
        if len(self) == 0:
            raise ValueError(f"{self.store.root}: the index holds no images")

    @property
    def _device(self) -> torch.device:
        return _device(self._need_model())

    def _need_model(self):
        if self.model is None:
            raise ValueError(f"{self.store.root}: load the index with its model to use it")
        return self.model

    @torch.no_grad()
    def _text_search(
        self, texts: list[str], k: int, rerank: bool, candidates: int, exact: bool
    ) -> list[list[Hit]]:
        from blip_fast.tokenization import tokenizer

        model = self._need_model()
        tok = tokenizer()(texts).to(self._device)
        queries = model.text_features(tok["input_ids"], tok["attention_mask"]).float()
        itc, rows = self._top_k(queries, max(k, candidates) if rerank else k, exact)
        if not rerank:
            return [
                [Hit(self._path(r), float(s), float(s)) for r, s in zip(rs.tolist(), ss)]
                for rs, ss in zip(rows, itc)
            ]
        if self._itm is None:
            self._itm = model.gathered_itm(reranker_dtype(self.precision))
        ids, mask = tok["input_ids"], tok["attention_mask"]
        return [
            self._rerank(ids[q : q + 1], mask[q : q + 1], itc[q], rows[q].tolist(), k)
            for q in range(len(texts))
        ]

    def _rerank(self, ids, mask, itc, rows: list[int], k: int) -> list[Hit]:
        """ITM reranking of one tokenised text's ITC candidates ``rows`` (similarities ``itc``):
        images and videos (a token row per frame) reranked as two groups, merged by score."""
        found = []  # (position in rows, score, ITM logit)
        for kept, embeds in self._candidate_tokens(rows):
            _, scores, logits = rank.rerank(self._itm, ids, mask, embeds, itc[kept])
            found += zip(kept, scores.tolist(), logits.tolist())
        found.sort(key=lambda f: (-f[1], f[0]))
        return [Hit(self._path(rows[i]), score, float(itc[i]), itm) for i, score, itm in found[:k]]

    def _candidate_tokens(self, rows: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        """[(positions in ``rows`` still readable, their ViT tokens (n, Li, W))], one group for
        images, one for videos (frames' tokens concatenated, ``encode_videos``): stored tokens
        if the index keeps them, else recomputed from the files, a file unreadable since
        indexing left out with a warning."""
        if self.store.manifest.get("tokens"):
            return [(list(range(len(rows))), self.store.tokens(rows).to(self._device))]
        transform = test_transform(self.store.manifest["image_size"])
        readable = []  # (position in rows, pixels)
        for i, row in enumerate(rows):
            try:
                readable.append((i, item_pixels(self.store.items[row], transform)))
            except UNREADABLE as err:
                log.warning("search: candidate left out, unreadable since indexing: %s", err)
        if not readable:
            raise OSError(f"{self.store.root}: no candidate image could be read")
        model, device = self.model, self._device
        if self._vit is None:  # prepacked (bf16: an all-bf16 copy, as the reranker's encoder)
            dtype = reranker_dtype(self.precision)
            self._vit = model.visual_encoder.packed(model.backends.get("linear"), dtype)
        vit_dtype = self._vit.pos_embed.dtype
        encoders = (  # (pixels' dims, batch, encoder); 4 videos of 8 frames: 32 images
            (4, 32, lambda px: self._vit(px.to(device, vit_dtype))),
            # a video's tokens stay fp32 (``encode_videos``)
            (5, 4, lambda px: encode_videos(model, px, device, with_tokens=True)[1]),
        )
        groups = []
        for dims, batch, encode in encoders:
            kept = [i for i, px in readable if px.dim() + 1 == dims]
            pixels = [px for _, px in readable if px.dim() + 1 == dims]
            if kept:
                embeds = [
                    encode(torch.stack(pixels[b : b + batch])) for b in range(0, len(pixels), batch)
                ]
                groups.append((kept, torch.cat(embeds)))
        return groups

    @torch.no_grad()
    def _image_search(self, image, k: int, exact: bool) -> list[Hit]:
        img = to_rgb(image) if isinstance(image, Image.Image) else open_item(Item(os.fspath(image)))
        pixels = test_transform(self.store.manifest["image_size"])(img)[None]
        query = encode_pixels(self._need_model(), pixels, self._device)
        sims, rows = self._top_k(query, k, exact)
        return [Hit(self._path(r), float(s), float(s)) for r, s in zip(rows[0].tolist(), sims[0])]

    def _top_k(self, query: torch.Tensor, k: int, exact: bool):
        if exact:
            return rank.exact_top_k(self.store, query, k)
        if self._ann is None or self._ann.record["rows"] != len(self):
            self._ann = AnnIndex.for_store(self.store)
        return self._ann.search(query, k)

    def _path(self, row: int) -> str:
        return str(self.store.items[row])


def source_id(src) -> str:
    """How an index records a source: its absolute path (or shard pattern)."""
    return os.path.abspath(os.path.expanduser(os.fspath(src)))


def _model_path(model) -> str | None:
    """The checkpoint ``model`` was loaded from (``blip_fast.load`` records it), if any."""
    report = getattr(model, "load_report", None)
    return os.path.abspath(report.path) if report is not None else None
