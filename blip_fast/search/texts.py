"""``TextIndex``: captions searched with an image, the mirror image of ``Index``.

    model = blip_fast.load("model_base_retrieval_coco.pth", task="retrieval")
    captions = TextIndex.build(model, "captions.json", "captions.index")
    for hit in captions.search("photo.jpg", k=5):
        print(f"{hit.score:.3f} {hit.text}")

An image query ranks every caption by ITC similarity (exact, blocked as ``rank.exact_top_k``),
then reranks the top N with ITM as the official image-to-text evaluation: the image's tokens
and cross-attention K / V are computed once, the N stored token rows read them through the
gathered reranker (``rank.rerank_texts``). The folder, no pickle anywhere:

    index.json        manifest: format, version, model, embed_dim, image_size, source, texts
    texts.json        the captions, row order
    features.npy      float16 (N, embed_dim): normalised ITC text features
    token_ids.npy     int32 (N, L): token ids as tokenised ([CLS] first), right-padded
    token_lengths.npy int32 (N,): each row's token count (the attention mask)

Captions are cheap to encode, so a build is one pass, not chunked: the manifest is written last,
and a build interrupted before it is redone from the start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip_fast.data.images import to_rgb
from blip_fast.data.transforms import test_transform
from blip_fast.search import rank
from blip_fast.search.index import _device, _model_path, model_fingerprint, source_id
from blip_fast.search.rank import reranker_dtype, reranker_precision
from blip_fast.search.sources import Item, open_item
from blip_fast.train.checkpoint import atomic_write

__all__ = ["TextHit", "TextIndex", "is_text_index", "read_captions"]

FORMAT, VERSION = "blip-fast-text-index", 1
MANIFEST = "index.json"
TEXT_SIDE = ("text_encoder", "text_proj")  # the weights stored text features depend on


@dataclass(frozen=True)
class TextHit:
    """One caption found for an image: ``score`` orders the results (ITM + ITC when
    reranked, else ITC), ``itc`` the ITC similarity, ``itm`` the ITM match logit or None."""

    text: str
    score: float
    itc: float
    itm: float | None = None


def read_captions(path) -> list[str]:
    """The captions of ``path``: a JSON list of strings, or a text file with one caption a
    line (blank lines left out)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            captions = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{path}: expected a JSON list of captions (strings)")
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            raise ValueError(f"{path}: caption {empty[0]} is empty ({len(empty)} empty in all)")
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


