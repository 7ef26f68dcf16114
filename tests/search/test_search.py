"""Searching an index: exact top-k and ITM reranking against brute force, image queries, CLI."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import blip_fast
from blip_fast import tokenizer
from blip_fast.data import load_image, test_transform
from blip_fast.ops.linear import native_bf16
from blip_fast.search import Index, rank

QUERY = "a small blue triangle on the left of a red circle"


@pytest.fixture
def index(model, photos, tmp_path):
    return Index.build(model, photos, tmp_path / "index", chunk_size=3, progress=False)


def _brute_force(model, index, text, k, candidates):
    """What the official evaluation does for one text: similarities with every stored
    feature, top-N, ITM over those N (the reference, non-gathered path) + similarity, sorted."""
    tok = tokenizer()(text)
    with torch.no_grad():
        query = model.text_features(tok["input_ids"], tok["attention_mask"])
        sims = query @ index.features().float().T
        itc, rows = sims[0].topk(candidates)
        pixels = torch.stack([test_transform(64)(load_image(index.paths[r])) for r in rows])
        n = len(rows)
        logits = model.itm_logits(
            tok["input_ids"].expand(n, -1),
            tok["attention_mask"].expand(n, -1),
            image_embeds=model.image_embeds(pixels),
        )[:, 1]
    scores = logits + itc
    order = scores.argsort(descending=True)[:k]
    return [index.paths[rows[i]] for i in order], scores[order], sims[0]


@pytest.mark.parametrize("block_rows", [1, 2, 5, 100])
def test_exact_top_k_is_brute_force_over_any_blocks(index, block_rows):
    queries = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    sims = queries @ index.features().float().T
    for k in (1, 3, 8, 20):
        got, rows = rank.exact_top_k(index.store, queries, k, block_rows)
        want = sims.topk(min(k, sims.shape[1]))
        assert torch.equal(rows, want.indices)
        torch.testing.assert_close(got, want.values, rtol=0, atol=1e-6)


def test_text_search_reranks_exactly_as_brute_force(model, index):
    paths, scores, _ = _brute_force(model, index, QUERY, k=4, candidates=6)
    hits = index.search(QUERY, k=4, candidates=6)
    assert [h.path for h in hits] == paths
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), scores, rtol=0, atol=1e-5)
    for h in hits:
        assert h.score == pytest.approx(h.itm + h.itc, abs=1e-6)


def test_text_search_without_rerank_is_itc_order(model, index):
    *_, sims = _brute_force(model, index, QUERY, k=1, candidates=1)
    hits = index.search(QUERY, k=5, rerank=False)
    want = sims.topk(5)
    assert [h.path for h in hits] == [index.paths[r] for r in want.indices]
    assert all(h.itm is None for h in hits)
    torch.testing.assert_close(
        torch.tensor([h.score for h in hits]), want.values, atol=1e-6, rtol=0
    )


def test_image_query_finds_the_image_itself_first(model, index):
    path = Path(index.paths[4])
    hits = index.search(path, k=3)
    assert hits[0].path == str(path) and hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    with Image.open(path) as img:
        assert [h.path for h in index.search(img, k=3)] == [h.path for h in hits]
    with pytest.raises(TypeError, match="query must be"):
        index.search(b"bytes", k=3)


def test_a_candidate_deleted_since_indexing_is_left_out(index, photos, caplog):
    before = index.search(QUERY, k=8, candidates=8)
    gone = Path(before[0].path)
    gone.unlink()
    after = index.search(QUERY, k=8, candidates=8)
    assert [h.path for h in after] == [h.path for h in before[1:]]
    assert f"unreadable since indexing: image not found: {gone}" in caplog.text


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "blip_fast.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_index_then_search_prints_json(model, photos, tmp_path):
    blip_fast.save(model, tmp_path / "m.pth", format="official")
    out = tmp_path / "index"
    r = _cli("index", tmp_path / "m.pth", photos, out, "--chunk-size", "3")
    assert r.returncode == 0, r.stderr
    assert f"{out}: 8 images" in r.stdout and "items/s" in r.stderr
    r = _cli("search", out, QUERY, "-k", "3", "--candidates", "5", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    expected = Index.load(out, blip_fast.load(tmp_path / "m.pth", task="retrieval"))
    want = expected.search(QUERY, k=3, candidates=5)
    assert [h["path"] for h in hits] == [h.path for h in want]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in want], abs=1e-5)
    assert set(hits[0]) == {"path", "score", "itc", "itm"}
    r = _cli("search", out, photos / "000002.jpg", "--image", "-k", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[-1] == str(photos / "000002.jpg")


def test_cli_bad_input_exits_with_a_clear_message(model, tmp_path):
    r = _cli("search", tmp_path / "nowhere", "a dog")
    assert r.returncode == 1 and f"not an index: {tmp_path / 'nowhere'}" in r.stderr
    r = _cli("search", tmp_path, "a dog", "-k", "0")
    assert r.returncode == 2 and "-k: 0 must be >= 1" in r.stderr
    blip_fast.save(model, tmp_path / "m.pth", format="official")
    (tmp_path / "empty").mkdir()
    r = _cli("index", tmp_path / "m.pth", tmp_path / "empty", tmp_path / "index")
    assert r.returncode == 1 and f"{tmp_path / 'empty'}: no images" in r.stderr
    assert not (tmp_path / "index").exists()


@pytest.mark.skipif(not native_bf16(), reason="CPU without AMX / AVX512-BF16")
def test_bf16_search_reranks_the_fp32_candidates(model, index):
    """bf16 moves the ITM scores of the same candidates (chosen by fp32 ITC) by no more than
    twice what running the official ITM on the model cast to bf16 does, plus 1e-3."""
    exact = {h.path: h for h in index.search(QUERY, k=8, candidates=8)}
    got = Index.load(index.store.root, model, precision="bf16").search(QUERY, k=8, candidates=8)
    assert sorted(h.path for h in got) == sorted(exact)
    tok = tokenizer()(QUERY)
    pixels = torch.stack([test_transform(64)(load_image(p)) for p in exact])
    text = (tok["input_ids"].expand(len(exact), -1), tok["attention_mask"].expand(len(exact), -1))
    low = copy.deepcopy(model).bfloat16()
    with torch.no_grad():
        want = model.itm_logits(*text, image_embeds=model.image_embeds(pixels))[:, 1]
        floor = low.itm_logits(*text, image_embeds=low.image_embeds(pixels.bfloat16()))[:, 1]
    floor = (floor.float() - want).abs().max().item()
    assert any(h.itm != exact[h.path].itm for h in got)  # the reranker did run in bf16
    for h in got:
        assert h.itc == exact[h.path].itc
        assert abs(h.itm - exact[h.path].itm) <= 2 * floor + 1e-3, (h, exact[h.path], floor)


def test_search_precision_is_checked(model, index):
    with pytest.raises(ValueError, match="search precision must be one of"):
        Index.load(index.store.root, model, precision="fp16")
