"""Training steps (pre-training ITC + ITM + LM, retrieval ITC + ITM, captioning LM), the
official math against blip-fast's, with each speed lever's share, in one run:

    reference      eager, every op on its reference kernel, every lever off (the official step)
    fast           best kernel per op, every lever on, torch.compile'd step
    fast eager     the same without torch.compile
    fast eager -X  fast eager with lever X off (train.main.StepLevers; "kernels": every op on
                   its reference kernel), so X's share is time(-X) / time(fast eager)
    fast eager +image_token_drop  pre-training with half the patch tokens dropped (FLIP-style;
                   it changes the objective, so it is measured, not a default)
    reference +keep_freed_memory  CPU: the official step with the one lever that is not its
                   math, glibc keeping freed blocks (train.heap), so that fast / this row is
                   the speed-up on equal allocator terms

A lever that does nothing in a task gets no row (captioning has no ITM pass and no momentum
encoder, and the official caption batches are already padded to their longest caption).
GPU: bf16 autocast for the blip-fast rows and model-FLOPs utilisation (the FLOPs of one step
counted by torch.utils.flop_counter.FlopCounterMode, over the device's dense bf16 peak).

    python benchmarks/bench_train_step.py    # CPU: blip_small_demo at 224 px, batch 16
    python benchmarks/bench_train_step.py --config blip_base_vit_b16_224 --batch 64   # GPU

Batches come from the real training pipeline (files, decoding, tokeniser, Collate) over the
synthetic image-caption set with its captions cut to Flickr30k-like lengths: a word count
drawn per caption from a log-normal of mean 12.3 words and s.d. 5.2 (the synthetic captions
themselves run to 12-31 tokens, mean 23, close to the official 30 / 35-token padding, which
would hide what padding costs on real captions). Each row runs in its own process (compile
caches and allocator state stay apart) on the same batches; after warm-up (compilation
included, every batch seen once) each step is timed on its own: the median with quartiles over
``--steps`` (>= 5), samples/s at the median. Then one more step measures peak memory beyond
what exists before it (CUDA: max_memory_allocated; CPU: peak resident set, with glibc told to
give every buffer above 128 KiB its own mapping, returned when freed, or, under
keep_freed_memory, which maps nothing, the free pages of the heap returned first, so that what
earlier steps left in the heap does not hide this step's allocations). Writes
results/train_step-<device>.json; refuses an uncommitted tree unless ``--allow-dirty``.
"""

import argparse
import ctypes
import dataclasses
import json
import math
import random
import subprocess
import sys
import tempfile
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch

LEVERS = ("share_image_kv", "itm_enc_only", "fused_lm_head_loss", "foreach_momentum")
LEVERS += ("pad_to_longest", "fused_attention_dropout", "keep_freed_memory")
CPU_LEVERS = ("keep_freed_memory",)  # no-ops on a GPU: no rows there
# the levers that change anything in each task
TASK_LEVERS = {
    "pretrain": LEVERS,
    "retrieval": LEVERS[:2] + LEVERS[3:],
    "caption": ("fused_lm_head_loss", "fused_attention_dropout", "keep_freed_memory"),
}
DISTINCT_BATCHES = 3
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# Flickr30k-like caption lengths in words (log-normal with this mean and s.d.)
CAPTION_WORDS_MEAN, CAPTION_WORDS_SD = 12.3, 5.2


