"""Fast retrieval reranking: the official scores, computed with less work (docs/architecture.md,
"Retrieval evaluation" and "Batched ITM reranking").

Same candidates and the same score formula as ``reference_scores`` (score = ITM logit[1] +
similarity, every other entry -100), but:
- the union of the i2t candidates (top-k texts per image) and the t2i candidates (top-k images
  per text) is deduplicated and every (image, text) pair goes through the ITM encoder ONCE;
- the cross-attention K / V of every text layer are computed once per image (images in chunks
  sized from a byte budget, so memory stays bounded), and pairs read them by image index through
  ``ops.gathered_cross_attention`` instead of recomputing them per pair;
- pairs run in large batches (sorted by text length, then text, inside a chunk), each trimmed
  to its longest text (dropping padding changes a logit by < 4e-7); inside a batch
  the text-only part of the first layer (self-attention, cross-attention queries) runs once per
  distinct text, and the last layer only for the [ENC] token the ITM head reads
  (``blip_fast.models.blip_retrieval.GatheredITM``);
- the text encoder's linear layers run prepacked oneDNN GEMMs on CPU (``ops.prepack_linears``:
  2.1-2.4x MKL's fp32 throughput on AMD EPYC, where MKL takes its AVX2 path); under bf16
  autocast the reranker runs an all-bf16 copy of the text encoder (``reranker_dtype``): bf16
  GEMMs on AMX with no cast between layers.
The similarities that choose the candidates are fp32 at any precision (``similarities``).
Top-k candidates are selected with exactly the reference's calls, so ties at the k-th place
resolve identically. Multi-process (torch.distributed initialised): rank 0's embeddings are
broadcast (every rank selects the same candidates), images - with their pairs - are split across
ranks balancing the pair count, each rank adds its scores into zero matrices, one all-reduce
(sum), and -100 is written once afterwards: the result is the single-process matrix for any
world size.
"""

import time

import torch
import torch.distributed as dist
from tqdm import tqdm

