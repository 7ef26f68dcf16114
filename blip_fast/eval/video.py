"""Zero-shot text-to-video retrieval, official BLIP's MSRVTT procedure
(``eval_retrieval_video.py``) with an image-text retrieval model.

A video is scored as one "image" whose tokens are those of all its frames:
- ITC: the video feature is the mean over frames of the projected [CLS] features
  ``vision_proj(cls)`` (unnormalised), then L2-normalised;
- ITM: the text cross-attends to the frames' tokens concatenated in frame order,
  (num_frames * Li) keys, e.g. 8 x 577 = 4,616 at 384 px.
Everything else is the image-text procedure of ``blip_fast.eval.retrieval``: top-k candidates
by similarity both ways, re-scored as ITM logit[1] + similarity, -100 elsewhere; ``mode``
"reference" is the official loop (``reference_scores``), "fast" (default) the deduplicated,
K/V-once-per-video reranking of ``blip_fast.eval.fast``, same scores up to float rounding.
Metrics are the official dict: ``txt_r*`` (video-to-text), ``vid_r*`` (text-to-video), the
median text-to-video rank ``vid_mdR`` (1 = first), ``r_mean``.
"""

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from blip_fast.eval import fast
from blip_fast.eval.metrics import ranks_t2i, retrieval_metrics
from blip_fast.eval.retrieval import (
    MODES,
    encode_texts,
    precision_context,
    reference_scores,
    resolve_precision,
)

__all__ = ["KEYS", "encode_frames", "encode_videos", "evaluate", "video_metrics"]

KEYS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "vid_r1",
    "vid_r5",
    "vid_r10",
    "vid_r_mean",
    "vid_mdR",
    "r_mean",
)


@torch.no_grad()
def encode_frames(model, frames, vit=None):
    """frames (B, n, 3, S, S) -> (the frames' tokens concatenated in frame order (B, n * Li,
    W), what ITM reads; the video features (B, D): the mean over frames of the projected
    [CLS] tokens, L2-normalised). ``vit``: a copy of the model's ViT to run instead
    (``VisionTransformer.packed``)."""
    B, n = frames.shape[:2]
    tokens = (vit or model.visual_encoder)(frames.flatten(0, 1))  # (B n, Li, W)
    cls = model.vision_proj(tokens[:, 0]).view(B, n, -1)
    feats = F.normalize(cls.float().mean(1), dim=-1)
    return tokens.reshape(B, n * tokens.shape[1], tokens.shape[2]), feats


@torch.no_grad()
def encode_videos(model, loader, device="cpu", progress=False, mode="reference"):
    """loader yields (frames (B, n, 3, S, S), index) -> video_feats (n_vid, n * Li, W), the
    frames' tokens concatenated in frame order, and video_embed (n_vid, D) normalised
    (``encode_frames``). ``mode`` ``fast``: on the prepacked ViT, as
    ``blip_fast.eval.retrieval.encode_images``."""
    vit = model.visual_encoder.packed(model.backends.get("linear")) if mode == "fast" else None
    feats, embeds = [], []
    for frames, _ in tqdm(loader, desc="videos", disable=not progress):
        tokens, embed = encode_frames(model, frames.to(device), vit)
        feats.append(tokens)
        embeds.append(embed)
    return torch.cat(feats), torch.cat(embeds)


def video_metrics(scores_v2t, scores_t2v, txt2video, video2txt) -> dict:
    """Official ``itm_eval`` of the video script: ``KEYS`` (percentages, ``vid_mdR`` a rank)."""
    metrics = retrieval_metrics(scores_v2t, scores_t2v, txt2video, video2txt)
    metrics = {k.replace("img_", "vid_"): v for k, v in metrics.items()}
    ranks = ranks_t2i(torch.as_tensor(scores_t2v).float(), txt2video)
    metrics["vid_mdR"] = float(np.median(ranks + 1))
    return {k: metrics[k] for k in KEYS}


def evaluate(
    model,
    dataset,
    tokenizer,
    k_test=128,
    batch_size=64,
    device="cpu",
    progress=False,
    mode="fast",
    precision="fp32",
    num_workers=0,
    loader=None,
    return_scores=False,
):
    """Official zero-shot text-to-video retrieval on a ``VideoRetrievalDataset``; returns
    ``video_metrics`` plus ``timing`` (seconds per phase), ``pairs_scored`` (score-matrix
    entries filled, as the official loop), ``itm_pairs`` (ITM forward passes run), ``mode``,
    ``precision``, ``num_frames``; with ``return_scores`` also ``scores_v2t`` (n_vid, n_txt) and
    ``scores_t2v`` (n_txt, n_vid). ``precision`` as ``blip_fast.eval.retrieval.evaluate``: bf16
    applies to the re-ranking only. ``loader``: batches (frames, index) of ``dataset`` in order,
    e.g. ``blip_fast.data.dali.video_batches(dataset, 64)``; by default a DataLoader of
    ``batch_size`` videos and ``num_workers`` decoding processes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    precision = resolve_precision(precision, device)
    model.eval()
    timing = {}
    start = time.perf_counter()
    with precision_context("fp32" if precision == "bf16" else precision, device):
        t0 = time.perf_counter()
        text = encode_texts(model, tokenizer, dataset.text, 256, device, progress, mode)
        timing["texts"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if loader is None:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
            )
        video_feats, video_embed = encode_videos(model, loader, device, progress, mode)
        timing["videos"] = time.perf_counter() - t0
    text_embed, text_ids, text_mask = text
    args = (model, video_feats, video_embed, text_embed, text_ids, text_mask, k_test)
    stats = {}
    with precision_context(precision, device):
        t0 = time.perf_counter()
        if mode == "reference":
            s_v2t, s_t2v = reference_scores(*args, progress=progress, stats=stats)
        else:
            s_v2t, s_t2v = fast.fast_scores(*args, progress=progress, stats=stats)
        timing["rerank"] = time.perf_counter() - t0
    s_v2t, s_t2v = s_v2t.float(), s_t2v.float()
    metrics = video_metrics(s_v2t, s_t2v, dataset.txt2video, dataset.video2txt)
    timing["total"] = time.perf_counter() - start
    n_vid, n_txt = video_embed.shape[0], text_embed.shape[0]
    out = {
        **metrics,
        "timing": timing,
        "pairs_scored": n_vid * min(k_test, n_txt) + n_txt * min(k_test, n_vid),
        "itm_pairs": sum(fast.per_rank(stats["rank_itm_pairs"], s_v2t.device)),
        "mode": mode,
        "precision": precision,
        "num_frames": dataset.num_frames,
    }
    if return_scores:
        out["scores_v2t"], out["scores_t2v"] = s_v2t, s_t2v
    return out
