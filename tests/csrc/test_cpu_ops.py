"""The C++ CPU kernels of blip_fast._C called directly: forward / backward vs the reference
oracle on tile edges, strides and low precision, and the argument checks' messages."""

import pytest
import torch
from _utils import TOL, assert_close_verbose

from blip_fast.ops import reference

pytestmark = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("blip_fast::cross_attention_fwd", "CPU"),
    reason="blip_fast._C not built",
)

fwd = torch.ops.blip_fast.cross_attention_fwd
bwd = torch.ops.blip_fast.cross_attention_bwd


def make_inputs(b, h, lq, lk, d, dtype=torch.float32):
    q, k, v = (torch.randn(b, h, n, d).to(dtype) for n in (lq, lk, lk))
    lengths = torch.randint(1, lk + 1, (b,))
    mask = torch.arange(lk)[None, :] < lengths[:, None]
    return q, k, v, mask


def check_against_reference(q, k, v, mask, scale, tol):
    """Forward and backward of the C++ op vs the reference run on fp32 copies of the inputs."""
    out, lse = fwd(q, k, v, mask, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    qf, kf, vf = (t.float() for t in (q, k, v))
    ref_out, ref_lse = reference.cross_attention_fwd(qf, kf, vf, mask, scale)
    assert_close_verbose(out, ref_out, **tol, name="out")
    assert_close_verbose(lse, ref_lse, **tol, name="lse")
    dout = torch.randn_like(out)
    grads = bwd(dout, q, k, v, mask, out, lse, scale)
    ref_grads = reference.cross_attention_bwd(
        dout.float(), qf, kf, vf, mask, ref_out, ref_lse, scale
    )
    for name, grad, ref, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_close_verbose(grad, ref, **tol, name=f"d{name}")


# (B, H, Lq, Lk, D): tile edges of the kernel (64 queries, 64 keys, 16-wide vectors).
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1, 1, 1, 1),
        (2, 3, 35, 577, 64),
        (1, 2, 64, 64, 16),  # exactly one tile each way
        (1, 2, 65, 129, 17),  # one past a tile / the vector width
        (2, 1, 130, 63, 72),  # three query tiles, one short key tile
    ],
)
def test_matches_reference_fp32(shape):
    b, h, lq, lk, d = shape
    check_against_reference(*make_inputs(b, h, lq, lk, d), scale=d**-0.5, tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision_within_1e_2(dtype):
    check_against_reference(*make_inputs(2, 3, 35, 197, 64, dtype), scale=0.125, tol=TOL[dtype])


def test_without_mask():
    check_against_reference(*make_inputs(2, 2, 7, 50, 64)[:3], None, 0.125, TOL[torch.float32])


def test_fully_masked_row_attends_to_all_keys():
    # Official BERT adds −10000, not −inf, so a fully masked row still averages its keys. Its
    # scores sit near −10000, where fp32 values are 2^-10 apart: any two summation orders of
    # q·k may round them differently, so the row agrees only to ~1e-3 (the reference included).
    q, k, v, mask = make_inputs(2, 2, 7, 50, 64)
    mask[1] = False
    check_against_reference(q, k, v, mask, 0.125, dict(rtol=2e-3, atol=2e-3))


def test_large_scores_stay_finite():
    # Scores in the hundreds over five key tiles: the online softmax must rescale, not
    # overflow. (Only the forward is compared: with one key dominating, dP − delta cancels to
    # fp32 rounding noise in any implementation, the reference's included.)
    q, k, v, mask = make_inputs(1, 2, 5, 300, 64)
    q = q * 30
    out, lse = fwd(q, k, v, None, 0.125)
    ref_out, ref_lse = reference.cross_attention_fwd(q, k, v, None, 0.125)
    assert_close_verbose(out, ref_out, **TOL[torch.float32], name="out")
    assert_close_verbose(lse, ref_lse, **TOL[torch.float32], name="lse")
    assert bool(lse.max() > 100)
    grads = bwd(torch.randn_like(out), q, k, v, None, out, lse, 0.125)
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_strided_inputs():
    # q / k / v as a model produces them: (B, L, H, D) viewed as (B, H, L, D); and one with a
    # non-unit last stride, which the op copies.
    b, h, lq, lk, d = 2, 3, 35, 197, 64
    q = torch.randn(b, lq, h, d).transpose(1, 2)
    k = torch.randn(b, lk, h, d).transpose(1, 2)
    v = torch.randn(b, h, d, lk).transpose(2, 3)
    mask = torch.rand(b, lk) > 0.3
    mask[:, 0] = True
    check_against_reference(q, k, v, mask, d**-0.5, TOL[torch.float32])


def test_same_result_with_one_thread():
    q, k, v, mask = make_inputs(4, 3, 35, 197, 64)
    out, lse = fwd(q, k, v, mask, 0.125)
    grads = bwd(torch.ones_like(out), q, k, v, mask, out, lse, 0.125)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out1, lse1 = fwd(q, k, v, mask, 0.125)
        grads1 = bwd(torch.ones_like(out), q, k, v, mask, out, lse, 0.125)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip((out1, lse1, *grads1), (out, lse, *grads)):
        assert torch.equal(got, want)


def test_no_queries():
    q, k, v, mask = make_inputs(2, 3, 0, 13, 64)
    out, lse = fwd(q, k, v, mask, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 3, 0)
    dq, dk, dv = bwd(out, q, k, v, mask, out, lse, 0.125)
    assert dq.shape == q.shape and torch.count_nonzero(dk) == 0 and torch.count_nonzero(dv) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, m: (q[0], k, v, m), r"q must be \[B, H, Lq, D\] \(rank 4\)"),
        (
            lambda q, k, v, m: (q, k[..., :32], v[..., :32], m),
            r"head dim mismatch: q has D = 64 but k",
        ),
        (lambda q, k, v, m: (q, k, v[:, :, :5], m), r"v must have k's shape"),
        (lambda q, k, v, m: (q, k[:1], v[:1], m), r"batch and heads of k"),
        (lambda q, k, v, m: (q, k, v, m[:, :5]), r"key_padding_mask must be \[B, Lk\] = \[2, 13\]"),
        (lambda q, k, v, m: (q, k, v, m.float()), r"key_padding_mask must be bool"),
        (lambda q, k, v, m: (q, k.double(), v, m), r"k has dtype Double but q has dtype Float"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), r"q must be float32, float64, float16"),
        (lambda q, k, v, m: (q, k[:, :, :0], v[:, :, :0], m[:, :0]), r"no keys \(Lk = 0\)"),
    ],
)
def test_bad_inputs_name_the_problem(change, message):
    q, k, v, mask = make_inputs(2, 3, 7, 13, 64)
    with pytest.raises(RuntimeError, match=message):
        fwd(*change(q, k, v, mask), 0.125)


