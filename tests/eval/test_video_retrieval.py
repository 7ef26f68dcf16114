"""Zero-shot text-to-video retrieval (blip_fast.eval.video): video features as official BLIP
builds them, fast reranking == the official loop, metrics, and the ``eval-video`` command."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blip_fast import create_model, save, tokenizer
from blip_fast.data import test_transform
from blip_fast.data.synthetic_video import make_synthetic_videos
from blip_fast.data.video import VideoRetrievalDataset
from blip_fast.eval.fast import fast_scores
from blip_fast.eval.retrieval import encode_texts, reference_scores
from blip_fast.eval.video import KEYS, encode_videos, evaluate, video_metrics

pytest.importorskip("av", reason="pip install 'blip-fast[video]'")

NUM_FRAMES = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    paths = make_synthetic_videos(
        tmp_path_factory.mktemp("videos"), n_videos=7, num_frames=12, size=64, seed=0
    )
    model = create_model("retrieval", "blip_tiny", backend="reference").eval()
    ds = VideoRetrievalDataset(paths["test"], paths["video_root"], test_transform(64), NUM_FRAMES)
    return model, ds, paths


def _encode(model, ds):
    t_embed, ids, mask = encode_texts(model, tokenizer(), ds.text)
    feats, v_embed = encode_videos(model, torch.utils.data.DataLoader(ds, batch_size=3))
    return feats, v_embed, t_embed, ids, mask


@torch.no_grad()
def test_video_features_are_official(setup):
    """Each video, frame by frame: embed = normalize(mean of vision_proj([CLS])), ITM keys =
    the frames' tokens one after another."""
    model, ds, _ = setup
    feats, embed, *_ = _encode(model, ds)
    n_tok = 1 + (64 // 16) ** 2
    assert feats.shape == (len(ds), NUM_FRAMES * n_tok, 64) and embed.shape == (len(ds), 32)
    for v in range(len(ds)):
        frames = [model.visual_encoder(f[None]) for f in ds[v][0]]
        want_embed = F.normalize(sum(model.vision_proj(f[:, 0]) for f in frames) / NUM_FRAMES)
        torch.testing.assert_close(embed[v], want_embed[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(feats[v], torch.cat(frames, 1)[0], rtol=0, atol=1e-6)


@torch.no_grad()
def test_itm_over_concatenated_frames(setup):
    """A reranked score is the ITM logit of the text cross-attending to all frames' tokens,
    computed explicitly with the text encoder, plus the similarity."""
    model, ds, _ = setup
    enc = _encode(model, ds)
    feats, v_embed, t_embed, ids, mask = enc
    k = 3
    s_v2t, s_t2v = reference_scores(model, *enc, k)
    sims = v_embed @ t_embed.T
    for t in range(len(ds.text)):
        topk = sims[:, t].topk(k).indices
        frames = [torch.cat([model.visual_encoder(f[None]) for f in ds[v][0]], 1) for v in topk]
        text = ids[t : t + 1].clone()
        text[:, 0] = 30523  # [ENC]
        out = model.text_encoder(
            text.expand(k, -1), mask[t : t + 1].expand(k, -1), torch.cat(frames), mode="multimodal"
        )
        want = model.itm_head(out[:, 0])[:, 1] + sims[topk, t]
        torch.testing.assert_close(s_t2v[t, topk], want, rtol=0, atol=1e-5)
    assert ((s_v2t != -100).sum(1) == k).all() and ((s_t2v != -100).sum(1) == k).all()


@pytest.mark.parametrize("k", [1, 3, 100])
def test_fast_scores_equal_reference(setup, k):
    model, ds, _ = setup
    enc = _encode(model, ds)
    ref = reference_scores(model, *enc, k)
    # small batches and a 1-byte K/V budget: one video per chunk, several pair batches
    got = fast_scores(model, *enc, k, itm_batch=4, kv_budget_bytes=1)
    for r, g in zip(ref, got):
        assert torch.equal(r == -100, g == -100)
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def test_video_metrics_hand_computed():
    # three videos, one text each; text t's video ranks 1st, 3rd, 2nd
    t2v = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.3], [0.7, 0.6, 0.0]])
    v2t = torch.eye(3)
    identity = {0: 0, 1: 1, 2: 2}
    m = video_metrics(v2t, t2v, identity, {v: [v] for v in range(3)})
    assert tuple(m) == KEYS
    assert m["txt_r1"] == 100.0 and m["vid_r1"] == pytest.approx(100 / 3)
    assert m["vid_r5"] == 100.0 and m["vid_mdR"] == 2.0
    assert m["r_mean"] == pytest.approx((100.0 + (100 / 3 + 200) / 3) / 2)


def test_evaluate_fast_and_reference_agree(setup):
    model, ds, _ = setup
    fast = evaluate(model, ds, tokenizer(), k_test=3, batch_size=2, return_scores=True)
    batches = torch.utils.data.DataLoader(ds, batch_size=5)
    ref = evaluate(
        model, ds, tokenizer(), k_test=3, mode="reference", loader=batches, return_scores=True
    )
    assert {k: fast[k] for k in KEYS} == {k: ref[k] for k in KEYS}
    torch.testing.assert_close(fast["scores_t2v"], ref["scores_t2v"], rtol=0, atol=1e-5)
    assert fast["pairs_scored"] == ref["pairs_scored"] == 7 * 3 + 7 * 3
    assert fast["itm_pairs"] <= ref["itm_pairs"] == 42 and fast["num_frames"] == NUM_FRAMES
    with pytest.raises(ValueError, match="mode"):
        evaluate(model, ds, tokenizer(), mode="official")


def _eval_video(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip_fast.cli", "eval-video", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_eval_video_command(setup, tmp_path):
    model, _, paths = setup
    save(model, tmp_path / "tiny.pth", format="official")
    args = ["--checkpoint", str(tmp_path / "tiny.pth"), "--ann-file", str(paths["test"])]
    args += ["--video-root", str(paths["video_root"]), "--num-frames", str(NUM_FRAMES)]
    args += ["--k-test", "3", "--batch-size", "4", "--out", str(tmp_path / "r.json")]
    r = _eval_video(args)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    want = evaluate(model, setup[1], tokenizer(), k_test=3)
    assert {k: printed[k] for k in KEYS} == {k: want[k] for k in KEYS}
    assert printed["num_frames"] == NUM_FRAMES and printed["image_size"] == 64
    args[args.index("--video-root") + 1] = str(tmp_path)  # no clips there
    missing = _eval_video(args)
    assert missing.returncode == 1, missing.stderr
    assert f"video not found: {tmp_path / 'video0.mp4'}" in missing.stderr