KV_BUDGET_BYTES = 1 << 30  # per-image cross K/V of all layers held at once (default 1 GiB)
# Pairs per ITM forward, measured on blip_small_demo, k 32, 2-core AMD EPYC shared with other jobs:
# smaller GEMMs stay in cache (1 thread, 50 images x 250 texts: 14.1 s at 64, 17.0 s at 256), but
# under CPU contention many small parallel regions stall (2 threads, load ~5, 20 x 100: 17.7 s at
# 64, 8.6 s at 128, 5.7 s at 256); 128 is the compromise. Re-checked with the oneDNN GEMMs
# (2 threads, quiet, 200 x 1000, k 32, two runs each): 16.0-17.3 s at 128, 16.5-16.6 s at 192,
# 16.7-17.4 s at 256, within the VM's noise.
ITM_BATCH = 128


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Element-wise sums over all ranks of ``tensors`` (one dtype; one all-reduce); the tensors
    themselves in a world of one."""
    if rank_world()[1] == 1:
        return tensors
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return tuple(part.view_as(t) for part, t in zip(parts, tensors))


def per_rank(count: int, device) -> list[int]:
    """``count`` of every rank, in rank order (a sum over ranks of one-hot rows)."""
    rank, world = rank_world()
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[rank] = count
    return sum_over_ranks(counts)[0].tolist()


def similarities(image_embed: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """ITC similarities (n_img, n_txt) in fp32 whatever the precision: they choose the
    candidates, so a bf16 reranking scores exactly the pairs an fp32 one does."""
    with torch.autocast(image_embed.device.type, enabled=False):
        return image_embed.float() @ text_embed.float().t()


@torch.no_grad()
def candidates(sims: torch.Tensor, k_test: int):
    """Boolean candidate masks exactly as the official loop selects them (same ``topk`` calls):
    i2t (n_img, n_txt) top-k texts per image, t2i (n_txt, n_img) top-k images per text."""
    n_img, n_txt = sims.shape
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    i2t = torch.zeros(n_img, n_txt, dtype=torch.bool, device=sims.device)
    t2i = torch.zeros(n_txt, n_img, dtype=torch.bool, device=sims.device)
    for i in range(n_img):
        i2t[i, sims[i].topk(k_i2t).indices] = True
    for j in range(n_txt):
        t2i[j, sims[:, j].topk(k_t2i).indices] = True
    return i2t, t2i


def _rank_image_range(pairs_per_image: torch.Tensor, rank: int, world: int):
    """Contiguous image range [lo, hi) of ``rank`` balancing the number of pairs."""
    if world == 1:
        return 0, pairs_per_image.numel()
    cum = torch.cumsum(pairs_per_image.double().cpu(), 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    bounds = (
        [0]
        + [int(torch.searchsorted(cum, total * r / world, right=True)) for r in range(1, world)]
        + [pairs_per_image.numel()]
    )
    return bounds[rank], bounds[rank + 1]


@torch.no_grad()
def text_features(model, ids, mask, batch_size=256, progress=False) -> torch.Tensor:
    """``model.text_features`` of every text (ids, mask (n, L)), the same up to float rounding
    with less work: texts batched by length, each batch trimmed to its longest (a padded key's
    softmax weight is exactly 0 in fp32), the text encoder's linear layers prepacked and its
    last layer run for [CLS] alone (``BertModel.packed``, ``first_token_only``)."""
    encoder = model.text_encoder.packed(model.backends.get("linear"))
    order = mask.sum(1).argsort(descending=True, stable=True)
    parts = []
    for rows in tqdm(order.split(batch_size), desc="texts", disable=not progress):
        n = int(mask[rows].sum(1).max())
        parts.append(model.text_features(ids[rows, :n], mask[rows, :n], encoder=encoder))
    sorted_features = torch.cat(parts)
    features = torch.empty_like(sorted_features)
    features[order] = sorted_features
    return features


def reranker_dtype(device) -> torch.dtype | None:
    """bf16 under bf16 autocast: the reranker then runs an all-bf16 copy of the text encoder
    (``GatheredITM``), the scores' similarities stay fp32. None otherwise: the model's weights
    under whatever autocast the caller set (fp16's range is too narrow for an all-fp16 copy)."""
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        return torch.bfloat16
    return None


@torch.no_grad()
def fast_scores(
    model,
    image_feats,
    image_embed,
    text_embed,
    text_ids,
    text_mask,
    k_test: int,
    itm_batch: int = ITM_BATCH,
    kv_budget_bytes: int = KV_BUDGET_BYTES,
    progress: bool = False,
    stats: dict | None = None,
):
    """Same contract as ``reference_scores``: -> score_i2t (n_img, n_txt), score_t2i (n_txt,
    n_img). ``stats`` (optional dict) receives ``itm_pairs`` (unique pairs through the ITM
    encoder, all ranks), ``rank_itm_pairs`` (those this rank ran), ``kv_s`` and ``itm_s``
    (this rank's seconds)."""
    rank, world = rank_world()
    if world > 1:  # a pair missed or scored twice if ranks' numerics chose other candidates
        image_embed, text_embed = image_embed.clone(), text_embed.clone()
        dist.broadcast(image_embed, 0)
        dist.broadcast(text_embed, 0)
    sims = similarities(image_embed, text_embed)
    n_img, n_txt = sims.shape
    i2t, t2i = candidates(sims, k_test)
    union = i2t | t2i.t()
    img_idx, txt_idx = union.nonzero(as_tuple=True)  # row-major: grouped by image
    per_image = union.sum(1)
    lo, hi = _rank_image_range(per_image, rank, world)

    logits = sims.new_zeros(img_idx.numel())
    lengths = text_mask.sum(1)
    # bytes of all layers' cross K/V for one image
    layers = model.text_encoder.encoder.layer
    n_tok = image_feats.shape[1]
    hidden = model.text_encoder.cfg.hidden_size
    per_image_bytes = len(layers) * 2 * n_tok * hidden * image_feats.element_size()
    chunk = max(1, int(kv_budget_bytes // max(per_image_bytes, 1)))
    starts = torch.cat([per_image.new_zeros(1), torch.cumsum(per_image, 0)]).tolist()
    itm = model.gathered_itm(reranker_dtype(sims.device))
    kv_s = itm_s = 0.0
    ran = 0
    for c0 in tqdm(range(lo, hi, chunk), desc="rerank", disable=not progress):
        c1 = min(c0 + chunk, hi)
        p0, p1 = starts[c0], starts[c1]
        if p1 == p0:
            continue
        t0 = time.perf_counter()
        kv = itm.image_kv(image_feats[c0:c1])
        kv_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        sel = torch.arange(p0, p1, device=sims.device)
        # by (length, text): little padding per batch, and a text's pairs share its
        # text-only first-layer work (``GatheredITM``)
        sel = sel[torch.argsort(lengths[txt_idx[sel]] * n_txt + txt_idx[sel], stable=True)]
        for b in range(0, sel.numel(), itm_batch):
            s = sel[b : b + itm_batch]
            t = txt_idx[s]
            L = int(lengths[t].max())
            out = itm(text_ids[t, :L], text_mask[t, :L], kv, img_idx[s] - c0)
            logits[s] = out[:, 1].float()
            ran += s.numel()
        itm_s += time.perf_counter() - t0
        del kv

    # scatter into both matrices: this rank's pairs only, zero elsewhere, then one all-reduce
    mine = torch.zeros(img_idx.numel(), dtype=torch.bool, device=sims.device)
    mine[starts[lo] : starts[hi]] = True
    score = logits + sims[img_idx, txt_idx]
    score_i2t = sims.new_zeros(n_img, n_txt)
    score_t2i = sims.new_zeros(n_txt, n_img)
    m = mine & i2t[img_idx, txt_idx]
    score_i2t[img_idx[m], txt_idx[m]] = score[m]
    m = mine & t2i[txt_idx, img_idx]
    score_t2i[txt_idx[m], img_idx[m]] = score[m]
    score_i2t, score_t2i = sum_over_ranks(score_i2t, score_t2i)
    score_i2t = torch.where(i2t, score_i2t, score_i2t.new_tensor(-100.0))
    score_t2i = torch.where(t2i, score_t2i, score_t2i.new_tensor(-100.0))
    if stats is not None:
        stats.update(itm_pairs=int(img_idx.numel()), rank_itm_pairs=ran, kv_s=kv_s, itm_s=itm_s)
    return score_i2t, score_t2i
