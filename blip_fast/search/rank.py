"""Ranking against an index: exact ITC top-k over stored features, then ITM reranking.

Top-k is exact: every stored feature is scored, block by block (float16 on disk, float32
products and accumulation), keeping a running top-k, so memory is bounded by the block, not
the index. Reranking follows the official retrieval evaluation for one text query: its top-N
images by ITC similarity are scored by ITM + ITC similarity and reordered. The candidates'
image tokens are recomputed from their files (or read back, if the index was built with
``store_tokens``), their cross-attention K / V computed once per candidate
(``GatheredITM.image_kv``) and read by index for the N (text, image) pairs (``GatheredITM``).
An image query against a caption index is the mirror image (``rerank_texts``): its top-N
captions by ITC, the image's K / V computed once and read by all N.

Precision "bf16" reranks on an all-bf16 copy of the text encoder (``GatheredITM``) and, for
text queries, recomputes the candidates' image tokens under bf16 autocast; the ITC top-N that
chooses the candidates stays fp32, so bf16 moves only the candidates' ITM scores.
"""

from __future__ import annotations

import torch

from blip_fast.eval.retrieval import resolve_precision
from blip_fast.models.blip_caption import PRECISIONS  # fp32 / bf16 inference, as captioning

__all__ = ["exact_top_k", "reranker_dtype", "reranker_precision", "rerank", "rerank_texts"]

# Rows per block: 64 Ki x 256 dims is a 32 MiB float16 block, 64 MiB in float32.
BLOCK_ROWS = 1 << 16


def reranker_precision(precision: str, model) -> str:
    """``precision`` checked, "bf16" turned to "fp32" (one log line) on a CPU without native
    bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"search precision must be one of {PRECISIONS}, got {precision!r}")
    if model is None:
        return precision
    return resolve_precision(precision, next(model.parameters()).device)


def reranker_dtype(precision: str) -> torch.dtype | None:
    """The ``GatheredITM`` dtype of a reranker at ``precision``."""
    return torch.bfloat16 if precision == "bf16" else None


@torch.no_grad()
def exact_top_k(
    store, query: torch.Tensor, k: int, block_rows: int = BLOCK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (Q, D) -> (similarities (Q, k'), rows (Q, k')) best first, k' = min(k, len),
    against the features ``store.blocks`` yields (an image ``Store`` or a ``TextIndex``);
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
    ids, mask = ids[:, :length].expand(n, -1), mask[:, :length].expand(n, -1)
    return _by_itm(itm, ids, mask, image_embeds, torch.arange(n, device=ids.device), itc)


@torch.no_grad()
def rerank_texts(itm, ids, mask, image_embeds, itc):
    """ITM reranking of N candidate texts for one image: ids, mask (N, L) the tokenised
    texts, image_embeds (1, Li, W) the image's tokens (cross-attention K / V computed once,
    read by all N), itc (N,) their ITC similarities; returns as ``rerank``."""
    length = int(mask.sum(1).max())
    image_index = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
    return _by_itm(itm, ids[:, :length], mask[:, :length], image_embeds, image_index, itc)


def _by_itm(itm, ids, mask, image_embeds, image_index, itc):
    """Pair p is text p with image ``image_index[p]``; (order, ITM + ITC scores, ITM logits)."""
    logits = itm(ids, mask, itm.image_kv(image_embeds), image_index)[:, 1].float()
    scores = logits + itc.float()
    return scores.argsort(descending=True, stable=True), scores, logits
