"""Image-text retrieval evaluation, the official procedure (docs/architecture.md, "Retrieval
evaluation") as the reference.

Texts and images are encoded in batches; then for every image the top-k texts by cosine
similarity are re-scored with the ITM head (score = itm logit[1] + similarity), and the same
for every text over the top-k images; everything else stays -100. ``evaluate`` runs it in
``mode="fast"`` (``blip_fast.eval.fast``: same scores, deduplicated pairs, per-image cross K/V
computed once, batched) by default, or ``mode="reference"`` (``reference_scores``).
Under torch.distributed every rank encodes every text and image (as official BLIP) and the
re-ranking, nearly all of the work, is split across ranks; every rank gets the single-process
scores.
Precision ``bf16`` applies to the re-ranking (autocast; on CPU the text encoder's GEMMs run
oneDNN's bf16 kernels on prepacked weights): the unimodal features and their similarities stay
fp32, so the candidates are exactly the fp32 run's and only their ITM scores change. A CPU
without native bf16 (AMX or AVX512-BF16) runs fp32 instead, saying so in one log line.
"""

import contextlib
import logging
import time

import torch
from tqdm import tqdm

from blip_fast.eval import fast
from blip_fast.eval.metrics import retrieval_metrics
from blip_fast.ops.linear import native_bf16

MODES = ("fast", "reference")
PRECISIONS = ("fp32", "tf32", "bf16")
log = logging.getLogger("blip_fast")


@torch.no_grad()
def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def encode_texts(
    model, tokenizer, texts, batch_size=256, device="cpu", progress=False, mode="reference"
):
    """-> text_embed (n_txt, D) normalised, ids (n_txt, 35) [CLS] first, mask (n_txt, 35).
    ``mode`` ``fast``: the same features up to float rounding, with less work
    (``fast.text_features``); ``reference``: ``model.text_features`` in batches, as official."""
    _check_mode(mode)
    tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=35)
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    if mode == "fast":
        return fast.text_features(model, ids, mask, batch_size, progress), ids, mask
    embeds = [
        model.text_features(ids[i : i + batch_size], mask[i : i + batch_size])
        for i in tqdm(range(0, len(ids), batch_size), desc="texts", disable=not progress)
    ]
    return torch.cat(embeds), ids, mask


@torch.no_grad()
def encode_images(model, loader, device="cpu", progress=False, mode="reference"):
    """loader yields (pixels (B, 3, S, S), index) -> image_feats (n_img, N, W) all tokens,
    image_embed (n_img, D) normalised. ``mode`` ``fast``: the ViT's linear layers prepacked, its
    GELUs inside their GEMMs (``VisionTransformer.packed``): the same up to float rounding."""
    _check_mode(mode)
    vit = model.visual_encoder
    if mode == "fast":
        vit = vit.packed(model.backends.get("linear"))
    feats, embeds = [], []
    for pixels, _ in tqdm(loader, desc="images", disable=not progress):
        f = vit(pixels.to(device))
        feats.append(f)
        embeds.append(model.image_features(image_embeds=f))
    return torch.cat(feats), torch.cat(embeds)


@torch.no_grad()
def reference_scores(
    model,
    image_feats,
    image_embed,
    text_embed,
    text_ids,
    text_mask,
    k_test: int,
    progress=False,
    queries: tuple[int, int] | None = None,
    stats: dict | None = None,
):
    """The official re-ranking loop, one query and its k candidates at a time.
    Returns score_i2t (n_img, n_txt) and score_t2i (n_txt, n_img), fp32 at any precision.
    ``queries`` (i, t): run only the first i image and t text queries (their rows are the full
    loop's; the other rows stay -100), for timing a share of a long loop. Multi-process: the
    query rows are split evenly across ranks (as official BLIP) and summed with one all-reduce.
    ``stats`` (optional dict) receives ``rank_itm_pairs`` (pairs this rank ran)."""
    rank, world = fast.rank_world()
    sims = fast.similarities(image_embed, text_embed)
    n_img, n_txt = sims.shape
    q_img, q_txt = queries or (n_img, n_txt)
    # each rank writes -100 and its scores into its own rows only, zero elsewhere: the sum over
    # ranks is the single-process matrix
    img_lo, img_hi = n_img * rank // world, n_img * (rank + 1) // world
    txt_lo, txt_hi = n_txt * rank // world, n_txt * (rank + 1) // world
    score_i2t = sims.new_zeros((n_img, n_txt))
    score_i2t[img_lo:img_hi] = -100.0
    k_txt, k_img = min(k_test, n_txt), min(k_test, n_img)
    img_rows = range(img_lo, min(img_hi, q_img))
    for i in tqdm(img_rows, desc="i2t rerank", disable=not progress):
        topk_sim, topk_idx = sims[i].topk(k_txt)
        logits = model.itm_logits(text_ids[topk_idx], text_mask[topk_idx], image_feats[i : i + 1])
        score_i2t[i, topk_idx] = logits[:, 1] + topk_sim
    score_t2i = sims.new_zeros((n_txt, n_img))
    score_t2i[txt_lo:txt_hi] = -100.0
    txt_rows = range(txt_lo, min(txt_hi, q_txt))
    for j in tqdm(txt_rows, desc="t2i rerank", disable=not progress):
        topk_sim, topk_idx = sims[:, j].topk(k_img)
        logits = model.itm_logits(
            text_ids[j : j + 1].expand(k_img, -1),
            text_mask[j : j + 1].expand(k_img, -1),
            image_feats[topk_idx],
        )
        score_t2i[j, topk_idx] = logits[:, 1] + topk_sim
    if stats is not None:
        stats["rank_itm_pairs"] = len(img_rows) * k_txt + len(txt_rows) * k_img
    return fast.sum_over_ranks(score_i2t, score_t2i)


