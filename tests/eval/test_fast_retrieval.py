"""Fast retrieval reranking (blip_fast.eval.fast) == the official reference loop."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from blip_fast import create_model, tokenizer
from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
from blip_fast.eval.fast import candidates, fast_scores
from blip_fast.eval.metrics import KEYS
from blip_fast.eval.retrieval import encode_images, encode_texts, evaluate, reference_scores
from blip_fast.models.blip_retrieval import GatheredITM
from blip_fast.ops import PackedLinear


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("syn")
    paths = make_synthetic(
        root, n_train_images=2, n_test_images=8, n_val_images=1, image_size=64, seed=0
    )
    model = create_model("retrieval", "blip_tiny", backend="reference").eval()
    ds = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(64))
    return model, ds, paths


def _encode(model, ds):
    t_embed, ids, mask = encode_texts(model, tokenizer(), ds.text)
    feats, i_embed = encode_images(model, torch.utils.data.DataLoader(ds, batch_size=4))
    return feats, i_embed, t_embed, ids, mask


@pytest.mark.parametrize("k", [1, 5, 100])
def test_fast_scores_equal_reference(setup, k):
    model, ds, _ = setup
    enc = _encode(model, ds)
    ref = reference_scores(model, *enc, k)
    stats = {}
    # tiny batch and budget: several image chunks and pair batches, padding trimmed per batch
    got = fast_scores(model, *enc, k, itm_batch=5, kv_budget_bytes=1, stats=stats)
    for r, g in zip(ref, got):
        assert ((r == -100) == (g == -100)).all()
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    n_img, n_txt = ref[0].shape
    kk = min(k, n_txt), min(k, n_img)
    assert stats["itm_pairs"] <= n_img * kk[0] + n_txt * kk[1]
    assert stats["itm_pairs"] == int(((ref[0] != -100) | (ref[1] != -100).T).sum())


def test_reference_subset_of_queries_gives_their_rows(setup):
    """``queries`` (the benchmark times a share of the loop): the rows it runs are the full
    loop's, the others stay -100."""
    model, ds, _ = setup
    enc = _encode(model, ds)
    full = reference_scores(model, *enc, 5)
    part = reference_scores(model, *enc, 5, queries=(3, 7))
    for f, p, q in zip(full, part, (3, 7)):
        torch.testing.assert_close(p[:q], f[:q], rtol=0, atol=0)
        assert (p[q:] == -100).all() and (f[q:] != -100).any()


