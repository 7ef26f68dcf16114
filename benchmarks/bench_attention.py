"""Cross-attention (text queries over image tokens): every available backend vs the reference,
forward and forward + backward, on BLIP's retrieval-eval and training shapes; self-attention
(the ``attention`` op: padded text, ViT tokens) the same way; then the gathered
cross-attention of ITM reranking (pairs read cached image K / V by index) vs copying K / V per
pair + sdpa, inference only.

    python benchmarks/bench_attention.py            # full shapes for this machine's device
    python benchmarks/bench_attention.py --quick    # small shapes, a smoke run

Writes benchmarks/results/attention-<device>.json (+ .png). Speed-up = reference time / time.
"""

import argparse

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch
import torch.nn.functional as F

from blip_fast.ops import _backend, attention, cross_attention, gathered_cross_attention

BACKENDS = ("reference", "sdpa", "cpu", "cuda", "triton", "xformers", "flash_attn")
HEADS, Q_LEN, HEAD_DIM = 12, 35, 64  # BERT-base heads, BLIP's retrieval text length, 768 / 12
# (batch of (image, text) pairs, image tokens): ITM reranking scores k_test pairs per image
# (ViT-B/384: 577 tokens) in batches; training uses 224 px (197 tokens) or 384 px images.
SHAPES = {
    "cpu": [(64, 577), (64, 197)],
    "cuda": [(512, 577), (512, 197)],
}
QUICK_SHAPES = [(4, 577), (4, 197)]
# (batch, tokens) for self-attention: reranker text batches (35 padded tokens, ~5 of them
# padding) and ViT-B/224's 197 tokens.
SELF_SHAPES = {"cpu": [(128, 35), (32, 197)], "cuda": [(512, 35), (256, 197)]}
QUICK_SELF_SHAPES = [(4, 35)]
# (pairs, images, image tokens) for the gathered op: a reranking batch of 512 pairs whose
# candidates come from 64 images (each image's K / V cached once).
GATHER_SHAPES = {"cpu": [(64, 16, 577)], "cuda": [(512, 64, 577), (512, 64, 197)]}
QUICK_GATHER_SHAPES = [(8, 4, 197)]


def make_case(batch, k_len, device, dtype):
    q = torch.randn(batch, HEADS, Q_LEN, HEAD_DIM, device=device, dtype=dtype)
    k, v = (torch.randn(batch, HEADS, k_len, HEAD_DIM, device=device, dtype=dtype) for _ in "kv")
    mask = torch.ones(batch, k_len, device=device, dtype=torch.bool)  # BLIP's image mask: all ones
    return q, k, v, mask


def make_self_case(batch, length, device, dtype):
    q, k, v = (
        torch.randn(batch, HEADS, length, HEAD_DIM, device=device, dtype=dtype) for _ in "qkv"
    )
    lengths = torch.randint(length - 10, length + 1, (batch,), device=device)
    return q, k, v, torch.arange(length, device=device)[None, :] < lengths[:, None]


def forward_fn(op, backend, q, k, v, mask):
    return lambda: op(q, k, v, mask, backend=backend)


def forward_backward_fn(op, backend, q, k, v, mask):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)

    def step():
        out = op(*leaves, mask, backend=backend)
        return torch.autograd.grad(out, leaves, dout)

    return step


def make_gather_case(pairs, images, k_len, device, dtype):
    q = torch.randn(pairs, HEADS, Q_LEN, HEAD_DIM, device=device, dtype=dtype)
    k_cache, v_cache = (
        torch.randn(images, HEADS, k_len, HEAD_DIM, device=device, dtype=dtype) for _ in "kv"
    )
    index = torch.randint(0, images, (pairs,), device=device)
    return q, k_cache, v_cache, index


def gather_fns(q, k_cache, v_cache, index, device):
    """Providers of the gathered op: the naive copy + sdpa, and each available backend."""

    def copy_sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k_cache[index], v_cache[index])

    fns = {"copy+sdpa": copy_sdpa}
    for backend in ("reference", "cpu", "cuda", "triton"):
        if _backend.available("gathered_cross_attention", backend, device):

            def fn(backend=backend):
                with torch.no_grad():
                    return gathered_cross_attention(q, k_cache, v_cache, index, backend=backend)

            fns[backend] = fn
    return fns


