"""Ranking against an index: exact ITC top-k over stored features, then ITM reranking.

Top-k is exact: every stored feature is scored, block by block (float16 on disk, float32
products and accumulation), keeping a running top-k, so memory is bounded by the block, not
the index. Reranking follows the official retrieval evaluation for one text query: its top-N
images by ITC similarity are scored by ITM + ITC similarity and reordered. The candidates'
image tokens are recomputed from their files (or read back, if the index was built with
``store_tokens``), their cross-attention K / V computed once per candidate
(``GatheredITM.image_kv``) and read by index for the N (text, image) pairs (``GatheredITM``).
"""

from __future__ import annotations

import torch

from blip_fast.search.store import Store

__all__ = ["exact_top_k", "rerank"]

# Rows per block: 64 Ki x 256 dims is a 32 MiB float16 block, 64 MiB in float32.
BLOCK_ROWS = 1 << 16


@torch.no_grad()
def exact_top_k(
    store: Store, query: torch.Tensor, k: int, block_rows: int = BLOCK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (Q, D) -> (similarities (Q, k'), rows (Q, k')) best first, k' = min(k, len);
    the same as ``(query @ features.T).topk(k')`` on the whole index, computed by blocks."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query = query.float()
    best = query.new_empty(query.shape[0], 0)
    rows = torch.empty(query.shape[0], 0, dtype=torch.int64, device=query.device)
    for start, block in store.blocks(block_rows):
        feats = torch.from_numpy(block.astype("float32")).to(query.device)
        with torch.autocast(query.device.type, enabled=False):
            sims = query @ feats.T
        top = sims.topk(min(k, sims.shape[1]))
        merged = torch.cat([best, top.values], 1)
        keep = merged.topk(min(k, merged.shape[1]))
        best = keep.values
        rows = torch.cat([rows, top.indices + start], 1).gather(1, keep.indices)
    return best, rows


@torch.no_grad()
def rerank(itm, ids, mask, image_embeds, itc):
    """ITM reranking of one text against N candidate images.

    itm: a ``GatheredITM``; ids, mask (1, L) the tokenised text; image_embeds (N, Li, W) the
    candidates' image tokens; itc (N,) their ITC similarities. Returns (order (N,) best first,
    scores (N,) = ITM match logit + ITC similarity, itm logits (N,)), all fp32."""
    n = image_embeds.shape[0]
    length = int(mask.sum())
    kv = itm.image_kv(image_embeds)
    logits = itm(
        ids[:, :length].expand(n, -1),
        mask[:, :length].expand(n, -1),
        kv,
        torch.arange(n, device=image_embeds.device),
    )[:, 1].float()
    scores = logits + itc.float()
    return scores.argsort(descending=True, stable=True), scores, logits
