"""Caption index: an image query ranks captions as brute force does (ITC top-N, then ITM over
the same N, same order), from Python and from the command line."""

import copy
import json
import subprocess
import sys

import pytest
import torch

import blip_fast
from blip_fast import tokenizer
from blip_fast.data import load_image, test_transform
from blip_fast.search import TextIndex

CAPTIONS = [
    "a red circle",
    "a small blue triangle on the left of a red circle",
    "two green squares",
    "a yellow star above a purple line and a very long tail of words to pad the batch",
    "an empty white picture",
    "a red square next to a blue circle",
    "three dots",
]


@pytest.fixture
def captions(model, tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    return TextIndex.build(model, tmp_path / "captions.json", tmp_path / "captions.index")


def _brute_force(model, image_path, k, candidates):
    """Official image-to-text: similarity with every caption's feature, top-N, ITM of the
    image with each of those N captions (reference path, image tokens broadcast) + similarity."""
    tok = tokenizer()(CAPTIONS)
    with torch.no_grad():
        embeds = model.image_embeds(test_transform(64)(load_image(image_path))[None])
        sims = (
            model.image_features(image_embeds=embeds)
            @ model.text_features(tok["input_ids"], tok["attention_mask"]).T
        )
        itc, rows = sims[0].topk(candidates)
        logits = model.itm_logits(
            tok["input_ids"][rows], tok["attention_mask"][rows], image_embeds=embeds
        )[:, 1]
    scores = logits + itc
    order = scores.argsort(descending=True)[:k]
    return [CAPTIONS[rows[i]] for i in order], scores[order], sims[0]


@pytest.mark.parametrize("k, candidates", [(3, 5), (7, 7), (2, 1)])
def test_image_query_reranks_captions_as_brute_force(
    model, captions, synthetic_images, k, candidates
):
    texts, scores, _ = _brute_force(model, synthetic_images[3], k, max(k, candidates))
    hits = captions.search(synthetic_images[3], k=k, candidates=candidates)
    assert [h.text for h in hits] == texts
    torch.testing.assert_close(torch.tensor([h.score for h in hits]), scores, rtol=0, atol=1e-4)
    for h in hits:
        assert h.score == pytest.approx(h.itm + h.itc, abs=1e-6)


def test_without_rerank_is_itc_order_and_features_round_trip(model, captions, synthetic_images):
    *_, sims = _brute_force(model, synthetic_images[0], 1, 1)
    hits = captions.search(load_image(synthetic_images[0]), k=4, rerank=False)
    want = sims.topk(4)
    assert [h.text for h in hits] == [CAPTIONS[r] for r in want.indices]
    assert all(h.itm is None for h in hits)
    torch.testing.assert_close(torch.tensor([h.itc for h in hits]), want.values, atol=2e-3, rtol=0)
    tok = tokenizer()(CAPTIONS)
    ids, mask = captions.tokens(range(len(CAPTIONS)))
    assert torch.equal(ids, tok["input_ids"]) and torch.equal(mask, tok["attention_mask"])
    reloaded = TextIndex(captions.root, model)
    assert reloaded.texts == CAPTIONS and torch.equal(reloaded.features(), captions.features())


def test_bad_input_is_refused_with_the_culprit_named(model, captions, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps(["a dog", " "]))
    with pytest.raises(ValueError, match="bad.json: caption 1 is empty"):
        TextIndex.build(model, tmp_path / "bad.json", tmp_path / "x")
    (tmp_path / "dict.json").write_text(json.dumps({"a": "dog"}))
    with pytest.raises(ValueError, match="dict.json: expected a JSON list of captions"):
        TextIndex.build(model, tmp_path / "dict.json", tmp_path / "x")
    with pytest.raises(FileExistsError, match="already holds an index"):
        TextIndex.build(model, tmp_path / "captions.json", captions.root)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.text_proj.weight.mul_(2)
    with pytest.raises(ValueError, match="built with another model"):
        TextIndex(captions.root, other)
    with pytest.raises(TypeError, match="query must be a PIL.Image or an image path"):
        captions.search(b"bytes")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        captions.search(tmp_path / "img.jpg", k=0)


def _cli(*args):
    cmd = [sys.executable, "-m", "blip_fast.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_builds_from_a_text_file_and_answers_an_image(model, synthetic_images, tmp_path):
    blip_fast.save(model, tmp_path / "m.pth", format="official")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n\n")
    out = tmp_path / "captions.index"
    r = _cli("index", tmp_path / "m.pth", tmp_path / "captions.txt", out, "--texts")
    assert r.returncode == 0, r.stderr
    assert f"{out}: {len(CAPTIONS)} captions" in r.stdout
    r = _cli(
        "search", out, synthetic_images[5], "--image", "-k", "3", "--candidates", "5", "--json"
    )
    assert r.returncode == 0, r.stderr
    loaded = blip_fast.load(tmp_path / "m.pth", task="retrieval")
    want = TextIndex(out, loaded).search(synthetic_images[5], k=3, candidates=5)
    assert [h["text"] for h in json.loads(r.stdout)] == [h.text for h in want]
    r = _cli("search", out, "a dog")
    assert r.returncode == 1 and "is a caption index: it answers an image query" in r.stderr
