"""Gathered cross-attention: text queries of P (text, image) pairs attend over the cached K / V
of their image, read by index (docs/architecture.md, "Batched ITM reranking"), forward and
backward.

Each image's cross-attention K / V is computed once per layer into caches of shape
(N_images, H, Lk, D); the pairs (ITM reranking's candidates, training's ITM / LM passes) then
attend over the cache rows of their image instead of copying image features per pair, and the
backward sums each image's dK / dV over the pairs that read it.

Shapes: q (P, H, Lq, D), k_cache / v_cache (N_images, H, Lk, D), image_index (P,) int64 in
[0, N_images). No padding mask: image tokens are all attended, and padded text queries are
independent rows whose outputs the caller ignores.

Ops (schemas here; the eager reference everywhere, the C++ kernels of ``blip_fast._C`` on CPU
and its CUDA forward for the first family, Triton's on CUDA for the ``_triton`` twins):
    blip_fast::gathered_cross_attention_fwd(q, k_cache, v_cache, image_index, scale, dropout_p,
        dropout_seed) -> (out, lse)
    blip_fast::gathered_cross_attention_bwd(dout, q, k_cache, v_cache, image_index, out, lse,
        scale, dropout_p, dropout_seed) -> (dq, dk_cache, dv_cache)
with out (P, H, Lq, D) in q's dtype and lse (P, H, Lq) fp32, as cross_attention's. The C++ CUDA
build has no backward: gathered_cross_attention_bwd on CUDA runs the reference kernel.
Attention dropout as cross_attention's (the counter hash over (P, H, Lq, Lk), pair p's rows
counted as row p): training's ITM / LM rows keep reading the shared K / V with dropout on.
"""

import torch

from blip_fast.ops import _backend, reference
from blip_fast.ops.cross_attention import DROPOUT_ARGS, _register_family, check_dropout, draw_seed

_FWD = (
    f"(Tensor q, Tensor k_cache, Tensor v_cache, Tensor image_index, float scale, {DROPOUT_ARGS}) "
    "-> (Tensor, Tensor)"
)
_BWD = (
    "(Tensor dout, Tensor q, Tensor k_cache, Tensor v_cache, Tensor image_index, Tensor out, "
    f"Tensor lse, float scale, {DROPOUT_ARGS}) -> (Tensor, Tensor, Tensor)"
)
# backend -> forward op; two families because the C++ CUDA kernel and Triton both want the CUDA
# key. Registered as cross-attention's families: image_index sits where its key_padding_mask
# does, an argument without grad that the backward gets back.
_OPS = {
    "cpu": "gathered_cross_attention_fwd",
    "cuda": "gathered_cross_attention_fwd",
    "triton": "gathered_cross_attention_fwd_triton",
}
for _suffix in ("", "_triton"):
    _register_family(
        _suffix,
        "gathered_cross_attention",
        _FWD,
        _BWD,
        reference.gathered_cross_attention_fwd,
        reference.gathered_cross_attention_bwd,
    )
if _backend._triton_ok():
    from blip_fast.kernels import gathered_cross_attention as _k
    from blip_fast.ops._library import lib

    lib.impl("gathered_cross_attention_fwd_triton", _k.gathered_cross_attention_fwd, "CUDA")
    lib.impl("gathered_cross_attention_bwd_triton", _k.gathered_cross_attention_bwd, "CUDA")
for _name, _op in _OPS.items():  # available() also checks that _C registered the C++ kernel
    _backend.KERNEL_OPS.setdefault(_name, {})["gathered_cross_attention"] = _op


def _check(q, k_cache, v_cache, image_index):
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(
            f"gathered_cross_attention: q (P, H, Lq, D) and k_cache / v_cache "
            f"(N_images, H, Lk, D) must be 4-D; got q {tuple(q.shape)}, k_cache "
            f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"gathered_cross_attention: k_cache {tuple(k_cache.shape)} and v_cache "
            f"{tuple(v_cache.shape)} must have the same shape (N_images, H, Lk, D)"
        )
    if q.shape[1] != k_cache.shape[1] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(
            f"gathered_cross_attention: heads and head_dim of q {tuple(q.shape)} "
            f"(P, H, Lq, D) and k_cache {tuple(k_cache.shape)} (N_images, H, Lk, D) "
            f"differ"
        )
    if image_index.shape != (q.shape[0],) or image_index.dtype != torch.int64:
        raise ValueError(
            f"gathered_cross_attention: image_index must be int64 of shape (P,) = "
            f"({q.shape[0]},); got {image_index.dtype} {tuple(image_index.shape)}"
        )
    # Raises here on CPU; on CUDA a device-side assert, so training does not wait on the host.
    n_images = k_cache.shape[0]
    torch._assert_async(
        ((image_index >= 0) & (image_index < n_images)).all(),
        f"gathered_cross_attention: image_index holds values outside [0, {n_images}): "
        f"k_cache {tuple(k_cache.shape)} has {n_images} images",
    )


def gathered_cross_attention(
    q, k_cache, v_cache, image_index, dropout_p=0.0, dropout_seed=None, backend=None
):
    """softmax(q kᵀ / √D) v, pair p's k / v = k_cache / v_cache[image_index[p]] read in place,
    the probabilities dropped with probability ``dropout_p`` (training).

    Arguments: q: (pairs, heads, q_len, head_dim); k_cache, v_cache: (images, heads, k_len,
    head_dim); image_index: (pairs,) int64 in [0, images); dropout_seed: as cross_attention's.
    Returns (pairs, heads, q_len, head_dim) in q's dtype. Every backend records autograd:
    dk_cache / dv_cache of an image sum over the pairs that read it.
    """
    _check(q, k_cache, v_cache, image_index)
    backend = _backend.resolve("gathered_cross_attention", q.device, backend)
    check_dropout("gathered_cross_attention", dropout_p, backend)
    scale = q.shape[-1] ** -0.5
    if backend == "reference" and (dropout_p == 0.0 or dropout_seed is None):
        return reference.gathered_cross_attention(
            q, k_cache, v_cache, image_index, scale, dropout_p
        )
    if backend == "reference":
        ref = reference.gathered_cross_attention_fwd
        return ref(q, k_cache, v_cache, image_index, scale, dropout_p, dropout_seed)[0]
    op = getattr(torch.ops.blip_fast, _OPS[backend])
    seed = draw_seed(dropout_p, q.device, dropout_seed)
    return op(q, k_cache, v_cache, image_index, scale, dropout_p, seed)[0]