def test_bad_backward_inputs_name_the_problem():
    q, k, v, mask = make_inputs(2, 3, 7, 13, 64)
    out, lse = fwd(q, k, v, mask, 0.125)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[2, 3, 7\]"):
        bwd(out, q, k, v, mask, out, lse[:, :, :3], 0.125)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        bwd(out, q, k, v, mask, out, lse.double(), 0.125)
    with pytest.raises(RuntimeError, match="dout must have q's shape"):
        bwd(out[:, :, :3], q, k, v, mask, out, lse, 0.125)


# Gathered cross-attention: P pairs over the K / V caches of N images, pair p reading image
# index[p]. The backward stacks the queries of every pair that reads an image into one block of
# rows, so an image's dK / dV sum over its pairs inside one work item.
gathered_fwd = torch.ops.blip_fast.gathered_cross_attention_fwd
gathered_bwd = torch.ops.blip_fast.gathered_cross_attention_bwd


def make_caches(pairs, images, lq, lk, d, heads=3, dtype=torch.float32):
    q = torch.randn(pairs, heads, lq, d).to(dtype)
    k_cache, v_cache = (torch.randn(images, heads, lk, d).to(dtype) for _ in "kv")
    return q, k_cache, v_cache


def check_gathered_against_reference(q, k_cache, v_cache, index, scale, tol):
    """Forward and backward of the C++ gathered ops vs the reference oracle's autograd on fp32
    copies; the gradients of an image no pair reads must be exactly 0."""
    out, lse = gathered_fwd(q, k_cache, v_cache, index, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    leaves = [t.float().requires_grad_() for t in (q, k_cache, v_cache)]
    ref_out = reference.gathered_cross_attention(*leaves, index, scale=scale)
    ref_lse = reference.gathered_cross_attention_fwd(*leaves, index, scale)[1]
    assert_close_verbose(out, ref_out, **tol, name="out")
    assert_close_verbose(lse, ref_lse, **tol, name="lse")
    dout = torch.randn_like(out)
    grads = gathered_bwd(dout, q, k_cache, v_cache, index, out, lse, scale)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout.float())
    unread = torch.ones(k_cache.shape[0], dtype=torch.bool)
    unread[index] = False
    for name, grad, ref, x in zip(
        ("q", "k_cache", "v_cache"), grads, ref_grads, (q, k_cache, v_cache)
    ):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert bool(torch.isfinite(grad).all()), f"d{name} has NaN / inf"
        assert_close_verbose(grad, ref, **tol, name=f"d{name}")
    for name, grad in zip(("k_cache", "v_cache"), grads[1:]):
        assert torch.count_nonzero(grad[unread]) == 0, f"d{name} of an unread image"