@pytest.mark.parametrize("k", [3, 1000])  # 1000 > 8 images and > 40 texts: clamped
def test_evaluate_modes_identical_metrics(setup, k):
    model, ds, _ = setup
    ref = evaluate(model, ds, tokenizer(), k_test=k, mode="reference", return_scores=True)
    fast = evaluate(model, ds, tokenizer(), k_test=k, return_scores=True)
    assert fast["mode"] == "fast" and fast["precision"] == "fp32" and fast["device"] == "cpu"
    assert {key: ref[key] for key in KEYS} == {key: fast[key] for key in KEYS}
    torch.testing.assert_close(fast["scores_i2t"], ref["scores_i2t"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast["scores_t2i"], ref["scores_t2i"], rtol=0, atol=1e-5)
    assert fast["pairs_scored"] == ref["pairs_scored"] == 8 * min(k, 40) + 40 * min(k, 8)
    assert fast["itm_pairs"] < ref["itm_pairs"]
    for phase in ("texts", "images", "kv", "itm", "rerank", "total"):
        assert fast["timing"][phase] >= 0


def test_bf16_fast_matches_reference_candidates_and_scores(setup):
    """Under bf16 autocast both modes select the same candidates (the same fp32 similarity
    matrix) and their ITM scores agree to bf16 rounding; scores come back in fp32."""
    model, ds, _ = setup
    ref = evaluate(
        model, ds, tokenizer(), k_test=5, mode="reference", precision="bf16", return_scores=True
    )
    fast = evaluate(model, ds, tokenizer(), k_test=5, precision="bf16", return_scores=True)
    fp32 = evaluate(model, ds, tokenizer(), k_test=5, return_scores=True)
    assert fast["precision"] == "bf16"
    for key in ("scores_i2t", "scores_t2i"):
        r, f = ref[key], fast[key]
        assert r.dtype == f.dtype == torch.float32
        assert torch.equal(r == -100, f == -100)
        torch.testing.assert_close(f, r, rtol=2e-2, atol=2e-2)
        assert (f - fp32[key]).abs().max() > 0  # bf16 did run


def test_ties_duplicate_captions(setup):
    model, ds, _ = setup
    feats, i_embed, t_embed, ids, mask = _encode(model, ds)
    # every text duplicated: exact similarity ties at the top-k boundary
    t_embed, ids, mask = (torch.cat([x, x]) for x in (t_embed, ids, mask))
    for k in (3, 7):
        ref = reference_scores(model, feats, i_embed, t_embed, ids, mask, k)
        got = fast_scores(model, feats, i_embed, t_embed, ids, mask, k, itm_batch=16)
        i2t, t2i = candidates(i_embed @ t_embed.T, k)
        assert (i2t == (ref[0] != -100)).all() and (t2i == (ref[1] != -100)).all()
        for r, g in zip(ref, got):
            assert ((r == -100) == (g == -100)).all()
            torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def test_trimmed_batches_on_mixed_lengths_equal_padded_reference(setup, monkeypatch):
    """Texts of 3 to 35 tokens: each pair batch runs only as wide as its longest text (no
    35-token padding), on the automatic backends (the C++ kernels on CPU when built), and
    scores as the reference's padded loop."""
    _, ds, _ = setup
    torch.manual_seed(0)
    model = create_model("retrieval", "blip_tiny").eval()
    words = "a dog runs on the green grass near two small red houses by the sea".split()
    texts = [
        " ".join(words[i % len(words)] for i in range(n))
        for n in (1, 40, 2, 16, 4, 33, 8, 1, 23, 5, 11, 40)
    ]
    t_embed, ids, mask = encode_texts(model, tokenizer(), texts)
    assert mask.sum(1).min() == 3 and mask.sum(1).max() == 35
    feats, i_embed = encode_images(model, torch.utils.data.DataLoader(ds, batch_size=4))
    widths = []
    gathered = GatheredITM.forward

    def spy(self, ids, *args):
        widths.append(ids.shape[1])
        return gathered(self, ids, *args)

    monkeypatch.setattr(GatheredITM, "forward", spy)
    ref = reference_scores(model, feats, i_embed, t_embed, ids, mask, 5)
    got = fast_scores(model, feats, i_embed, t_embed, ids, mask, 5, itm_batch=7)
    assert min(widths) == 3 and max(widths) == 35
    for r, g in zip(ref, got):
        assert ((r == -100) == (g == -100)).all()
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("linear", ["reference", "onednn"])
def test_gathered_itm_matches_multimodal(setup, linear):
    _, ds, _ = setup
    torch.manual_seed(0)
    model = create_model("retrieval", "blip_tiny", backend={"linear": linear}).eval()
    feats, _, _, ids, mask = _encode(model, ds)
    index = torch.tensor([3, 0, 3, 7, 1, 5])
    texts = torch.tensor([0, 1, 2, 0, 3, 0])  # text 0 with three images: its queries shared
    itm = model.gathered_itm()
    packed = [m for m in itm.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == (0 if linear == "reference" else 10 * 2 + 1)  # 10 per layer + head
    with torch.no_grad():
        want = model.itm_logits(ids[texts], mask[texts], feats[index])
        got = itm(ids[texts], mask[texts], itm.image_kv(feats), index)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the model itself is untouched: same modules, same parameter objects
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert {id(p) for p in itm.parameters()} <= {id(p) for p in model.parameters()}


def _worker(rank, world, port, root, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("retrieval", "blip_tiny", backend="reference").eval()
    ds = RetrievalEvalDataset(os.path.join(root, "test.json"), root, test_transform(64))
    res = evaluate(model, ds, tokenizer(), k_test=4, return_scores=True, itm_batch=8)
    torch.save(
        {k: res[k] for k in (*KEYS, "scores_i2t", "scores_t2i", "world_size")}, f"{out}.{rank}"
    )
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_single(setup, tmp_path):
    model, ds, paths = setup
    torch.manual_seed(0)
    single_model = create_model("retrieval", "blip_tiny", backend="reference").eval()
    single = evaluate(single_model, ds, tokenizer(), k_test=4, return_scores=True)
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, _free_port(), str(paths["root"]), out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["world_size"] == 2
        assert {k: got[k] for k in KEYS} == {k: single[k] for k in KEYS}
        torch.testing.assert_close(got["scores_i2t"], single["scores_i2t"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["scores_t2i"], single["scores_t2i"], rtol=0, atol=1e-5)


def test_cli_eval_retrieval(setup, tmp_path):
    import blip_fast

    model, ds, paths = setup
    ckpt = tmp_path / "tiny.pth"
    blip_fast.save(model, ckpt, format="official")
    cfg = tmp_path / "retrieval_flickr.yaml"
    cfg.write_text(
        f"image_root: '{paths['image_root']}'\nann_root: 'x'\nimage_size: 64\n"
        f"k_test: 3\nbatch_size_test: 4\nvit: 'base'\n"
    )
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "blip_fast.cli",
        "eval-retrieval",
        "--config",
        str(cfg),
        "--checkpoint",
        str(ckpt),
        "--ann-file",
        str(paths["test"]),
        "--out",
        str(out),
        "--save-scores",
    ]
    subprocess.run(cmd + ["--k-test", "5"], check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    assert res["k_test"] == 5 and res["mode"] == "fast" and res["image_size"] == 64
    ref = evaluate(model, ds, tokenizer(), k_test=5, mode="reference", return_scores=True)
    assert {k: res[k] for k in KEYS} == {k: ref[k] for k in KEYS}
    scores = torch.load(res["scores_file"])
    torch.testing.assert_close(scores["scores_i2t"], ref["scores_i2t"], rtol=0, atol=1e-5)
    # a missing image stops the run naming the file
    ann = json.loads(paths["test"].read_text())
    ann[1]["image"] = "missing/nope.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ann))
    cmd[cmd.index(str(paths["test"]))] = str(bad)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "nope.png" in r.stderr