def rows_for(task: str, cpu: bool, lever_rows: bool = True) -> dict[str, dict]:
    """Row name -> (backend, compile, levers off, image_token_drop)."""
    rows = {
        "reference": dict(backend="reference", compile=False, off=LEVERS),
        "fast": dict(backend=None, compile=True, off=()),
        "fast eager": dict(backend=None, compile=False, off=()),
    }
    if cpu:
        rows["reference +keep_freed_memory"] = dict(
            backend="reference", compile=False, off=tuple(x for x in LEVERS if x not in CPU_LEVERS)
        )
    if not lever_rows:
        return rows
    rows["fast eager -kernels"] = dict(backend="reference", compile=False, off=())
    for lever in TASK_LEVERS[task]:
        if cpu or lever not in CPU_LEVERS:
            rows[f"fast eager -{lever}"] = dict(backend=None, compile=False, off=(lever,))
    if task == "pretrain":
        rows["fast eager +image_token_drop"] = dict(
            backend=None, compile=False, off=(), image_token_drop=0.5
        )
    return rows


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _step_peak_mib(trainer, batch, device) -> float:
    """Memory one more step needs beyond what exists before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer.step(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak resident set := current
    base = _rss_kib("VmRSS")
    trainer.step(batch)
    return (_rss_kib("VmHWM") - base) / 1024


def _mfu(trainer, batch, device, seconds: float) -> float | None:
    """Model-FLOPs utilisation of a step of ``seconds`` on a GPU with a known bf16 peak."""
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)
    if peak is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step(batch)
    return counter.get_total_flops() / seconds / (peak * 1e12)


def worker(args) -> dict:
    from blip_fast.train.main import StepLevers, build_trainer

    row = rows_for(args.task, args.device == "cpu")[args.worker]
    device = torch.device(args.device)
    fast = args.worker != "reference"
    precision = "bf16" if device.type == "cuda" and fast else "fp32"
    y = json.loads(args.train_config)
    if "image_token_drop" in row:
        y["image_token_drop"] = row["image_token_drop"]
    trainer = build_trainer(
        args.task,
        y,
        args.tmp,
        device=device,
        compile=row["compile"],
        precision=precision,
        num_workers=0,
        backend=row["backend"],
        levers=dataclasses.replace(StepLevers(), **dict.fromkeys(row["off"], False)),
    )
    loader = iter(trainer.loader)
    batches = [next(loader) for _ in range(DISTINCT_BATCHES)]
    for i in range(max(args.warmup, DISTINCT_BATCHES)):
        trainer.step(batches[i % DISTINCT_BATCHES])
    seconds = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        trainer.step(batches[i % DISTINCT_BATCHES])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    timing = _harness.summarize(seconds)
    out = {
        "provider": args.worker,
        "precision": precision,
        **timing,
        "samples_per_s": args.batch / timing["median_ms"] * 1e3,
        "peak_extra_mib": _step_peak_mib(trainer, batches[0], device),
        "text_tokens": [int(b["ids"].shape[1]) for b in batches],
        "step_times_ms": [1e3 * s for s in seconds],
    }
    if device.type == "cuda":
        out["mfu"] = _mfu(trainer, batches[0], device, timing["median_ms"] / 1e3)
    return out


def flickr_length_captions(data: dict, root: str) -> dict:
    """The synthetic set's train / pretrain annotation files with each caption cut to a word
    count drawn from the Flickr30k-like log-normal (never longer than it was)."""
    sigma2 = math.log1p((CAPTION_WORDS_SD / CAPTION_WORDS_MEAN) ** 2)
    rng = random.Random(0)
    out = dict(data)
    for key in ("train", "pretrain"):
        ann = json.loads(open(data[key]).read())
        for a in ann:
            words = a["caption"].split()
            n = round(rng.lognormvariate(math.log(CAPTION_WORDS_MEAN) - sigma2 / 2, sigma2**0.5))
            a["caption"] = " ".join(words[: max(1, n)])
        out[key] = f"{root}/{key}_flickr_lengths.json"
        with open(out[key], "w") as f:
            json.dump(ann, f)
    return out


def train_config(task: str, args, data: dict) -> dict:
    """Official-style keys of ``task`` on the synthetic set (train/main.py reads them)."""
    return {
        "model": args.config,
        "image_size": args.image_size,
        "train_file": str(data["pretrain" if task == "pretrain" else "train"]),
        "image_root": str(data["root"]),
        "batch_size": args.batch,
        "init_lr": 1e-5,
        "max_epoch": 1,
        "train_augment": False,  # no augmentation cost in the step's batches
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--config", default="blip_base_vit_b16_224" if cuda else "blip_small_demo")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64 if cuda else 16)
    p.add_argument("--tasks", nargs="+", choices=TASK_LEVERS, default=list(TASK_LEVERS))
    p.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps (>= 5)")
    p.add_argument("--warmup", type=int, default=DISTINCT_BATCHES)
    p.add_argument(
        "--lever-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the rows with one lever off (--no-lever-rows: reference, fast, fast eager only)",
    )
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--train-config", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 5:
        p.error(f"--steps {args.steps}: a median needs at least 5 timed steps")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    commit = _harness.require_clean(args.allow_dirty)
    from blip_fast.data import make_synthetic

    scratch = tempfile.TemporaryDirectory(prefix="blip_fast_bench_train_step_")  # removed at exit
    tmp = scratch.name
    data = make_synthetic(
        tmp, n_train_images=2 * args.batch * DISTINCT_BATCHES, n_test_images=1, n_val_images=1
    )
    data = flickr_length_captions(data, tmp)
    rows = []
    for task in args.tasks:
        case = f"{task} {args.config} {args.image_size}px B={args.batch}"
        for name in rows_for(task, args.device == "cpu", args.lever_rows):
            cmd = [sys.executable, __file__, "--worker", name, "--task", task]
            cmd += ["--device", args.device, "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += ["--train-config", json.dumps(train_config(task, args, data))]
            cmd += ["--tmp", f"{tmp}/{task}-{name.replace(' ', '_')}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{task} / {name} failed:\n{out.stderr[-4000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"case": case, "task": task, "config": args.config, **row})
            mfu = f"  MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
            print(
                f"{task:9s} {name:30s} {row['precision']} median {row['median_ms']:8.1f} ms "
                f"({row['q1_ms']:.1f}-{row['q3_ms']:.1f}) {row['samples_per_s']:7.1f} samples/s"
                f"  peak +{row['peak_extra_mib']:.0f} MiB  text {row['text_tokens']}{mfu}",
                flush=True,
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