# (pairs, images, Lq, Lk, D, index): repeated / out-of-order / all-the-same indices with an image
# no pair reads; an image's rows 65 = one past a query tile (13 × 5), split inside a pair; one
# query tile exactly; many pairs per image over two key tiles; the timing shape of the report.
@pytest.mark.parametrize(
    "pairs, images, lq, lk, d, index",
    [
        (6, 3, 9, 77, 40, [2, 0, 2, 1, 0, 2]),
        (6, 3, 9, 77, 40, [2, 0, 2, 0, 0, 2]),
        (6, 3, 9, 77, 40, [1, 1, 1, 1, 1, 1]),
        (5, 2, 13, 129, 17, [0, 0, 0, 0, 0]),
        (3, 4, 64, 64, 16, [3, 1, 0]),
        (20, 5, 35, 130, 64, None),
        (48, 16, 20, 197, 64, None),
    ],
)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_gathered_matches_reference(pairs, images, lq, lk, d, index, dtype):
    index = torch.tensor(index) if index is not None else torch.randint(0, images, (pairs,))
    check_gathered_against_reference(
        *make_caches(pairs, images, lq, lk, d, dtype=dtype), index, d**-0.5, TOL[torch.float32]
    )


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gathered_low_precision_within_1e_2(dtype):
    index = torch.tensor([3, 0, 3, 1, 0, 3, 1, 3])  # image 2 unread
    check_gathered_against_reference(
        *make_caches(8, 4, 35, 197, 64, dtype=dtype), index, 0.125, TOL[dtype]
    )


def test_gathered_strided_inputs():
    # q / caches as a model produces them: (N, L, H, D) viewed as (N, H, L, D).
    pairs, images, lq, lk, heads, d = 5, 3, 35, 197, 3, 64
    q = torch.randn(pairs, lq, heads, d).transpose(1, 2)
    k_cache, v_cache = (torch.randn(images, lk, heads, d).transpose(1, 2) for _ in "kv")
    index = torch.tensor([2, 0, 0, 2, 2])
    check_gathered_against_reference(q, k_cache, v_cache, index, d**-0.5, TOL[torch.float32])


