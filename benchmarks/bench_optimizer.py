"""One AdamW step over a model's trainable parameters: torch's default implementation (what
official BLIP runs) vs the fused kernel ``train.optim.build_optimizer`` uses, same gradients.

    python benchmarks/bench_optimizer.py [--config blip_demo] [--device cpu|cuda]

Writes benchmarks/results/optimizer-<device>.json. Speed-up = default time / fused time.
"""

import argparse

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch

from blip_fast import create_model
from blip_fast.train.optim import build_optimizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="blip_demo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = create_model("pretrain", args.config).to(args.device)
    params = [q for q in model.parameters() if q.requires_grad]
    g = torch.Generator(device=args.device).manual_seed(0)
    for q in params:
        q.grad = torch.randn(q.shape, generator=g, device=args.device)
    n = sum(q.numel() for q in params)
    optimizers = {
        "default": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05),
        "fused": build_optimizer(model, 1e-4),
    }
    rows = []
    for name, opt in optimizers.items():
        t = _harness.time_ms(opt.step, args.device)
        rows.append({"case": f"{args.config} ({n / 1e6:.1f}M params)", "provider": name, **t})
    speedup = rows[0]["median_ms"] / rows[1]["median_ms"]
    rows[1]["speedup"] = speedup
    for r in rows:
        print(f"{r['case']}  {r['provider']:8s} {r['median_ms']:8.2f} ms/step")
    print(f"fused / default speed-up: {speedup:.2f}x")
    print("wrote", _harness.write_results("optimizer", args.device, rows))


if __name__ == "__main__":
    main()
