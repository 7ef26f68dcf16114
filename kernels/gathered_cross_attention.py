"""Triton kernels of the gathered cross-attention (docs/architecture.md, "Batched ITM reranking";
blip_fast/ops/gathered_cross_attention.py has the op): text queries of P (text, image) pairs
attend over the K / V of their image, read in place at row image_index[p] of the
(N_images, H, Lk, D) caches, so no per-pair copy of K / V is ever made. ITM reranking runs the
forward; training (the ITM pass over its pairs, the LM pass over K / V projected once per
distinct image) runs both.

Both kernels are the cross-attention's (kernels/cross_attention.py) with the index switched on
(HAS_IDX). Forward: one program per (pair·head, block of queries), online softmax over key
tiles. Backward: one program per image·head, looping over the pairs that read the image, so
the image's dk / dv sum every pair's contribution without atomics. No key padding mask (image
tokens are all attended).
"""

from blip_fast.kernels.cross_attention import (
    _cross_attention_bwd_kernel,
    _cross_attention_fwd_kernel,
    attend_bwd,
    attend_fwd,
)

# The same JIT functions, specialised at launch by HAS_IDX=True: one body each to tune and test.
_gathered_cross_attention_fwd_kernel = _cross_attention_fwd_kernel
_gathered_cross_attention_bwd_kernel = _cross_attention_bwd_kernel


def gathered_cross_attention_fwd(
    q, k_cache, v_cache, image_index, scale, dropout_p=0.0, dropout_seed=None, *, out=None, lse=None
):
    """q (P, H, Lq, D); k_cache / v_cache (N, H, Lk, D); image_index (P,) int64 in [0, N) ->
    out (P, H, Lq, D) in q's dtype, softmax(q kᵀ · scale) v with k, v = cache[image_index[p]],
    and its row log-sum-exp lse (P, H, Lq) fp32. ``out`` / ``lse`` (tests pass poisoned
    buffers) are written in full."""
    return attend_fwd(
        q,
        k_cache,
        v_cache,
        None,
        scale,
        image_index,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        out=out,
        lse=lse,
    )


def gathered_cross_attention_bwd(
    dout,
    q,
    k_cache,
    v_cache,
    image_index,
    out,
    lse,
    scale,
    dropout_p=0.0,
    dropout_seed=None,
    *,
    grads=None,
):
    """Gradients of ``gathered_cross_attention_fwd`` from its out / lse: dq (P, H, Lq, D) and
    dk_cache / dv_cache (N, H, Lk, D), contiguous, in the inputs' dtypes; an image's rows sum
    over every pair reading it, an image no pair reads gets zeros. ``grads`` (tests pass
    poisoned contiguous buffers) = (dq, dk_cache, dv_cache) to write in full."""
    return attend_bwd(
        dout,
        q,
        k_cache,
        v_cache,
        None,
        out,
        lse,
        scale,
        image_index,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        grads=grads,
    )