def test_gathered_same_result_with_one_thread():
    q, k_cache, v_cache = make_caches(24, 6, 35, 197, 64)
    index = torch.randint(0, 6, (24,))
    out, lse = gathered_fwd(q, k_cache, v_cache, index, 0.125)
    dout = torch.randn_like(out)
    grads = gathered_bwd(dout, q, k_cache, v_cache, index, out, lse, 0.125)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads1 = gathered_bwd(dout, q, k_cache, v_cache, index, out, lse, 0.125)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(grads1, grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("pairs, lq", [(0, 7), (4, 0)])
def test_gathered_no_queries(pairs, lq):
    q, k_cache, v_cache = make_caches(pairs, 3, lq, 13, 64)
    index = torch.zeros(pairs, dtype=torch.long)
    out, lse = gathered_fwd(q, k_cache, v_cache, index, 0.125)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    dq, dk, dv = gathered_bwd(out, q, k_cache, v_cache, index, out, lse, 0.125)
    assert dq.shape == q.shape and dk.shape == dv.shape == k_cache.shape
    assert torch.count_nonzero(dk) == 0 and torch.count_nonzero(dv) == 0


def test_gathered_bad_inputs_name_the_problem():
    q, k_cache, v_cache = make_caches(4, 2, 7, 13, 40)
    index = torch.tensor([0, 1, 1, 0])
    out, lse = gathered_fwd(q, k_cache, v_cache, index, 0.1)
    out_of_range = torch.tensor([0, 1, 2, 1])
    with pytest.raises(RuntimeError, match=r"fwd: image_index holds values in \[0, 2\] but the"):
        gathered_fwd(q, k_cache, v_cache, out_of_range, 0.1)
    with pytest.raises(RuntimeError, match=r"bwd: image_index holds values in \[-1, 1\]"):
        gathered_bwd(out, q, k_cache, v_cache, torch.tensor([0, -1, 1, 0]), out, lse, 0.1)
    with pytest.raises(RuntimeError, match="image_index must be int64"):
        gathered_fwd(q, k_cache, v_cache, index.int(), 0.1)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[4, 3, 7\]"):
        gathered_bwd(out, q, k_cache, v_cache, index, out, lse[:, :, :3], 0.1)
    with pytest.raises(RuntimeError, match="dout must have q's shape"):
        gathered_bwd(out[:, :, :3], q, k_cache, v_cache, index, out, lse, 0.1)
    with pytest.raises(RuntimeError, match=r"v_cache must have k_cache's shape"):
        gathered_bwd(out, q, k_cache, v_cache[:1], index, out, lse, 0.1)


# The bf16 forward on the CPU's bf16 instructions (AMX tiles, else AVX512-BF16): products with
# bf16 operands and fp32 accumulation, P rounded to bf16 before P V. BLIP_FAST_CPU_BF16_PRODUCTS
# caps the instructions it may use ("amx", "avx512_bf16", "fp32"); each cap must match the
# reference, and on a CPU that has the instructions each must take its own path.
BF16_PRODUCTS = ("amx", "avx512_bf16", "fp32")


def bf16_forward(monkeypatch, products, *args, gathered=False):
    monkeypatch.setenv("BLIP_FAST_CPU_BF16_PRODUCTS", products)
    return (gathered_fwd if gathered else fwd)(*args)


# (B, H, Lq, Lk, D): BLIP's reranker tile; odd Lq / Lk around the 16-row tiles, the 64-key and
# the 64-query tiles; head_dim 40 (not a multiple of a tile row's 32 bf16) and an odd one.
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 35, 577, 64), (1, 2, 65, 129, 40), (2, 1, 130, 63, 40), (1, 2, 17, 33, 17)],
)
@pytest.mark.parametrize("products", BF16_PRODUCTS)
def test_bf16_products_match_reference(monkeypatch, products, shape):
    b, h, lq, lk, d = shape
    q, k, v, mask = make_inputs(b, h, lq, lk, d, torch.bfloat16)
    out, lse = bf16_forward(monkeypatch, products, q, k, v, mask, d**-0.5)
    ref_out, ref_lse = reference.cross_attention_fwd(q.float(), k.float(), v.float(), mask, d**-0.5)
    assert out.dtype == torch.bfloat16
    assert_close_verbose(out, ref_out, **TOL[torch.bfloat16], name="out")
    assert_close_verbose(lse, ref_lse, **TOL[torch.bfloat16], name="lse")


# 9 pairs over 3 of 4 images: K / V packed once per image for all pairs; 4 pairs over 4
# images: packed per pair
@pytest.mark.parametrize("index", ([3, 0, 3, 1, 0, 3, 1, 3, 0], [2, 0, 3, 1]))
@pytest.mark.parametrize("products", BF16_PRODUCTS)
def test_gathered_bf16_products_match_reference(monkeypatch, products, index):
    q, k_cache, v_cache = make_caches(len(index), 4, 35, 197, 40, dtype=torch.bfloat16)
    index = torch.tensor(index)
    out, lse = bf16_forward(monkeypatch, products, q, k_cache, v_cache, index, 0.125, gathered=True)
    caches = (k_cache.float(), v_cache.float())
    ref_out, ref_lse = reference.gathered_cross_attention_fwd(q.float(), *caches, index, 0.125)
    assert_close_verbose(out, ref_out, **TOL[torch.bfloat16], name="out")
    assert_close_verbose(lse, ref_lse, **TOL[torch.bfloat16], name="lse")


@pytest.mark.parametrize("products", BF16_PRODUCTS)
def test_gathered_bf16_shared_images_give_each_pair_its_own_result(monkeypatch, products):
    """Pairs that share images (K / V packed once for all of them) get bit for bit what each
    pair gets alone (packed for itself)."""
    q, k_cache, v_cache = make_caches(8, 3, 35, 197, 40, dtype=torch.bfloat16)
    index = torch.tensor([2, 0, 2, 0, 2, 0, 0, 2])
    out, lse = bf16_forward(monkeypatch, products, q, k_cache, v_cache, index, 0.125, gathered=True)
    for p in (0, 1, 7):
        alone = bf16_forward(
            monkeypatch,
            products,
            q[p : p + 1],
            k_cache,
            v_cache,
            index[p : p + 1],
            0.125,
            gathered=True,
        )
        assert torch.equal(alone[0][0], out[p]) and torch.equal(alone[1][0], lse[p]), p


