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
from blip_fast.search.encode import UNREADABLE, encode_pixels, index_items
from blip_fast.search.sources import Item, list_items, open_item
from blip_fast.search.store import CORRUPT_REPORT, Store
from blip_fast.search.tokens import FORMATS

__all__ = ["Hit", "Index", "model_fingerprint"]

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


def model_fingerprint(model) -> str:
    """Hash of the weights image features depend on: an index answers only the model that
    built it."""
    digest = hashlib.blake2b(digest_size=8)
    for module in (model.visual_encoder, model.vision_proj):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _device(model) -> torch.device:
    return next(model.parameters()).device


class Index:
    """An image index on disk, with the model that answers its queries. Build it with
    ``Index.build`` or open one with ``Index.load``; ``len(index)`` images, ``index.paths``
    their paths in row order, ``index.skipped`` the unreadable ones with their errors."""

    def __init__(self, store: Store, model=None):
        self.store, self.model, self._itm, self._ann = store, model, None, None
        if model is not None:
            found, built = model_fingerprint(model), store.manifest["model"]["fingerprint"]
            if found != built:
                raise ValueError(
                    f"{store.root}: built with another model (weights {built}, given {found}; "
                    f"built from {store.manifest['model']['path']})"
                )
            model.eval()

    @classmethod
    def build(cls, model, src, out, store_tokens: str | None = None, **options) -> Index:
        """Index the images of ``src`` (folder, JSON list of paths or .tar shards; see
        ``blip_fast.search.sources``) into the folder ``out`` with ``model``'s ITC image
        features. If ``out`` holds an interrupted build of the same ``src`` and model, it
        continues it. ``options``: batch_size (32), chunk_size (items per commit, 1024),
        num_workers (image-decoding processes, 0), progress (a line per chunk on stderr).
        ``store_tokens`` "fp16" or "int8" also keeps every image's ViT tokens, read back by
        reranking instead of recomputed from the files (``blip_fast.search.tokens``)."""
        if store_tokens not in (None, *FORMATS):
            raise ValueError(f"store_tokens must be None or one of {FORMATS}, got {store_tokens!r}")
        src_id = os.path.abspath(os.path.expanduser(os.fspath(src)))
        items, ignored = list_items(src_id)
        if not items:
            raise ValueError(f"{src}: no images (.jpg, .jpeg, .png, .webp) found")
        if (Path(out) / "index.json").exists():
            index = cls.load(out, model)
            if index.store.manifest["sources"] != [src_id]:
                raise FileExistsError(
                    f"{out} already holds an index of {index.store.manifest['sources']}; "
                    f"use add to add {src_id}"
                )
        else:
            header = {
                "model": {"path": _model_path(model), "fingerprint": model_fingerprint(model)},
                "embed_dim": model.cfg.embed_dim,
                "image_size": model.cfg.vision.image_size,
                "sources": [src_id],
                "tokens": store_tokens,
            }
            index = cls(Store.create(out, header), model)
        if ignored:
            log.warning("%s: %d non-image file(s) left out (videos are not indexed)", src, ignored)
        index_items(model, index.store, items, device=_device(model), **options)
        return index

    def add(self, src, **options) -> int:
        """Index the images of ``src`` this index does not hold yet (by path; nothing already
        indexed is read again); ``options`` as for ``build``. Returns the number added."""
        src_id = os.path.abspath(os.path.expanduser(os.fspath(src)))
        items, _ = list_items(src_id)
        manifest = self.store.manifest
        if src_id not in manifest["sources"]:
            self.store.update(sources=[*manifest["sources"], src_id])
        return index_items(self._need_model(), self.store, items, device=self._device, **options)

    @classmethod
    def load(cls, path, model=None) -> Index:
        """The index in the folder ``path``; ``model`` (the one that built it, checked) is
        needed for ``search`` and ``add``, not for reading paths and features."""
        return cls(Store.open(path), model)

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
            self._itm = model.gathered_itm()
        ids, mask = tok["input_ids"], tok["attention_mask"]
        return [
            self._rerank(ids[q : q + 1], mask[q : q + 1], itc[q], rows[q].tolist(), k)
            for q in range(len(texts))
        ]

    def _rerank(self, ids, mask, itc, rows: list[int], k: int) -> list[Hit]:
        """ITM reranking of one tokenised text's ITC candidates ``rows`` (similarities ``itc``)."""
        kept, embeds = self._image_tokens(rows)
        order, scores, logits = rank.rerank(self._itm, ids, mask, embeds, itc[kept])
        return [
            Hit(self._path(rows[kept[i]]), float(scores[i]), float(itc[kept[i]]), float(logits[i]))
            for i in order[:k].tolist()
        ]

    def _image_tokens(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        """(positions in ``rows`` still readable, their ViT tokens (n, Li, W)): stored ones if
        the index keeps them, else recomputed from the files, a file unreadable since indexing
        left out with a warning."""
        if self.store.manifest.get("tokens"):
            return list(range(len(rows))), self.store.tokens(rows).to(self._device)
        transform = test_transform(self.store.manifest["image_size"])
        items = self.store.items
        kept, pixels = [], []
        for i, row in enumerate(rows):
            try:
                pixels.append(transform(open_item(items[row])))
                kept.append(i)
            except UNREADABLE as err:
                log.warning("search: candidate left out, unreadable since indexing: %s", err)
        if not pixels:
            raise OSError(f"{self.store.root}: no candidate image could be read")
        model = self.model
        embeds = [
            model.image_embeds(torch.stack(pixels[b : b + 32]).to(self._device))
            for b in range(0, len(pixels), 32)
        ]
        return kept, torch.cat(embeds)

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


def _model_path(model) -> str | None:
    """The checkpoint ``model`` was loaded from (``blip_fast.load`` records it), if any."""
    report = getattr(model, "load_report", None)
    return os.path.abspath(report.path) if report is not None else None
