"""Triton kernels of the fused cross-attention (blip_fast/ops/cross_attention.py has the math
and the schemas): text queries (Lq <= 40 in BLIP) over image tokens (Lk = 197 / 577).

Forward: one program per (batch·head, block of BLOCK_M queries), looping over key tiles of
BLOCK_N with an online softmax (running max m, running sum l), writing out (B, H, Lq, D) in the
inputs' dtype and the fp32 row log-sum-exp lse (B, H, Lq). A masked key gets −10000 added to
its score after scaling, exactly as official BERT and ``reference.cross_attention_fwd`` do.
With an index (HAS_IDX) program b reads K / V row IDX[b] instead of b, and the backward groups
the batch entries by the row they read (below): the gathered cross-attention
(``kernels/gathered_cross_attention.py``) runs these two kernels.
With CAUSAL the same kernels are the text layers' self-attention
(``blip_fast::attention_*_triton``): a key in a query's future (bottom-right aligned, query i
sees keys j <= Lk − Lq + i, so Lq < Lk over a KV cache works) also gets −10000, once even when
padding masks it too. Fully-future key tiles are not skipped yet: with the additive −10000 they
still count where a row has no allowed key.

Backward: one program per K / V row·head, over the batch entries that read the row: entry b
itself, or (HAS_IDX) every pair whose index is the row, grouped on the device by
``_groups_by_row``. For each entry's blocks of queries it recomputes P = exp(S − lse) per key
tile, accumulates dq in registers and writes dk / dv of the tile (the group's first query block
stores, later ones add; a row no pair reads gets zeros); no (B, H, Lq, Lk) tensor exists
anywhere. BLIP's Lq <= 40 is one query block, so plain dk / dv are written once; each further
query block or pair adds in the output dtype (fp16 / bf16 then round once per addition).

Products run with input_precision="ieee" (TF32 would miss the fp32 1e-5 parity goal); fp16 /
bf16 products run in their dtype with fp32 accumulation, P and dS rounded to the input dtype
before their products (FlashAttention's choice). Launchers take and return what the
``blip_fast::cross_attention_fwd_triton`` / ``_bwd_triton`` schemas do; tests run them on CPU
tensors under TRITON_INTERPRET=1. Block sizes, warps and pipeline depth come from
``attention_config`` alone, which benchmarks/compile_check.py enumerates and compiles.
"""

import torch
import triton
import triton.language as tl

from blip_fast.kernels._utils import device_limits, fma_block_n, launch, stages_that_fit

# Official BERT's additive mask (reference.MASK_VALUE). A tl.constexpr, as compiled kernels read
# no other module global (the interpreter reads any, so only the compile check catches it).
MASK_VALUE = tl.constexpr(-10000.0)
MAX_BLOCK_M = 64  # queries per program; BLIP's 35 text tokens fill one block


@triton.jit
def _masked_scores(
    q, k, scale, mask_row, rm, rn, mn, LQ, LK, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr
):
    """q kᵀ · scale of one (query block, key tile) plus official BERT's additive mask: −10000
    on a key that the padding mask drops or (CAUSAL, bottom-right aligned: query i sees keys
    j <= LK − LQ + i) that lies in the query's future; a key masked both ways gets −10000 once,
    as ``reference.additive_mask`` does."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_MASK or CAUSAL:
        drop = tl.zeros(s.shape, tl.int1)
        if HAS_MASK:
            keep = tl.load(mask_row + rn, mask=mn, other=1)
            drop = drop | (keep == 0)[None, :]
        if CAUSAL:
            drop = drop | (rn[None, :] > (LK - LQ + rm)[:, None])
        s = s + tl.where(drop, MASK_VALUE, 0.0)
    return s


# Lengths, and the strides that follow them (lse, mask), are not specialised: any Lq / Lk runs
@triton.jit
def _mul32(x, c_hi, c_lo):
    """(x · c) mod 2³² for int64 x < 2³² and c = c_hi · 2¹⁶ + c_lo, without int64 overflow."""
    m32 = tl.full([], 0xFFFFFFFF, tl.int64)
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & m32


@triton.jit
def _mix32(x):
    """csrc/core/dropout.h's mix32 on int64 values < 2³²."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0, 0xAAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0xD35A, 0x2D97)
    return x ^ (x >> 15)


