"""Triton kernels of the fused BLIP ITC loss (blip_fast/ops/itc.py has the math and schemas).

One program per block of BLOCK_M rows of one direction (i2t: image rows against the text
columns; t2i: the reverse), looping over column tiles of [feat_m of the batch ; queue] read in
place (the queue as stored, (D, Q), any strides). The forward keeps a running log-sum-exp for
the student (s = x·c / temp) and the teacher (t = x_m·c / temp) plus the teacher-weighted Σ s,
Σ hard·s and the hard count; the backward recomputes s and t per tile from the saved lse and
accumulates d_x = Σ ds·cᵀ. fp32 products run with input_precision="ieee" (TF32 would miss the
1e-5 parity goal); fp16 / bf16 features enter x·c in their dtype, whose products are exact in
the fp32 accumulator, and ds·cᵀ in fp32 with c upcast, so no result is rounded to 16 bits.

Launchers ``itc_fwd`` / ``itc_bwd`` take and return what the ``blip_fast::itc_fwd_triton`` /
``itc_bwd_triton`` schemas do, so they can be registered as those ops' CUDA kernels; tests run
them on CPU tensors under TRITON_INTERPRET=1.
"""

import torch
import triton
import triton.language as tl

from blip_fast.kernels._utils import device_limits, fma_block_n, launch, stages_that_fit

BLOCK_M = 32  # rows per program


@triton.jit
def _load_cols(FM, QU, rn, rd, B, Q, D, s_fm, s_q0, s_q1):
    """(BLOCK_D, BLOCK_N) columns rn of [FMᵀ ; QU] in their dtype, zero outside. One load
    through a per-column pointer choice, so the software pipeline buffers one tile, not two."""
    jb = tl.minimum(rn, B - 1)
    jq = tl.maximum(rn - B, 0)
    ptrs = tl.where(
        (rn < B)[None, :],
        FM + jb[None, :] * s_fm + rd[:, None],
        QU + rd[:, None] * s_q0 + jq[None, :] * s_q1,
    )
    return _operand(tl.load(ptrs, mask=(rn < B + Q)[None, :] & (rd < D)[:, None], other=0.0))


@triton.jit
def _operand(x):
    """x in the dtype its products run in: fp64 in fp32 (as the C++ kernels), others as is."""
    if x.dtype == tl.float64:
        return x.to(tl.float32)
    return x