def resolve_precision(precision: str, device) -> str:
    """``precision``, except bf16 on a CPU without native bf16: fp32, with one log line."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and torch.device(device).type == "cpu" and not native_bf16():
        log.warning("bf16 requested, but this CPU has neither AMX nor AVX512-BF16: running fp32")
        return "fp32"
    return precision


@contextlib.contextmanager
def precision_context(precision: str, device):
    """fp32 (tf32 off on CUDA), tf32 (TF32 matmuls on CUDA; CPU: as fp32), bf16 (autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = torch.device(device).type
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision == "bf16":
            with torch.autocast(dev, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


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
    itm_batch=None,
    kv_budget_bytes=None,
    return_scores=False,
):
    """Official retrieval evaluation on a ``RetrievalEvalDataset``; returns the metric dict
    plus ``timing`` (this rank's seconds per phase), ``pairs_scored`` (score-matrix entries
    filled, as the official loop), ``itm_pairs`` (ITM forward passes actually run, all ranks),
    ``itm_pairs_per_rank``, ``mode``, ``device``, ``precision``, ``world_size``; with
    ``return_scores`` also ``scores_i2t`` / ``scores_t2i``.

    mode ``fast`` (default, ``blip_fast.eval.fast``): deduplicated candidate pairs, per-image
    cross K/V computed once, large gathered batches; same scores as ``reference`` (the official
    loop, one query at a time) up to float rounding. Under torch.distributed both modes split
    the re-ranking across ranks and every rank returns the single-process result."""
    _check_mode(mode)
    precision = resolve_precision(precision, device)
    model.eval()
    timing = {}
    start = time.perf_counter()
    # bf16 reranks only: the features that choose the candidates are fp32 (module docstring)
    with precision_context("fp32" if precision == "bf16" else precision, device):
        t0 = time.perf_counter()
        text_embed, text_ids, text_mask = encode_texts(
            model, tokenizer, dataset.text, 256, device, progress, mode
        )
        timing["texts"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        image_feats, image_embed = encode_images(model, loader, device, progress, mode)
        timing["images"] = time.perf_counter() - t0
    with precision_context(precision, device):
        t0 = time.perf_counter()
        n_img, n_txt = image_embed.shape[0], text_embed.shape[0]
        stats = {}
        if mode == "reference":
            s_i2t, s_t2i = reference_scores(
                model,
                image_feats,
                image_embed,
                text_embed,
                text_ids,
                text_mask,
                k_test,
                progress,
                stats=stats,
            )
        else:
            s_i2t, s_t2i = fast.fast_scores(
                model,
                image_feats,
                image_embed,
                text_embed,
                text_ids,
                text_mask,
                k_test,
                itm_batch or fast.ITM_BATCH,
                kv_budget_bytes or fast.KV_BUDGET_BYTES,
                progress,
                stats,
            )
            timing["kv"], timing["itm"] = stats["kv_s"], stats["itm_s"]
        timing["rerank"] = time.perf_counter() - t0
    s_i2t, s_t2i = s_i2t.float(), s_t2i.float()
    t0 = time.perf_counter()
    metrics = retrieval_metrics(s_i2t, s_t2i, dataset.txt2img, dataset.img2txt)
    timing["metrics"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - start
    pairs = n_img * min(k_test, n_txt) + n_txt * min(k_test, n_img)
    per_rank = fast.per_rank(stats["rank_itm_pairs"], s_i2t.device)
    out = {
        **metrics,
        "timing": timing,
        "pairs_scored": pairs,
        "itm_pairs": sum(per_rank),
        "itm_pairs_per_rank": per_rank,
        "mode": mode,
        "device": str(torch.device(device)),
        "precision": precision,
        "world_size": len(per_rank),
    }
    if return_scores:
        out["scores_i2t"], out["scores_t2i"] = s_i2t, s_t2i
    return out
