"""Triton kernel of the gathered cross-attention of batched ITM reranking (docs/architecture.md,
"Batched ITM reranking"; blip_fast/ops/gathered_cross_attention.py has the op): text queries of
P (text, image) pairs attend over the cached K / V of their image, read in place at row
image_index[p] of the (N_images, H, Lk, D) caches, so no per-pair copy of K / V is ever made.

The kernel body is the cross-attention forward's (kernels/cross_attention.py) with its index
pointer switched on (HAS_IDX): one program per (pair·head, block of queries), online softmax over
key tiles. No key padding mask (image tokens are all attended) and no backward (inference only).
"""

from blip_fast.kernels.cross_attention import _cross_attention_fwd_kernel, attend_fwd

# The same JIT function, specialised at launch by HAS_IDX=True: one body to tune and test.
_gathered_cross_attention_fwd_kernel = _cross_attention_fwd_kernel


def gathered_cross_attention_fwd(q, k_cache, v_cache, image_index, scale, *, out=None):
    """q (P, H, Lq, D); k_cache / v_cache (N, H, Lk, D); image_index (P,) int64 in [0, N) ->
    out (P, H, Lq, D) in q's dtype, softmax(q kᵀ · scale) v with k, v = cache[image_index[p]].
    ``out`` (tests pass a poisoned buffer) is written in full."""
    return attend_fwd(q, k_cache, v_cache, None, scale, image_index, out=out)[0]