def is_text_index(path) -> bool:
    """Whether the folder ``path`` holds a caption index (rather than an image index)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


class TextIndex:
    """Captions on disk with their ITC features and token ids; ``texts`` in row order."""

    def __init__(self, root, model=None, precision: str = "fp32"):
        """``precision`` "bf16": ITM reranking on an all-bf16 copy of the text encoder."""
        self.root, self.model, self._itm = Path(root), model, None
        self.precision = reranker_precision(precision, model)
        try:
            self.manifest = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"not a caption index: {self.root} (no {MANIFEST})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{self.root / MANIFEST}: not a {FORMAT} version {VERSION}")
        self.texts = json.loads((self.root / "texts.json").read_text(encoding="utf-8"))
        self._features, self._ids, self._lengths = (
            np.load(self.root / name, mmap_mode="r", allow_pickle=False)
            for name in ("features.npy", "token_ids.npy", "token_lengths.npy")
        )
        n, dim = len(self.texts), self.manifest["embed_dim"]
        if self._features.shape != (n, dim) or len(self._ids) != n or len(self._lengths) != n:
            raise ValueError(
                f"{self.root}: {n} texts but features {self._features.shape}, token ids "
                f"{self._ids.shape}, lengths {self._lengths.shape} (expected ({n}, {dim}))"
            )
        if model is not None:
            found = model_fingerprint(model, TEXT_SIDE)
            built = self.manifest["model"]["fingerprint"]
            if found != built:
                raise ValueError(
                    f"{self.root}: built with another model (text weights {built}, given {found})"
                )
            model.eval()

    @classmethod
    @torch.no_grad()
    def build(cls, model, src, out, batch_size: int = 256) -> TextIndex:
        """Encode the captions of ``src`` (``read_captions``) into the new folder ``out``."""
        from blip_fast.tokenization import tokenizer

        if (Path(out) / MANIFEST).exists():
            raise FileExistsError(f"{out} already holds an index")
        captions = read_captions(src)
        tok = tokenizer()(captions)
        ids, mask = tok["input_ids"], tok["attention_mask"]
        device = _device(model.eval())
        feats = [
            model.text_features(
                ids[b : b + batch_size].to(device), mask[b : b + batch_size].to(device)
            )
            for b in range(0, len(captions), batch_size)
        ]
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {
            "features.npy": torch.cat(feats).cpu().numpy().astype(np.float16),
            "token_ids.npy": ids.numpy().astype(np.int32),
            "token_lengths.npy": mask.sum(1).numpy().astype(np.int32),
        }
        for name, array in arrays.items():
            atomic_write(out / name, lambda f, a=array: np.save(f, a))
        _write_json(out / "texts.json", captions)
        _write_json(
            out / MANIFEST,
            {
                "format": FORMAT,
                "version": VERSION,
                "model": {
                    "path": _model_path(model),
                    "fingerprint": model_fingerprint(model, TEXT_SIDE),
                },
                "embed_dim": model.cfg.embed_dim,
                "image_size": model.cfg.vision.image_size,
                "source": source_id(src),
                "texts": len(captions),
            },
        )
        return cls(out, model)

    def __len__(self) -> int:
        return len(self.texts)

    def features(self) -> torch.Tensor:
        """All stored features, float16 (len, embed_dim), row i for ``texts[i]``."""
        return torch.from_numpy(np.array(self._features))

    def tokens(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, attention mask) (len(rows), L) int64 of the captions ``rows``."""
        rows = np.asarray(rows)
        ids = torch.from_numpy(self._ids[rows].astype(np.int64))
        lengths = torch.from_numpy(self._lengths[rows].astype(np.int64))
        return ids, (torch.arange(ids.shape[1]) < lengths[:, None]).long()

    def blocks(self, rows: int):
        """(first row, float16 features (<= rows, embed_dim)) over the index, as
        ``Store.blocks`` (read by ``rank.exact_top_k``)."""
        for start in range(0, len(self), rows):
            yield start, self._features[start : start + rows]

    @torch.no_grad()
    def search(
        self, image, k: int = 10, rerank: bool = True, candidates: int = 128
    ) -> list[TextHit]:
        """The ``k`` best captions for ``image`` (a ``PIL.Image`` or a path), best first: ITC
        top-N over every caption, N = max(k, ``candidates``), then (``rerank``) ITM over those
        N, ordered by ITM + ITC as the official image-to-text evaluation."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates!r}")
        if self.model is None:
            raise ValueError(f"{self.root}: load the index with its model to search it")
        if isinstance(image, (str, os.PathLike)):
            image = open_item(Item(os.fspath(image)))
        elif isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            raise TypeError(f"query must be a PIL.Image or an image path, not {type(image)}")
        model, device = self.model, _device(self.model)
        pixels = test_transform(self.manifest["image_size"])(image)[None].to(device)
        with torch.autocast(device.type, enabled=False):
            embeds = model.image_embeds(pixels)
            query = model.image_features(image_embeds=embeds).float()
        itc, rows = rank.exact_top_k(self, query, max(k, candidates) if rerank else k)
        itc, rows = itc[0], rows[0].tolist()
        if not rerank:
            return [TextHit(self.texts[r], float(s), float(s)) for r, s in zip(rows, itc)]
        if self._itm is None:
            self._itm = model.gathered_itm(reranker_dtype(self.precision))
        ids, mask = (t.to(device) for t in self.tokens(rows))
        order, scores, logits = rank.rerank_texts(self._itm, ids, mask, embeds, itc)
        return [
            TextHit(self.texts[rows[i]], float(scores[i]), float(itc[i]), float(logits[i]))
            for i in order[:k].tolist()
        ]


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8") + b"\n"))