def test_bf16_products_use_the_instructions_the_cpu_has(monkeypatch):
    # Each path is deterministic, so two caps give bitwise-equal results exactly when they run
    # the same code: the fp32 path keeps P in fp32, and AMX sums a tile's products in another
    # order than vdpbf16ps, which shows in the fp32 lse.
    has = {
        "amx": torch.cpu._is_amx_tile_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
    }
    q, k, v, mask = make_inputs(2, 3, 35, 577, 64, torch.bfloat16)
    results = {p: bf16_forward(monkeypatch, p, q, k, v, mask, 0.125) for p in BF16_PRODUCTS}

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(results[a], results[b]))

    assert same("avx512_bf16", "fp32") != has["avx512_bf16"]
    assert same("amx", "avx512_bf16") != has["amx"]


def test_an_unknown_bf16_products_cap_is_an_error(monkeypatch):
    q, k, v, mask = make_inputs(1, 2, 5, 9, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="BLIP_FAST_CPU_BF16_PRODUCTS=amx2: expected amx"):
        bf16_forward(monkeypatch, "amx2", q, k, v, mask, 0.25)


# Attention dropout (training's cross-attention, p 0.1): the kernels drop what
# reference.dropout_keep drops, counted over (B, H, Lq, Lk) in the forward's tiles (keys
# transposed) and, regenerated from the seed, in the backward's stacked rows (pair p's queries
# beside those of the other pairs reading its image).
SEED = torch.tensor([(1 << 45) + 777])


def dropout_cases():
    return [
        ("plain", (2, 3, 35, 197, 64), None),
        ("plain", (1, 2, 65, 129, 17), None),  # one past a query tile and a key tile
        ("gathered", (6, 3, 9, 77, 40), [2, 0, 2, 1, 0, 2]),
        ("gathered", (5, 2, 13, 129, 17), [0, 0, 0, 0, 0]),  # rows split inside a pair
    ]


@pytest.mark.parametrize("kind, shape, index", dropout_cases())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_dropout_drops_what_the_reference_drops(kind, shape, index, dtype):
    b, h, lq, lk, d = shape
    scale, p = d**-0.5, 0.1
    if kind == "plain":
        q, k, v, mask = make_inputs(b, h, lq, lk, d, dtype)
        extra, ops = (
            (mask,),
            (fwd, bwd, reference.cross_attention_fwd, reference.cross_attention_bwd),
        )
    else:
        q, k, v = make_caches(b, max(index) + 2, lq, lk, d, heads=h, dtype=dtype)
        extra = (torch.tensor(index),)
        ops = (
            gathered_fwd,
            gathered_bwd,
            reference.gathered_cross_attention_fwd,
            reference.gathered_cross_attention_bwd,
        )
    kernel_fwd, kernel_bwd, ref_fwd, ref_bwd = ops
    out, lse = kernel_fwd(q, k, v, *extra, scale, p, SEED)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.to(wide) for t in (q, k, v))
    ref_out, ref_lse = ref_fwd(qf, kf, vf, *extra, scale, p, SEED)
    undropped = ref_fwd(qf, kf, vf, *extra, scale)[0]
    assert not torch.allclose(ref_out, undropped, atol=1e-3)  # the mask changes the output
    tol = TOL[dtype]
    assert_close_verbose(out, ref_out, **tol, name="out")
    assert_close_verbose(lse, ref_lse, **tol, name="lse")
    dout = torch.randn_like(out)
    grads = kernel_bwd(dout, q, k, v, *extra, out, lse, scale, p, SEED)
    ref_grads = ref_bwd(dout.to(wide), qf, kf, vf, *extra, ref_out, ref_lse, scale, p, SEED)
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert bool(torch.isfinite(grad).all()), f"{name} has NaN / inf"
        assert_close_verbose(grad, ref, **tol, name=name)


def test_dropout_seed_decides_the_mask():
    q, k, v, mask = make_inputs(2, 2, 7, 70, 16)
    first = fwd(q, k, v, mask, 0.25, 0.1, SEED)[0]
    assert torch.equal(first, fwd(q, k, v, mask, 0.25, 0.1, SEED.clone())[0])
    assert not torch.equal(first, fwd(q, k, v, mask, 0.25, 0.1, SEED + 1)[0])


@pytest.mark.parametrize(
    "p, seed, message",
    [
        (0.1, None, "needs dropout_seed"),
        (0.1, torch.tensor([1, 2]), "needs dropout_seed"),
        (1.0, SEED, "dropout_p must be in \\[0, 1\\)"),
        (-0.1, SEED, "dropout_p must be in"),
    ],
)
def test_bad_dropout_arguments_name_the_problem(p, seed, message):
    q, k, v, mask = make_inputs(1, 1, 3, 5, 8)
    with pytest.raises(RuntimeError, match=message):
        fwd(q, k, v, mask, 0.3, p, seed)