@triton.jit
def _hard(IDX, IDXQ, my_id, rm, rn, B, Q, HAS_IDX: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool hard positives: same id, or the batch identity."""
    valid = rn < B + Q
    if HAS_IDX:
        idb = tl.load(IDX + tl.minimum(rn, B - 1), mask=rn < B, other=0)
        idq = tl.load(IDXQ + tl.maximum(rn - B, 0), mask=(rn >= B) & valid, other=0)
        ids = tl.where(rn < B, idb, idq)
        hard = (my_id[:, None] == ids[None, :]) & valid[None, :]
    else:
        hard = rm[:, None] == rn[None, :]
    return hard


# Batch and queue sizes are not specialised: any size runs the kernels the compile check built.
@triton.jit(do_not_specialize=("B", "Q"))
def _itc_fwd_kernel(
    X,
    XM,
    FM,
    QU,
    IDX,
    IDXQ,
    TEMP,
    STATS,
    ROWS,
    alpha,
    B,
    Q,
    D,
    s_st,
    s_x,
    s_xm,
    s_fm,
    s_q0,
    s_q1,
    HAS_IDX: tl.constexpr,
    TEACHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mrow = rm < B
    mx = mrow[:, None] & (rd < D)[None, :]
    inv_t = 1.0 / tl.load(TEMP).to(tl.float32)
    x = _operand(tl.load(X + rm[:, None] * s_x + rd[None, :], mask=mx, other=0.0))
    xm = _operand(tl.load(XM + rm[:, None] * s_xm + rd[None, :], mask=mx, other=0.0))
    my_id = rm
    if HAS_IDX:
        my_id = tl.load(IDX + rm, mask=mrow, other=-1)
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    w = tl.zeros((BLOCK_M,), tl.float32)
    h = tl.zeros((BLOCK_M,), tl.float32)
    cnt = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, B + Q, BLOCK_N):
        rn = j0 + tl.arange(0, BLOCK_N)
        valid = (rn < B + Q)[None, :]
        c = _load_cols(FM, QU, rn, rd, B, Q, D, s_fm, s_q0, s_q1)
        s0 = tl.dot(x, c, input_precision="ieee") * inv_t
        s = tl.where(valid, s0, float("-inf"))
        s0 = tl.where(valid, s0, 0.0)
        new_ms = tl.maximum(m_s, tl.max(s, 1))
        l_s = l_s * tl.exp(m_s - new_ms) + tl.sum(tl.exp(s - new_ms[:, None]), 1)
        m_s = new_ms
        if TEACHER:
            t = tl.where(valid, tl.dot(xm, c, input_precision="ieee") * inv_t, float("-inf"))
            new_mt = tl.maximum(m_t, tl.max(t, 1))
            scale = tl.exp(m_t - new_mt)
            e_t = tl.exp(t - new_mt[:, None])
            l_t = l_t * scale + tl.sum(e_t, 1)
            w = w * scale + tl.sum(e_t * s0, 1)
            m_t = new_mt
        hard = _hard(IDX, IDXQ, my_id, rm, rn, B, Q, HAS_IDX)
        h += tl.sum(tl.where(hard, s0, 0.0), 1)
        cnt += tl.sum(hard.to(tl.float32), 1)
    lse_s = m_s + tl.log(l_s)
    row = lse_s - (1.0 - alpha) * (h / tl.maximum(cnt, 1.0))  # cnt = 0 only past row B
    lse_t = tl.zeros((BLOCK_M,), tl.float32)
    if TEACHER:
        lse_t = m_t + tl.log(l_t)
        row -= alpha * (w / l_t)
    tl.store(STATS + rm * s_st, lse_s, mask=mrow)
    tl.store(STATS + rm * s_st + 1, lse_t, mask=mrow)
    tl.store(STATS + rm * s_st + 2, cnt, mask=mrow)
    tl.store(ROWS + rm, row, mask=mrow)


@triton.jit(do_not_specialize=("B", "Q"))
def _itc_bwd_kernel(
    X,
    XM,
    FM,
    QU,
    IDX,
    IDXQ,
    TEMP,
    DLOSS,
    STATS,
    DX,
    DS_S,
    alpha,
    B,
    Q,
    D,
    s_st,
    s_x,
    s_xm,
    s_fm,
    s_q0,
    s_q1,
    HAS_IDX: tl.constexpr,
    TEACHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mrow = rm < B
    mx = mrow[:, None] & (rd < D)[None, :]
    inv_t = 1.0 / tl.load(TEMP).to(tl.float32)
    g = tl.load(DLOSS).to(tl.float32) / (2 * B)
    x = _operand(tl.load(X + rm[:, None] * s_x + rd[None, :], mask=mx, other=0.0))
    xm = _operand(tl.load(XM + rm[:, None] * s_xm + rd[None, :], mask=mx, other=0.0))
    my_id = rm
    if HAS_IDX:
        my_id = tl.load(IDX + rm, mask=mrow, other=-1)
    lse_s = tl.load(STATS + rm * s_st, mask=mrow, other=0.0).to(tl.float32)
    lse_t = tl.load(STATS + rm * s_st + 1, mask=mrow, other=0.0).to(tl.float32)
    w_hard = g * (1.0 - alpha) / tl.load(STATS + rm * s_st + 2, mask=mrow, other=1.0).to(tl.float32)
    dx = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    ds_s = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, B + Q, BLOCK_N):
        rn = j0 + tl.arange(0, BLOCK_N)
        valid = (rn < B + Q)[None, :] & mrow[:, None]
        c = _load_cols(FM, QU, rn, rd, B, Q, D, s_fm, s_q0, s_q1)
        s = tl.dot(x, c, input_precision="ieee") * inv_t
        ds = g * tl.exp(s - lse_s[:, None])
        if TEACHER:
            t = tl.dot(xm, c, input_precision="ieee") * inv_t
            ds -= g * alpha * tl.exp(t - lse_t[:, None])
        hard = _hard(IDX, IDXQ, my_id, rm, rn, B, Q, HAS_IDX)
        ds = tl.where(hard, ds - w_hard[:, None], ds)
        ds = tl.where(valid, ds, 0.0)
        ds_s += tl.sum(ds * s, 1)
        dx += tl.dot(ds, tl.trans(c).to(tl.float32), input_precision="ieee")
    tl.store(DX + rm[:, None] * D + rd[None, :], dx * inv_t, mask=mx)
    tl.store(DS_S + rm, ds_s, mask=mrow)


def _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue):
    return (
        (image_feat, image_feat_m, text_feat_m, text_queue),
        (text_feat, text_feat_m, image_feat_m, image_queue),
    )


def itc_config(dim, dtype, limits, *, backward):
    """Block sizes, num_warps and num_stages of the forward (or backward) kernel for features
    of ``dim`` in ``dtype`` on a GPU with ``limits`` (kernels/_utils.py)."""
    block_d = max(16, triton.next_power_of_2(dim))
    elt = dtype.itemsize
    # The dots contract over all of D (x·c) or yield all of it (ds·cᵀ), fp32 ones on the FMA
    # units, so BLOCK_N follows kernels/_utils.py's fma_block_n rule: 16 at D = 256, 8 warps. The
    # fp16 / bf16 kernels keep it, for their fp32 ds·cᵀ.
    num_warps = 8
    block_n = fma_block_n(BLOCK_M, block_d, num_warps)
    # Per stage one column tile; resident: x and x_m, and in the backward c upcast for ds·cᵀ:
    # 1.2-1.4x the compiled kernels' shared memory in the compile check's table.
    stage = block_d * block_n * elt
    resident = 2 * BLOCK_M * block_d * elt + (block_d * block_n * 4 if backward else 0)
    num_stages = stages_that_fit(stage, resident, limits)
    if not num_stages:
        raise ValueError(
            f"no Triton ITC configuration for dim {dim} in {dtype} fits "
            f"{limits.max_shared_mem} bytes of shared memory (sm_{limits.arch})"
        )
    return dict(
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _common(x, xm, fm, queue, idx, idx_queue, *, backward):
    x, xm, fm = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, xm, fm))
    B, D = x.shape
    has_idx = idx is not None
    ids = (idx.contiguous(), idx_queue.reshape(-1).contiguous()) if has_idx else (x, x)
    config = itc_config(D, x.dtype, device_limits(x.device), backward=backward)
    strides = (x.stride(0), xm.stride(0), fm.stride(0), queue.stride(0), queue.stride(1))
    return x, xm, fm, ids, strides, dict(HAS_IDX=has_idx, **config), (triton.cdiv(B, BLOCK_M),)


def itc_fwd(
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx=None,
    idx_queue=None,
    need_grad=True,
):
    """image_feat / text_feat / *_m (B, D), queues (D, Q), temp 0-d, idx (B,) / idx_queue (Q,)
    or None -> loss 0-d (image_feat's dtype), stats (2, B, 3 + D): lse_s, lse_t, count in
    columns 0-2 (fp32 values, stored as fp64 for fp64 inputs, the schema's dtype); the gradient
    columns stay 0 whatever need_grad says, as itc_bwd recomputes."""
    B = image_feat.shape[0]
    Q = image_queue.shape[1]
    acc = torch.float64 if image_feat.dtype == torch.float64 else torch.float32  # the op's fake
    stats = torch.zeros(2, B, 3 + image_feat.shape[1], device=image_feat.device, dtype=acc)
    rows = torch.empty(2, B, device=image_feat.device, dtype=torch.float32)
    for d, (x, xm, fm, queue) in enumerate(
        _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue)
    ):
        x, xm, fm, ids, strides, config, grid = _common(
            x, xm, fm, queue, idx, idx_queue, backward=False
        )
        args = (
            x,
            xm,
            fm,
            queue,
            *ids,
            temp,
            stats[d],
            rows[d],
            float(alpha),
            B,
            Q,
            x.shape[1],
            stats.stride(1),
            *strides,
        )
        launch(_itc_fwd_kernel, grid, args, dict(TEACHER=alpha != 0.0, **config))
    return (rows.mean(1).sum() / 2).to(image_feat.dtype), stats


def itc_bwd(
    dloss,
    image_feat,
    text_feat,
    image_feat_m,
    text_feat_m,
    image_queue,
    text_queue,
    temp,
    alpha,
    idx,
    idx_queue,
    need_grad,
    stats,
):
    """Gradients of itc_fwd's loss: d_image_feat, d_text_feat (B, D) and d_temp (temp's shape)."""
    B, D = image_feat.shape
    Q = image_queue.shape[1]
    stats = stats.contiguous()
    grads, ds_s = [], torch.empty(2, B, device=image_feat.device, dtype=torch.float32)
    for d, (x, xm, fm, queue) in enumerate(
        _directions(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue)
    ):
        x, xm, fm, ids, strides, config, grid = _common(
            x, xm, fm, queue, idx, idx_queue, backward=True
        )
        dx = torch.empty(B, D, device=x.device, dtype=torch.float32)
        args = (
            x,
            xm,
            fm,
            queue,
            *ids,
            temp,
            dloss,
            stats[d],
            dx,
            ds_s[d],
            float(alpha),
            B,
            Q,
            D,
            stats.stride(1),
            *strides,
        )
        launch(_itc_bwd_kernel, grid, args, dict(TEACHER=alpha != 0.0, **config))
        grads.append(dx.to(x.dtype))
    d_temp = (-ds_s.sum() / temp.float()).to(temp.dtype).reshape(temp.shape)
    return grads[0], grads[1], d_temp
