"""Every benchmark of this machine's device, one after another, then README's tables.

    python benchmarks/run_all.py [--device cpu|cuda] [--allow-dirty] [--skip NAME ...]

Refuses an uncommitted tree (``--allow-dirty``: a dry run, results in a temporary folder and
README left alone). Each step runs as its own process; a failing step stops the run, naming it.
On a clean tree the last step rewrites README's tables from benchmarks/results/ (commit both).
On the CPU the configs are sized to finish within about 15 minutes on 2 cores.
"""

import argparse
import subprocess
import sys
import time

import _harness
import torch

OP_BENCHMARKS = ["attention", "cross_attention", "gathered_cross_attention", "itc", "linear"]
OP_BENCHMARKS += ["lm_head_loss", "optimizer"]
# name -> command, after `python`; the per-op modules share one pytest session (one start-up).
STEPS = {
    "ops": ["-m", "pytest", "-p", "no:cacheprovider", "-q"]
    + [f"benchmarks/bench_{name}.py" for name in OP_BENCHMARKS],
    "train_step": ["benchmarks/bench_train_step.py"],
    "retrieval_eval": ["benchmarks/bench_retrieval_eval.py"],
    "retrieval_eval_base": ["benchmarks/bench_retrieval_eval.py", "--config"]
    + ["blip_base_vit_b16_224", "--images", "32", "--k-test", "16", "--reference-fraction", "0.1"]
    + ["--no-kernel-reference", "--no-linear-baseline", "--flop-images", "0"],
    "vqa_rank": ["benchmarks/bench_vqa_rank.py"],
    "caption": ["benchmarks/bench_caption.py"],
    "demo": ["benchmarks/bench_demo.py"],
    "data": ["benchmarks/bench_data.py"],
    "search": ["benchmarks/bench_search.py"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    args = p.parse_args()
    _harness.require_clean(args.allow_dirty)
    dry_run = ["--allow-dirty"] if args.allow_dirty else []
    start = time.perf_counter()
    for name, command in STEPS.items():
        if name in args.skip:
            continue
        # the demo and the loaders run on whatever device torch sees
        device = [] if name in ("demo", "data") else ["--device", args.device]
        step_args = device + dry_run
        print(f"== {name}: python {' '.join(command + step_args)}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run([sys.executable, *command, *step_args], cwd=_harness.REPO).returncode:
            sys.exit(f"benchmark step {name!r} failed; results of the steps before it are written")
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.allow_dirty:
        print(f"dry run: results under {_harness.DRY_RUN_DIR}; README not rendered")
        return
    if subprocess.run([sys.executable, "benchmarks/tables.py"], cwd=_harness.REPO).returncode:
        sys.exit("benchmarks/tables.py refused the results (see above)")
    print(f"all benchmarks in {time.perf_counter() - start:.0f} s; README tables rewritten")


if __name__ == "__main__":
    main()
