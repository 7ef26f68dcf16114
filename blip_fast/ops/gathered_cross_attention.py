"""Gathered cross-attention for batched ITM reranking, inference only (docs/architecture.md,
"Batched ITM reranking").

Each image's cross-attention K / V is computed once per layer into caches of shape
(N_images, H, Lk, D); the P candidate (text, image) pairs then attend with their text queries
over the cache rows of their image, read by index, instead of copying image features per pair.

Shapes: q (P, H, Lq, D), k_cache / v_cache (N_images, H, Lk, D), image_index (P,) int64 in
[0, N_images). No padding mask: image tokens are all attended, and padded text queries are
independent rows whose outputs the caller ignores.

Ops (schemas here; the eager reference everywhere; Triton on CUDA for the ``_triton`` one, the
C++ cross-attention kernels of ``blip_fast._C`` with a K / V row index
(csrc/ops/gathered_cross_attention.cpp) on CPU / CUDA for the other):
    blip_fast::gathered_cross_attention_triton(q, k_cache, v_cache, image_index, scale) -> out
    blip_fast::gathered_cross_attention_fwd(q, k_cache, v_cache, image_index, scale) -> out
"""

import torch

from blip_fast.ops import _backend, reference
from blip_fast.ops._library import lib

_SCHEMA = "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor image_index, float scale) -> Tensor"
# Two op names because the C++ CUDA kernel and the Triton kernel both want the CUDA key.
for _name in ("gathered_cross_attention_triton", "gathered_cross_attention_fwd"):
    lib.define(_name + _SCHEMA)
    lib.impl(_name, reference.gathered_cross_attention, "CompositeExplicitAutograd")
if _backend._triton_ok():
    from blip_fast.kernels import gathered_cross_attention as _k

    lib.impl("gathered_cross_attention_triton", _k.gathered_cross_attention_fwd, "CUDA")
_backend.KERNEL_OPS.setdefault("triton", {})["gathered_cross_attention"] = (
    "gathered_cross_attention_triton"
)
for _backend_name in ("cpu", "cuda"):  # available() also checks that _C registered the kernel
    _backend.KERNEL_OPS.setdefault(_backend_name, {})["gathered_cross_attention"] = (
        "gathered_cross_attention_fwd"
    )


def _fake(q, k_cache, v_cache, image_index, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


for _name in ("gathered_cross_attention_triton", "gathered_cross_attention_fwd"):
    torch.library.register_fake(f"blip_fast::{_name}", _fake, lib=lib)


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
    n_images = k_cache.shape[0]
    if image_index.numel() and not torch.compiler.is_compiling():
        lo, hi = image_index.min().item(), image_index.max().item()
        if lo < 0 or hi >= n_images:
            raise IndexError(
                f"gathered_cross_attention: image_index holds values in [{lo}, {hi}] "
                f"but k_cache {tuple(k_cache.shape)} has {n_images} images"
            )


def gathered_cross_attention(q, k_cache, v_cache, image_index, backend=None):
    """softmax(q kᵀ / √D) v, pair p's k / v = k_cache / v_cache[image_index[p]] read in place.

    Arguments: q: (pairs, heads, q_len, head_dim); k_cache, v_cache: (images, heads, k_len,
    head_dim); image_index: (pairs,) int64 in [0, images). Returns (pairs, heads, q_len,
    head_dim) in q's dtype. Only the reference backend records autograd (an automatic choice
    falls back to it when an input requires grad).
    """
    _check(q, k_cache, v_cache, image_index)
    requested, backend = backend, _backend.resolve("gathered_cross_attention", q.device, backend)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        if requested is None:
            backend = "reference"  # automatic choice: only the reference records autograd
        elif backend != "reference":
            raise RuntimeError(
                f"gathered_cross_attention: backend {backend!r} is inference "
                f"only; run it under torch.no_grad() or use backend='reference' "
                f"for grads"
            )
    if backend == "reference":
        return reference.gathered_cross_attention(q, k_cache, v_cache, image_index)
    op = getattr(torch.ops.blip_fast, _backend.KERNEL_OPS[backend]["gathered_cross_attention"])
    return op(q, k_cache, v_cache, image_index, q.shape[-1] ** -0.5)