@triton.jit
def _dropout_keep(SEED, counter, threshold):
    """Attention dropout's keep decisions for int64 element counters (csrc/core/dropout.h,
    reference.dropout_keep): the same elements in every backend."""
    m32 = tl.full([], 0xFFFFFFFF, tl.int64)
    seed = tl.load(SEED)
    bits = _mix32((counter & m32) ^ (seed & m32))
    bits = _mix32(bits ^ ((seed >> 32) & m32) ^ (counter >> 32))
    return bits >= threshold


# the kernels benchmarks/compile_check.py compiled, without a recompile per length.
UNSPECIALISED = ("LQ", "LK", "sl_b", "sl_h", "sm_b")


@triton.jit(do_not_specialize=UNSPECIALISED)
def _cross_attention_fwd_kernel(
    Q,
    K,
    V,
    MASK,
    IDX,
    OUT,
    LSE,
    SEED,
    scale,
    threshold,
    keep_scale,
    H,
    LQ,
    LK,
    D,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    so_b,
    so_h,
    so_m,
    sl_b,
    sl_h,
    sm_b,
    HAS_MASK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kb = b
    if HAS_IDX:
        kb = tl.load(IDX + b)
    b = b.to(tl.int64)
    kb = kb.to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    mm = rm < LQ
    md = rd < D
    q = tl.load(
        Q + b * sq_b + h * sq_h + rm[:, None] * sq_m + rd[None, :],
        mask=mm[:, None] & md[None, :],
        other=0.0,
    )
    k_base = K + kb * sk_b + h * sk_h
    v_base = V + kb * sv_b + h * sv_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, LK, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        mn = rn < LK
        k = tl.load(
            k_base + rn[:, None] * sk_n + rd[None, :], mask=mn[:, None] & md[None, :], other=0.0
        )
        v = tl.load(
            v_base + rn[:, None] * sv_n + rd[None, :], mask=mn[:, None] & md[None, :], other=0.0
        )
        s = _masked_scores(q, k, scale, MASK + b * sm_b, rm, rn, mn, LQ, LK, HAS_MASK, CAUSAL)
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # after l_i, which counts every key
            counter = ((b * H + h) * LQ + rm[:, None]) * LK + rn[None, :]
            p = tl.where(_dropout_keep(SEED, counter, threshold), p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + b * so_b + h * so_h + rm[:, None] * so_m + rd[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mm[:, None] & md[None, :],
    )
    tl.store(LSE + b * sl_b + h * sl_h + rm, m_i + tl.log(l_i), mask=mm)


@triton.jit(do_not_specialize=UNSPECIALISED)
def _cross_attention_bwd_kernel(
    DO,
    Q,
    K,
    V,
    MASK,
    O,
    LSE,
    ORDER,
    OFFSETS,
    DQ,
    DK,
    DV,
    SEED,
    scale,
    threshold,
    keep_scale,
    H,
    LQ,
    LK,
    D,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    so_b,
    so_h,
    so_m,
    sdo_b,
    sdo_h,
    sdo_m,
    sl_b,
    sl_h,
    sm_b,
    HAS_MASK: tl.constexpr,
    HAS_IDX: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per K / V row · head, over the batch entries that read the row: the entry of
    # the same index, or (HAS_IDX) the pairs ORDER[OFFSETS[kb] : OFFSETS[kb + 1]]. Only this
    # program writes the row's dk / dv, so they accumulate without atomics.
    # DQ / DK / DV are contiguous with the shapes of Q / K / V.
    pid_kh = tl.program_id(0)
    kb = pid_kh // H
    h = pid_kh % H
    first = kb
    last = kb + 1
    if HAS_IDX:
        first = tl.load(OFFSETS + kb)
        last = tl.load(OFFSETS + kb + 1)
    kb = kb.to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    md = rd < D
    k_base = K + kb * sk_b + h * sk_h
    v_base = V + kb * sv_b + h * sv_h
    dk_base = DK + pid_kh.to(tl.int64) * LK * D
    dv_base = DV + pid_kh.to(tl.int64) * LK * D
    for i in range(first, last):
        b = i
        if HAS_IDX:
            b = tl.load(ORDER + i)
        b = b.to(tl.int64)
        q_base = Q + b * sq_b + h * sq_h
        dq_base = DQ + (b * H + h) * LQ * D
        for m_start in range(0, LQ, BLOCK_M):
            rm = m_start + tl.arange(0, BLOCK_M)
            mm = rm < LQ
            qmask = mm[:, None] & md[None, :]
            q = tl.load(q_base + rm[:, None] * sq_m + rd[None, :], mask=qmask, other=0.0)
            do = tl.load(
                DO + b * sdo_b + h * sdo_h + rm[:, None] * sdo_m + rd[None, :],
                mask=qmask,
                other=0.0,
            )
            o = tl.load(
                O + b * so_b + h * so_h + rm[:, None] * so_m + rd[None, :], mask=qmask, other=0.0
            )
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO ∘ O)
            lse = tl.load(LSE + b * sl_b + h * sl_h + rm, mask=mm, other=0.0)
            # The group's first query block stores dk / dv, every later one adds.
            accumulate = (i > first) | (m_start > 0)
            dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            for n_start in range(0, LK, BLOCK_N):
                rn = n_start + tl.arange(0, BLOCK_N)
                mn = rn < LK
                kvmask = mn[:, None] & md[None, :]
                k = tl.load(k_base + rn[:, None] * sk_n + rd[None, :], mask=kvmask, other=0.0)
                v = tl.load(v_base + rn[:, None] * sv_n + rd[None, :], mask=kvmask, other=0.0)
                s = _masked_scores(
                    q, k, scale, MASK + b * sm_b, rm, rn, mn, LQ, LK, HAS_MASK, CAUSAL
                )
                p = tl.where(mm[:, None] & mn[None, :], tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                p_v = p  # the probabilities that multiplied V: dropped ones with DROPOUT
                if DROPOUT:  # dP through the forward's mask; rowsum(P ∘ dP) stays delta
                    counter = ((b * H + h) * LQ + rm[:, None]) * LK + rn[None, :]
                    keep = _dropout_keep(SEED, counter, threshold)
                    p_v = tl.where(keep, p * keep_scale, 0.0)
                    dp = tl.where(keep, dp * keep_scale, 0.0)
                dv = tl.dot(tl.trans(p_v.to(do.dtype)), do, input_precision="ieee")
                ds = p * (dp - delta[:, None]) * scale
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
                offs = rn[:, None] * D + rd[None, :]
                if accumulate:
                    dk += tl.load(dk_base + offs, mask=kvmask, other=0.0).to(tl.float32)
                    dv += tl.load(dv_base + offs, mask=kvmask, other=0.0).to(tl.float32)
                tl.store(dk_base + offs, dk.to(DK.dtype.element_ty), mask=kvmask)
                tl.store(dv_base + offs, dv.to(DV.dtype.element_ty), mask=kvmask)
            tl.store(
                dq_base + rm[:, None] * D + rd[None, :], dq.to(DQ.dtype.element_ty), mask=qmask
            )
    if HAS_IDX:
        if last == first:  # no pair reads this image: its keys get no gradient
            zeros = tl.zeros((BLOCK_N, BLOCK_D), DK.dtype.element_ty)
            for n_start in range(0, LK, BLOCK_N):
                rn = n_start + tl.arange(0, BLOCK_N)
                kvmask = (rn < LK)[:, None] & md[None, :]
                offs = rn[:, None] * D + rd[None, :]
                tl.store(dk_base + offs, zeros, mask=kvmask)
                tl.store(dv_base + offs, zeros.to(DV.dtype.element_ty), mask=kvmask)


def attention_config(lq, head_dim, dtype, limits, *, backward):
    """Block sizes, num_warps and num_stages of the forward (or backward) kernel for Lq queries
    of ``head_dim`` in ``dtype`` on a GPU with ``limits`` (kernels/_utils.py)."""
    if head_dim > 128:
        raise ValueError(f"head_dim {head_dim} > 128 is not supported by the Triton attention")
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(lq)))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:  # FMA products: see fma_block_n
        num_warps = 8 if block_m * block_d >= 64 * 64 else 4
        widest = fma_block_n(block_m, block_d, num_warps)
    else:
        # Tensor-core products; the backward's five dots need 8 warps to fit 255 registers
        # (at 4 its 64 x 64 x 128 tiles spill ~750 bytes; compile check, sm_80 / sm_90).
        num_warps = 8 if backward else 4
        widest = 64
    elt = dtype.itemsize
    for block_n in (64, 32, 16):
        if block_n > widest:
            continue
        # A K and a V tile per pipeline stage; resident: q (and dO in the backward) and the
        # (BLOCK_M, BLOCK_N) score tiles converted for the next product. This bounds the shared
        # memory of every configuration in the compile check's table (bf16 backward at
        # 64 x 64 x 128 uses all of it), so a smaller GPU gets fewer stages, not a failed launch.
        stage = 2 * block_n * block_d * elt
        resident = ((2 if backward else 1) * block_d + 2 * block_n) * block_m * elt
        num_stages = stages_that_fit(stage, resident, limits)
        if num_stages:
            return dict(
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                num_warps=num_warps,
                num_stages=num_stages,
            )
    raise ValueError(
        f"no Triton attention configuration for head_dim {head_dim} in {dtype} fits "
        f"{limits.max_shared_mem} bytes of shared memory (sm_{limits.arch})"
    )


def _mask_arg(key_padding_mask, q):
    """(B, Lk) uint8 view of the bool mask (Triton has no bool pointer loads), or a dummy."""
    if key_padding_mask is None:
        return q, 0, False
    mask = key_padding_mask.bool().contiguous().view(torch.uint8)
    return mask, mask.stride(0), True


def _inner_contiguous(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _dropout_args(dropout_p, dropout_seed, q):
    """SEED pointer, keep threshold and scale of the kernels; DROPOUT flag."""
    if dropout_p == 0.0:
        return (q, 0, 1.0), False
    threshold = min(round(dropout_p * 2**32), 2**32 - 1)
    return (dropout_seed, threshold, 1.0 / (1.0 - dropout_p)), True


def attend_fwd(
    q,
    k,
    v,
    key_padding_mask,
    scale,
    index=None,
    *,
    causal=False,
    dropout_p=0.0,
    dropout_seed=None,
    out=None,
    lse=None,
):
    """Forward shared by cross attention and the gathered one.

    q (B, H, Lq, D); k, v (N, H, Lk, D) with N = B, or any N when ``index`` (B,) int64 gives the
    K / V row of each batch entry; key_padding_mask (B, Lk) bool or None. ``out`` / ``lse``
    (tests pass poisoned buffers) are written in full. ``causal``: bottom-right aligned causal
    mask on top of the padding mask (self-attention). Returns out (B, H, Lq, D), lse (B, H, Lq).
    """
    q, k, v = _inner_contiguous(q, k, v)
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    if out is None:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty((batch, heads, lq), device=q.device, dtype=torch.float32)
    if batch == 0 or lq == 0:
        return out, lse
    config = attention_config(lq, d, q.dtype, device_limits(q.device), backward=False)
    mask, sm_b, has_mask = _mask_arg(key_padding_mask, q)
    idx = q if index is None else index.contiguous()
    (seed, threshold, keep_scale), dropout = _dropout_args(dropout_p, dropout_seed, q)
    args = (
        q,
        k,
        v,
        mask,
        idx,
        out,
        lse,
        seed,
        float(scale),
        threshold,
        keep_scale,
        heads,
        lq,
        lk,
        d,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        sm_b,
    )
    flags = dict(HAS_MASK=has_mask, HAS_IDX=index is not None, CAUSAL=bool(causal))
    flags["DROPOUT"] = dropout
    grid = (triton.cdiv(lq, config["BLOCK_M"]), batch * heads)
    launch(_cross_attention_fwd_kernel, grid, args, {**flags, **config})
    return out, lse


def cross_attention_fwd(
    q, k, v, key_padding_mask, scale, dropout_p=0.0, dropout_seed=None, *, out=None, lse=None
):
    """q (B, H, Lq, D), k / v (B, H, Lk, D), key_padding_mask (B, Lk) bool or None ->
    out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32."""
    return attend_fwd(
        q,
        k,
        v,
        key_padding_mask,
        scale,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        out=out,
        lse=lse,
    )


def _groups_by_row(index, rows):
    """The batch entries reading each K / V row, grouped on the device (no host sync):
    ``order`` (B,) lists them sorted by row (stable: ascending within a row, so dk / dv add in a
    fixed order); row r's are order[offsets[r] : offsets[r + 1]], ``offsets`` (rows + 1,)."""
    sorted_index, order = torch.sort(index, stable=True)
    offsets = torch.searchsorted(
        sorted_index, torch.arange(rows + 1, device=index.device, dtype=index.dtype)
    )
    return order, offsets


def attend_bwd(
    dout,
    q,
    k,
    v,
    key_padding_mask,
    out,
    lse,
    scale,
    index=None,
    *,
    causal=False,
    dropout_p=0.0,
    dropout_seed=None,
    grads=None,
):
    """Backward shared by cross attention and the gathered one: gradients of ``attend_fwd``
    from its out / lse. dq (B, H, Lq, D), dk / dv (N, H, Lk, D), contiguous, in the inputs'
    dtypes; with ``index`` a K / V row's dk / dv sum over every batch entry reading it, and a
    row no entry reads gets zeros. ``grads`` (tests pass poisoned contiguous buffers) =
    (dq, dk, dv) to write in full."""
    dout, q, k, v, out = _inner_contiguous(dout, q, k, v, out)
    batch, heads, lq, d = q.shape
    rows, _, lk, _ = k.shape
    if grads is None:
        grads = tuple(torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    dq, dk, dv = grads
    if batch * heads * lq == 0:  # no query: every key gets no gradient
        return dq, dk.zero_(), dv.zero_()
    config = attention_config(lq, d, q.dtype, device_limits(q.device), backward=True)
    mask, sm_b, has_mask = _mask_arg(key_padding_mask, q)
    order, offsets = (q, q) if index is None else _groups_by_row(index, rows)
    lse = lse.contiguous()
    (seed, threshold, keep_scale), dropout = _dropout_args(dropout_p, dropout_seed, q)
    args = (
        dout,
        q,
        k,
        v,
        mask,
        out,
        lse,
        order,
        offsets,
        dq,
        dk,
        dv,
        seed,
        float(scale),
        threshold,
        keep_scale,
        heads,
        lq,
        lk,
        d,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        lse.stride(0),
        lse.stride(1),
        sm_b,
    )
    flags = dict(HAS_MASK=has_mask, HAS_IDX=index is not None, CAUSAL=bool(causal))
    flags["DROPOUT"] = dropout
    launch(_cross_attention_bwd_kernel, (rows * heads,), args, {**flags, **config})
    return dq, dk, dv


def cross_attention_bwd(
    dout,
    q,
    k,
    v,
    key_padding_mask,
    out,
    lse,
    scale,
    dropout_p=0.0,
    dropout_seed=None,
    *,
    grads=None,
    causal=False,
):
    """Gradients of ``cross_attention_fwd`` from its out / lse: dq (B, H, Lq, D), dk / dv
    (B, H, Lk, D), contiguous, in the inputs' dtypes. ``grads`` (tests pass poisoned
    contiguous buffers) = (dq, dk, dv) to write in full."""
    return attend_bwd(
        dout,
        q,
        k,
        v,
        key_padding_mask,
        out,
        lse,
        scale,
        causal=causal,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        grads=grads,
    )


def attention_fwd(
    q,
    k,
    v,
    key_padding_mask,
    scale,
    causal,
    dropout_p=0.0,
    dropout_seed=None,
    *,
    out=None,
    lse=None,
):
    """Self-attention forward (``blip_fast::attention_fwd_triton``): the cross-attention kernel
    with CAUSAL switched on or off. q (B, H, Lq, D), k / v (B, H, Lk, D), Lq <= Lk with a KV
    cache when causal (bottom-right aligned) -> out (B, H, Lq, D), lse (B, H, Lq) fp32."""
    return attend_fwd(
        q,
        k,
        v,
        key_padding_mask,
        scale,
        causal=causal,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        out=out,
        lse=lse,
    )


def attention_bwd(
    dout,
    q,
    k,
    v,
    key_padding_mask,
    out,
    lse,
    scale,
    causal,
    dropout_p=0.0,
    dropout_seed=None,
    *,
    grads=None,
):
    """Gradients of ``attention_fwd`` (``blip_fast::attention_bwd_triton``) -> dq, dk, dv."""
    return cross_attention_bwd(
        dout,
        q,
        k,
        v,
        key_padding_mask,
        out,
        lse,
        scale,
        dropout_p,
        dropout_seed,
        grads=grads,
        causal=causal,
    )
