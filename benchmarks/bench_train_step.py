"""One training step (retrieval fine-tuning: ITC + ITM with hard negatives, momentum update,
queue write, AdamW), reference vs fast, in one run:

    reference  eager, fp32, every op on its reference backend (the official math)
    fast       best backend per op (fused ITC, fused attention), torch.compile'd step,
               bf16 autocast on a GPU (fp32 on the CPU)

    python benchmarks/bench_train_step.py                    # CPU: blip_small_demo, batch 16
    python benchmarks/bench_train_step.py --config blip_base_vit_b16_224 --batch 64   # GPU

Each provider runs in its own process (compile caches and allocator state stay apart) on the
same random batches. After the warm-up steps (which include compilation) every step is timed on
its own; reported: the median step time with its quartiles over ``--steps`` (>= 5) steps,
samples/s at the median, and peak memory (CUDA: max_memory_allocated; CPU: peak resident set
growth over the timed steps, from /proc/self/status). Writes results/train_step-<device>.json;
refuses an uncommitted tree unless ``--allow-dirty`` (a dry run).

An end-to-end script, not a pytest-benchmark module: each provider needs a process of its own.
"""

import argparse
import json
import subprocess
import sys
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch

PROVIDERS = {
    "reference": dict(backend="reference", compile=False),
    "fast": dict(backend=None, compile=True),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _batches(cfg, n: int, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.vision.image_size, 35
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 20000, (batch, L), generator=g)
        ids[:, 0] = 101
        mask = (torch.arange(L)[None] < torch.randint(8, L + 1, (batch, 1), generator=g)).long()
        out.append(
            {
                "image": torch.randn(batch, 3, S, S, generator=g).to(device),
                "ids": (ids * mask).to(device),
                "mask": mask.to(device),
                "idx": torch.randint(0, batch, (batch,), generator=g).to(device),
            }
        )
    return out


def worker(args) -> dict:
    from blip_fast import create_model
    from blip_fast.models.configs import BlipConfig
    from blip_fast.train.distributed import DistInfo
    from blip_fast.train.loop import LoopConfig, Trainer
    from blip_fast.train.optim import LRSchedule, build_optimizer
    from blip_fast.train.task import ContrastiveTask

    device = torch.device(args.device)
    opts = PROVIDERS[args.worker]
    cfg = BlipConfig.preset(args.config)
    model = create_model("retrieval", cfg, backend=opts["backend"]).to(device)
    model.copy_params()
    precision = "bf16" if device.type == "cuda" and args.worker == "fast" else "fp32"
    trainer = Trainer(
        ContrastiveTask(model),
        None,
        None,
        build_optimizer(model, 1e-5),
        LRSchedule("cosine", 1e-5),
        LoopConfig(max_epoch=1, alpha_ramp=False, precision=precision, compile=opts["compile"]),
        DistInfo(device=device),
        args.tmp,
    )
    batches = _batches(cfg, 2, args.batch, device)
    for i in range(args.warmup):
        trainer.step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak resident set := current
        base = _rss_kib("VmRSS") * 1024
    seconds = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        trainer.step(batches[i % 2])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    ) - base
    timing = _harness.summarize(seconds)
    return {
        "provider": args.worker,
        "precision": precision,
        **timing,
        "samples_per_s": args.batch / timing["median_ms"] * 1e3,
        "peak_extra_mib": peak / 2**20,
        "step_times_ms": [1e3 * s for s in seconds],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--config", default="blip_base_vit_b16_224" if cuda else "blip_small_demo")
    p.add_argument("--batch", type=int, default=64 if cuda else 16)
    p.add_argument("--steps", type=int, default=20 if cuda else 10, help="timed steps (>= 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    p.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/blip_fast_bench_train_step", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 5:
        p.error(f"--steps {args.steps}: a median needs at least 5 timed steps")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    commit = _harness.require_clean(args.allow_dirty)
    rows = []
    for name in PROVIDERS:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--device",
            args.device,
            "--config",
            args.config,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-4000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"case": f"{args.config} B={args.batch}", "config": args.config, **row})
        print(
            f"{name:10s} {row['precision']} median {row['median_ms']:9.1f} ms/step (quartiles "
            f"{row['q1_ms']:.1f}-{row['q3_ms']:.1f}) {row['samples_per_s']:8.1f} samples/s  "
            f"peak +{row['peak_extra_mib']:.0f} MiB"
        )
    path = _harness.write_results(
        "train_step",
        args.device,
        rows,
        sources=[*_harness.PACKAGE_SOURCES, "benchmarks/bench_train_step.py"],
        commit=commit,
        allow_dirty=args.allow_dirty,
        baselines=("reference",),
    )
    _harness.print_ratios(rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
