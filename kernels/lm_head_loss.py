"""Triton row kernel of the fused LM-head cross-entropy (blip_fast/ops/lm_head_loss.py has the
math, the chunking and the schemas).

The op computes a chunk of logits (rows, V) with one GEMM; this kernel then gives each row its
label-smoothed cross-entropy and, for a gradient, overwrites the row with
grad_scale_i · (softmax(z) − (1 − eps)·onehot(y) − eps / V), in the logits' dtype (Liger's
cross-entropy kernel). One program per row: a first sweep over the vocabulary in blocks of
BLOCK_V keeps a running max and sum of exp (online log-sum-exp) and Σ z; a second writes the
gradient. The row math is fp32 whatever the logits' dtype (fp64 logits are computed in fp32 and
the loss stored as fp64, the schema's dtype).

``lm_head_loss_chunk`` is the per-chunk kernel the op's chunked driver calls on CUDA; tests call
it on CPU tensors under TRITON_INTERPRET=1, and benchmarks/compile_check.py on meta tensors to
enumerate what ``lm_head_loss_config``, the only place that chooses a configuration, picks.
"""

import torch
import triton
import triton.language as tl

from blip_fast.kernels._utils import launch

# Lanes per block: ptxas (triton 3.7, sm_80 and sm_90a, with gradient) spills 36-300 bytes per
# thread at Liger's 32768 lanes with 8, 16 or 32 warps; at 8192 lanes and 16 warps (16 values
# per thread) it uses 64 registers and spills nothing in fp32, fp16 or bf16. BLIP's 30524-token
# vocabulary takes 4 such blocks per sweep. Not timed on a GPU yet.
MAX_BLOCK_V = 8192
LANES_PER_WARP = 512


@triton.jit
def _lm_head_loss_kernel(
    Z,
    LABELS,
    SCALE,
    LOSS,
    V,
    s_z,
    label_smoothing,
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * s_z
    y = tl.load(LABELS + row)
    m = float("-inf")
    sum_exp = 0.0
    sum_z = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(z, 0))
        sum_exp = sum_exp * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), 0)
        sum_z += tl.sum(tl.where(cols < V, z, 0.0), 0)
        m = new_m
    lse = m + tl.log(sum_exp)
    z_y = tl.load(z_row + y).to(tl.float32)
    eps = label_smoothing
    tl.store(LOSS + row, lse - (1.0 - eps) * z_y - eps * (sum_z / V))
    if HAS_GRAD:
        g = tl.load(SCALE + row).to(tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            dz = tl.exp(z - lse) - eps / V
            dz = tl.where(cols == y, dz - (1.0 - eps), dz)
            tl.store(z_row + cols, (dz * g).to(Z.dtype.element_ty), mask=cols < V)


def lm_head_loss_config(vocab: int) -> dict:
    """BLOCK_V and num_warps of ``_lm_head_loss_kernel`` for a vocabulary of ``vocab``. Neither
    the dtype nor the GPU's limits enter: the kernel has no tl.dot and its shared memory is the
    cross-warp reduction scratch, at most 64 bytes (compile check)."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))
    return {"BLOCK_V": block_v, "num_warps": max(1, block_v // LANES_PER_WARP)}


def lm_head_loss_chunk(logits, labels, label_smoothing, grad_scale, *, loss=None):
    """logits (rows, V) with contiguous rows, labels (rows,) int64 in [0, V), grad_scale (rows,)
    or None -> row losses (rows,) in fp32 (fp64 for fp64 logits). With grad_scale, the logits
    are overwritten by grad_scale_i · dloss_i/dz. ``loss`` (tests pass a poisoned buffer) is
    written in full."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(
            f"lm_head_loss_chunk: logits rows must be contiguous, got strides {logits.stride()}"
        )
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if loss is None:
        loss = torch.empty(rows, device=logits.device, dtype=acc)
    if rows == 0:
        return loss
    has_grad = grad_scale is not None
    args = (
        logits,
        labels.contiguous(),
        grad_scale.contiguous() if has_grad else loss,  # not read without a gradient
        loss,
        vocab,
        logits.stride(0),
        float(label_smoothing),
    )
    launch(
        _lm_head_loss_kernel, (rows,), args, dict(HAS_GRAD=has_grad, **lm_head_loss_config(vocab))
    )
    return loss
