"""Approximate ITC candidates through faiss against exact top-k, the saved faiss index, and the
error without faiss."""

import sys

import numpy as np
import pytest
import torch

from blip_fast.search import Index
from blip_fast.search.ann import ANN_FILE, TARGET_RECALL, AnnIndex

try:
    import faiss  # noqa: F401
except ImportError:
    faiss = None
needs_faiss = pytest.mark.skipif(
    faiss is None, reason="faiss is not installed (pip install 'blip-fast[ann]')"
)
QUERY = "a small blue triangle on the left of a red circle"


def _unit_rows(n, dim=32, seed=0):
    feats = torch.nn.functional.normalize(
        torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    return feats.half().numpy()


def _exact(feats, queries, k):
    return (queries @ torch.from_numpy(feats).float().T).topk(k)


def _assert_same_hits(got, want):
    """Same images in the same order; scores equal up to faiss's float32 summation order."""
    assert [h.path for h in got] == [h.path for h in want]
    for field in ("score", "itc", "itm"):
        torch.testing.assert_close(
            torch.tensor([getattr(h, field) for h in got]),
            torch.tensor([getattr(h, field) for h in want]),
            rtol=0,
            atol=1e-6,
        )


@needs_faiss
def test_ivf_probing_every_list_is_exact_top_k():
    feats = _unit_rows(600)
    ann = AnnIndex.build(feats, kind="ivf", nlist=8)
    ann.set_parameter(8)
    queries = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    sims, rows = ann.search(queries, 10)
    want = _exact(feats, queries, 10)
    assert torch.equal(rows, want.indices)
    torch.testing.assert_close(sims, want.values, rtol=0, atol=1e-5)


@needs_faiss
@pytest.mark.parametrize("hnsw_max_items, kind", [(10_000, "hnsw"), (100, "ivf")])
def test_kind_by_size_and_calibrated_recall(hnsw_max_items, kind, monkeypatch):
    monkeypatch.setattr("blip_fast.search.ann.HNSW_MAX_ITEMS", hnsw_max_items)
    feats = _unit_rows(2000)
    ann = AnnIndex.build(feats)
    assert ann.record["kind"] == kind
    assert ann.record["recall"] >= TARGET_RECALL
    queries = torch.from_numpy(feats[:50]).float()
    rows = ann.search(queries, 10)[1]
    want = _exact(feats, queries, 10).indices
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(rows, want)])
    assert recall >= 0.9


@needs_faiss
def test_saved_index_answers_as_the_built_one(tmp_path):
    feats = _unit_rows(500)
    ann = AnnIndex.build(feats, kind="ivf", nlist=10)
    ann.save(tmp_path)
    loaded = AnnIndex.load(tmp_path)
    assert loaded.record == ann.record
    queries = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    for got, want in zip(loaded.search(queries, 7), ann.search(queries, 7)):
        assert torch.equal(got, want)


@needs_faiss
def test_approximate_search_reranks_the_exact_candidates(model, photos, tmp_path):
    index = Index.build(model, photos, tmp_path / "index", chunk_size=3, progress=False)
    exact = index.search(QUERY, k=4, candidates=6)
    approximate = index.search(QUERY, k=4, candidates=6, exact=False)
    _assert_same_hits(approximate, exact)  # 8 images: the graph search visits all of them
    saved = tmp_path / "index" / ANN_FILE
    written = saved.stat().st_mtime_ns
    reopened = Index.load(tmp_path / "index", model)
    _assert_same_hits(reopened.search(QUERY, k=4, candidates=6, exact=False), exact)
    assert saved.stat().st_mtime_ns == written  # the saved faiss index answered


def test_without_faiss_approximate_search_names_the_extra(model, photos, tmp_path, monkeypatch):
    index = Index.build(model, photos, tmp_path / "index", chunk_size=3, progress=False)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ImportError, match=r"blip-fast\[ann\]"):
        index.search(QUERY, k=2, exact=False)
    assert len(index.search(QUERY, k=2, candidates=3)) == 2  # exact search needs no faiss


# tokens: fp16 rounding (2^-11 relative); int8, half a step of absmax / 127 plus the rounding of
# the fp16 scale, at most 4.5e-3 of the largest |token|. ITM logits: as measured, with margin.
@pytest.mark.parametrize("fmt, token_tol, itm_tol", [("fp16", 1e-3, 1e-5), ("int8", 5e-3, 3e-4)])
def test_rerank_with_stored_tokens_matches_recomputed(
    model, photos, tmp_path, fmt, token_tol, itm_tol
):
    recomputed = Index.build(model, photos, tmp_path / "plain", chunk_size=3, progress=False)
    stored = Index.build(
        model, photos, tmp_path / fmt, store_tokens=fmt, chunk_size=3, progress=False
    )
    rows = [5, 0, 7, 2]  # across chunks, out of order
    with torch.no_grad():
        [(kept, want)] = recomputed._candidate_tokens(rows)  # images only: one group
    assert kept == [0, 1, 2, 3]
    scale = float(want.abs().max())
    torch.testing.assert_close(stored.store.tokens(rows), want, rtol=0, atol=token_tol * scale)
    hits, want_hits = (i.search(QUERY, k=8, candidates=8) for i in (stored, recomputed))
    if fmt == "fp16":
        assert [h.path for h in hits] == [h.path for h in want_hits]
    want_itm = {h.path: h.itm for h in want_hits}
    torch.testing.assert_close(
        torch.tensor([h.itm for h in hits]),
        torch.tensor([want_itm[h.path] for h in hits]),
        rtol=0,
        atol=itm_tol,
    )
