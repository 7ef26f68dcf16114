"""Inference linear layers: ``F.linear`` (reference: MKL's SGEMM in torch's CPU wheels) vs
``PackedLinear`` (oneDNN, weight prepacked once; ``blip_fast.ops.linear``), fp32, no grad, on
the GEMM shapes of ITM reranking: (pairs x text tokens) rows through the text layers of
``blip_small_demo`` (hidden 256, FFN 1024) and of BERT-base (768, 3072).

    python benchmarks/bench_linear.py [--threads N] [--rows R]

Writes benchmarks/results/linear-cpu.json (+ .png): time, GFLOP/s, speed-up = reference time /
packed time. A CPU benchmark: on CUDA both would be cuBLAS.
"""

import argparse

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch
from torch import nn

from blip_fast.ops import PackedLinear

# (in_features, out_features, activation): attention / cross-attention projections, FFN up
# (with its GELU fused into the packed GEMM) and FFN down.
LAYERS = {
    "blip_small_demo": [(256, 256, None), (256, 1024, "gelu"), (1024, 256, None)],
    "bert_base": [(768, 768, None), (768, 3072, "gelu"), (3072, 768, None)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--rows",
        type=int,
        default=128 * 23,
        help="input rows: the reranker's 128 pairs x 23 tokens (synthetic captions)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(_harness.device_name("cpu"))
    rows = []
    for model, shapes in LAYERS.items():
        for n_in, n_out, activation in shapes:
            linear = nn.Linear(n_in, n_out)
            packed = PackedLinear(linear, activation)
            x = torch.randn(args.rows, n_in)
            act = (lambda y: y) if activation is None else torch.nn.functional.gelu
            case = f"{model} {args.rows}x{n_in}->{n_out}" + (
                f" +{activation}" if activation else ""
            )
            flop = 2 * args.rows * n_in * n_out
            with torch.no_grad():
                for provider, fn in (
                    ("reference", lambda act=act, linear=linear, x=x: act(linear(x))),
                    ("onednn", lambda packed=packed, x=x: packed(x)),
                ):
                    t = _harness.time_ms(fn, "cpu", min_run_time=0.5)
                    rows.append(
                        {
                            "case": case,
                            "provider": provider,
                            **t,
                            "gflop_per_s": flop / t["median_ms"] / 1e6,
                        }
                    )
            ref, fast = rows[-2], rows[-1]
            fast["speedup"] = ref["median_ms"] / fast["median_ms"]
            print(
                f"{case:42s} reference {ref['gflop_per_s']:6.1f} GFLOP/s, onednn "
                f"{fast['gflop_per_s']:6.1f} GFLOP/s: {fast['speedup']:.2f}x"
            )
    print("wrote", _harness.write_results("linear", "cpu", rows))


if __name__ == "__main__":
    main()