def time_providers(fns, device, args):
    """Providers take turns, round after round, and each keeps its fastest round: on a shared
    machine a slow spell then hits every provider alike instead of one."""
    best = {}
    for _ in range(args.rounds):
        for backend, fn in fns.items():
            timing = _harness.time_ms(fn, device, args.min_run_time)
            if backend not in best or timing["median_ms"] < best[backend]["median_ms"]:
                best[backend] = timing
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case")
    args = parser.parse_args()
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    backends = [b for b in BACKENDS if _backend.available("cross_attention", b, device)]
    shapes = QUICK_SHAPES if args.quick else SHAPES[device]
    print(f"{_harness.device_name(device)}; torch {torch.__version__}; backends {backends}")

    rows = []
    self_shapes = QUICK_SELF_SHAPES if args.quick else SELF_SHAPES[device]
    cases = [
        ("", cross_attention, backends, make_case(batch, k_len, device, dtype), batch, Q_LEN, k_len)
        for batch, k_len in shapes
    ]
    self_backends = [b for b in BACKENDS if _backend.available("attention", b, device)]
    cases += [
        (
            "self ",
            attention,
            self_backends,
            make_self_case(batch, length, device, dtype),
            batch,
            length,
            length,
        )
        for batch, length in self_shapes
    ]
    for label, op, op_backends, inputs, batch, q_len, k_len in cases:
        flops_fwd = 4 * batch * HEADS * q_len * k_len * HEAD_DIM
        for mode, make_fn, flops in (
            ("fwd", forward_fn, flops_fwd),
            ("fwd+bwd", forward_backward_fn, 3.5 * flops_fwd),
        ):
            case = f"{label}{mode} {batch}x{HEADS}x{q_len}x{k_len}"
            fns = {backend: make_fn(op, backend, *inputs) for backend in op_backends}
            best = time_providers(fns, device, args)
            ref_ms = best["reference"]["median_ms"]
            for backend, timing in best.items():
                row = {
                    "case": case,
                    "mode": label + mode,
                    "provider": backend,
                    "batch": batch,
                    "heads": HEADS,
                    "q_len": q_len,
                    "k_len": k_len,
                    "head_dim": HEAD_DIM,
                    "dtype": str(dtype).removeprefix("torch."),
                    **timing,
                    "gflops": flops / timing["median_ms"] / 1e6,
                    "speedup_vs_reference": ref_ms / timing["median_ms"],
                }
                rows.append(row)
                print(
                    f"{case:33s} {backend:10s} {timing['median_ms']:9.2f} ms "
                    f"(p20 {timing['p20_ms']:.2f}, p80 {timing['p80_ms']:.2f})  "
                    f"{row['gflops']:7.1f} GFLOP/s  x{row['speedup_vs_reference']:.2f} vs reference"
                )
    for pairs, images, k_len in QUICK_GATHER_SHAPES if args.quick else GATHER_SHAPES[device]:
        inputs = make_gather_case(pairs, images, k_len, device, dtype)
        case = f"gathered {pairs}x{HEADS}x{Q_LEN}x{k_len} ({images} images)"
        best = time_providers(gather_fns(*inputs, device), device, args)
        flops = 4 * pairs * HEADS * Q_LEN * k_len * HEAD_DIM
        base_ms = best["copy+sdpa"]["median_ms"]
        for provider, timing in best.items():
            row = {
                "case": case,
                "mode": "gathered fwd",
                "provider": provider,
                "batch": pairs,
                "images": images,
                "heads": HEADS,
                "q_len": Q_LEN,
                "k_len": k_len,
                "head_dim": HEAD_DIM,
                "dtype": str(dtype).removeprefix("torch."),
                **timing,
                "gflops": flops / timing["median_ms"] / 1e6,
                "speedup_vs_reference": best["reference"]["median_ms"] / timing["median_ms"],
                "speedup_vs_copy_sdpa": base_ms / timing["median_ms"],
            }
            rows.append(row)
            print(
                f"{case:28s} {provider:10s} {timing['median_ms']:9.2f} ms "
                f"(p20 {timing['p20_ms']:.2f}, p80 {timing['p80_ms']:.2f})  "
                f"{row['gflops']:7.1f} GFLOP/s  x{row['speedup_vs_copy_sdpa']:.2f} vs copy+sdpa"
            )
    name = "attention-quick" if args.quick else "attention"
    print("wrote", _harness.write_results(name, device, rows, plot=not args.no_plot))


if __name__ == "__main__":
    main()
