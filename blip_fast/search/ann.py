"""Approximate ITC candidates through faiss (optional: ``pip install blip-fast[ann]``).

An inner-product faiss index over the stored features (normalised, so inner product is cosine
similarity), saved beside the index as plain faiss files, no pickle:

    ann.faiss    faiss.write_index of the index over rows 0 .. rows-1
    ann.json     {"kind", "rows", "param", "value", "recall"}: what it covers, the search
                 parameter chosen for recall and the recall it reached

Which index, by collection size:
- up to ``HNSW_MAX_ITEMS`` images, HNSW (graph, M = 32): no training, the best recall per
  query time at this size; its build cost (~N log N graph insertions) and its links (~256 B
  per item on top of the vector) are what rule it out for larger collections;
- above, IVFFlat with nlist ~ 4 sqrt(N) lists: a k-means over a sample, then one assignment
  per item, so it builds in a fraction of HNSW's time, stores just the vectors, and a query
  scans nprobe / nlist of them.

The search parameter (HNSW's efSearch, IVF's nprobe) is chosen at build: doubled from a small
value until the top-``CALIBRATION_K`` of ``CALIBRATION_QUERIES`` stored features (as queries)
agree with the exact ones at ``TARGET_RECALL``, or it is exhaustive. A collection that grew
since (``Index.add``) gets a new index at its next approximate search.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from blip_fast.search.store import Store
from blip_fast.train.checkpoint import atomic_write

__all__ = ["ANN_FILE", "AnnIndex", "require_faiss"]

ANN_FILE, ANN_RECORD = "ann.faiss", "ann.json"
HNSW_MAX_ITEMS = 200_000
HNSW_M = 32
TARGET_RECALL = 0.95
CALIBRATION_QUERIES, CALIBRATION_K = 100, 10
# k-means: a sample of 40 points per list (faiss warns below 39) and 10 iterations, which at
# nlist = 4 sqrt(N) bound the training cost at a few N-item assignment passes
TRAIN_PER_LIST, KMEANS_ITERATIONS = 40, 10


def require_faiss():
    """The faiss module, or ImportError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "approximate search needs faiss: pip install 'blip-fast[ann]' (faiss-cpu)"
        ) from None
    return faiss


def _ivf(faiss, feats: np.ndarray, nlist: int | None, seed: int):
    n, dim = feats.shape
    nlist = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))  # >= 39 points a list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = feats[rng.choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False)]
    index.cp.seed, index.cp.niter = seed, KMEANS_ITERATIONS
    index.train(sample)
    return index, "nprobe", nlist


def _hnsw(faiss, feats: np.ndarray):
    index = faiss.IndexHNSWFlat(feats.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    return index, "efSearch", max(len(feats), 16)


class AnnIndex:
    """A faiss index over a ``Store``'s features; ``search(query, k)`` as ``exact_top_k``."""

    def __init__(self, index, record: dict):
        self.index, self.record = index, record
        self.set_parameter(record["value"])

    def set_parameter(self, value: int, param: str | None = None) -> None:
        """Search with ``param`` (default: the calibrated one, ``record["param"]``) at
        ``value``; the record keeps the calibrated value."""
        param = param or self.record["param"]
        require_faiss().ParameterSpace().set_index_parameter(self.index, param, value)

    @classmethod
    def build(
        cls, feats: np.ndarray, kind: str | None = None, nlist: int | None = None, seed: int = 0
    ) -> AnnIndex:
        """An index over ``feats`` (N, D): ``kind`` "hnsw" or "ivf" (default by N, module
        docstring), ``nlist`` IVF lists (default ~ 4 sqrt(N)); its search parameter is
        calibrated for recall."""
        faiss = require_faiss()
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.ndim != 2 or len(feats) == 0:
            raise ValueError(f"need features (N >= 1, D) to index, got shape {feats.shape}")
        kind = kind or ("hnsw" if len(feats) <= HNSW_MAX_ITEMS else "ivf")
        if kind == "ivf":
            index, param, most = _ivf(faiss, feats, nlist, seed)
        elif kind == "hnsw":
            index, param, most = _hnsw(faiss, feats)
        else:
            raise ValueError(f"kind must be 'hnsw' or 'ivf', got {kind!r}")
        index.add(feats)
        ann = cls(index, {"kind": kind, "rows": len(feats), "param": param, "value": 1})
        ann._calibrate(feats, most, seed)
        return ann

    def _calibrate(self, feats: np.ndarray, most: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        queries = feats[rng.choice(len(feats), min(len(feats), CALIBRATION_QUERIES), False)]
        k = min(CALIBRATION_K, len(feats))
        exact = torch.from_numpy(queries @ feats.T).topk(k).indices.numpy()
        value = 8 if self.record["param"] == "nprobe" else 16
        while True:
            value = min(value, most)
            self.set_parameter(value)
            found = self.index.search(queries, k)[1]
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)])
            if recall >= TARGET_RECALL or value == most:
                break
            value *= 2
        self.record.update(value=value, recall=float(recall))

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (Q, D) -> (similarities (Q, k'), rows (Q, k')) best first, k' = min(k, rows).
        IVF lists probed that hold fewer than k' vectors in all make it probe every list."""
        k = min(k, self.record["rows"])
        query = np.ascontiguousarray(query.float().cpu().numpy())
        sims, rows = self.index.search(query, k)
        if (rows < 0).any():
            self.set_parameter(self.index.nlist, "nprobe")
            sims, rows = self.index.search(query, k)
            self.set_parameter(self.record["value"])
        return torch.from_numpy(sims), torch.from_numpy(rows)

    def save(self, folder) -> None:
        """``ann.faiss`` and ``ann.json`` in ``folder``, each written atomically."""
        data = require_faiss().serialize_index(self.index)
        atomic_write(folder / ANN_FILE, lambda f: f.write(data.tobytes()))
        record = json.dumps(self.record, indent=1).encode("utf-8") + b"\n"
        atomic_write(folder / ANN_RECORD, lambda f: f.write(record))

    @classmethod
    def load(cls, folder) -> AnnIndex:
        faiss = require_faiss()
        record = json.loads((folder / ANN_RECORD).read_text(encoding="utf-8"))
        index = faiss.deserialize_index(np.fromfile(folder / ANN_FILE, dtype=np.uint8))
        if index.ntotal != record["rows"]:
            raise ValueError(
                f"{folder / ANN_FILE} holds {index.ntotal} vectors, {ANN_RECORD} says "
                f"{record['rows']}"
            )
        return cls(index, record)

    @classmethod
    def for_store(cls, store: Store) -> AnnIndex:
        """The saved index of ``store`` if it covers every row, else a new one, saved (all
        features in memory as float32, as faiss holds them)."""
        require_faiss()
        if (store.root / ANN_RECORD).exists():
            try:
                ann = cls.load(store.root)
            except ValueError:  # a build killed between its two files: build it again
                ann = None
            if ann is not None and ann.record["rows"] == len(store):
                return ann
        ann = cls.build(store.features())
        ann.save(store.root)
        return ann
