"""``blip-fast demo`` end to end, as a user runs it: wall time (data generation, training,
retrieval evaluation, captions) and the retrieval metrics it reaches. The demo's target: TR@1
and IR@1 >= 50% on the 100 test images within 3 minutes on a 2-core CPU (the metrics alone are
also asserted by tests/test_demo.py). Extra arguments go to the demo unchanged. Where bf16 is
native (a GPU, a CPU with AMX / AVX512-BF16) the trained model is then evaluated again, fast
mode, in fp32 and in bf16 on the same test split: the metric deltas bf16 moves a trained model
by (``precision_deltas``; target: R@1 / R@5 / R@10 each within 0.5 of fp32), on
``DELTA_IMAGES`` new synthetic test images (the demo's own 100 move TR@1 by a whole point per
image).

    python benchmarks/bench_demo.py [--repeats N] [--allow-dirty] [-- demo arguments]

Writes results/demo-<device>.json (the demo trains on CUDA when torch sees a GPU); refuses an
uncommitted tree unless ``--allow-dirty`` (a dry run). A script, not a pytest-benchmark module:
it times a whole command in a process of its own, once per repeat, and keeps the fastest.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch

from blip_fast.ops.linear import native_bf16

DELTA_IMAGES, DEMO_IMAGE_SIZE = 500, 128  # DEMO_IMAGE_SIZE: the demo's rendered JPEGs


def precision_deltas(root: str, checkpoint: str, k_test: int) -> dict:
    """Retrieval metrics of the demo's saved model on ``DELTA_IMAGES`` synthetic test images
    (written under ``root``), fast evaluation in fp32 and in bf16, and the largest
    |bf16 - fp32| over R@1 / R@5 / R@10."""
    from blip_fast import load, tokenizer
    from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
    from blip_fast.eval import retrieval

    model = load(checkpoint, task="pretrain")
    size = model.cfg.vision.image_size
    paths = make_synthetic(
        os.path.join(root, "deltas"), 0, DELTA_IMAGES, 0, image_size=DEMO_IMAGE_SIZE, seed=1
    )
    ds = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(size))
    metrics = {
        p: retrieval.evaluate(model, ds, tokenizer(), k_test=k_test, precision=p)
        for p in ("fp32", "bf16")
    }
    keys = [f"{side}_r{k}" for side in ("txt", "img") for k in (1, 5, 10)]
    return {
        "images": DELTA_IMAGES,
        "k_test": k_test,
        **{p: {k: m[k] for k in keys} for p, m in metrics.items()},
        "max_abs_delta": max(abs(metrics["bf16"][k] - metrics["fp32"][k]) for k in keys),
    }


def run_demo(extra: list[str]) -> dict:
    bf16 = torch.cuda.is_available() or native_bf16()
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as root:
        load = os.getloadavg()[0]
        checkpoint = os.path.join(root, "demo.pth")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "blip_fast.cli", "demo", "--data", root, *extra]
            + (["--save", checkpoint] if bf16 else []),
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        k_test = int(extra[extra.index("--k-test") + 1]) if "--k-test" in extra else 16
        deltas = precision_deltas(root, checkpoint, k_test) if bf16 else None
    out = proc.stdout
    metrics_line = next(x for x in out.splitlines() if x.startswith("txt_r1="))
    return {
        "wall_s": wall,
        "load_avg_1min": [load, os.getloadavg()[0]],
        "precision": re.search(r"^precision: (.*)$", out, re.M).group(1),
        "training_s": float(re.search(r"trained in (\d+) s", out).group(1)),
        "setup": re.search(r"training (.*) on", out).group(1),
        "metrics": {k: float(v) for k, v in (kv.split("=") for kv in metrics_line.split())},
        "captions": [x for x in out.splitlines() if x.startswith("caption ")],
        **({"bf16_vs_fp32": deltas} if deltas else {}),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    p.add_argument("demo_args", nargs="*", help="arguments for blip-fast demo (after --)")
    args = p.parse_args()
    commit = _harness.require_clean(args.allow_dirty)
    runs = [run_demo(args.demo_args) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["wall_s"])
    m = best["metrics"]
    print(
        f"demo {' '.join(args.demo_args) or '(defaults)'}, {best['precision']}: "
        f"{best['wall_s']:.1f} s wall "
        f"(training {best['training_s']:.0f} s), TR@1 {m['txt_r1']:.1f}, IR@1 {m['img_r1']:.1f}"
        f"; target >= 50 / 50 within 180 s: "
        f"{'met' if min(m['txt_r1'], m['img_r1']) >= 50 and best['wall_s'] <= 180 else 'NOT met'}"
    )
    if "bf16_vs_fp32" in best:
        d = best["bf16_vs_fp32"]
        print(
            f"trained model, fast evaluation: fp32 {d['fp32']}, bf16 {d['bf16']}; largest "
            f"|bf16 - fp32| {d['max_abs_delta']:.2f} (target <= 0.5: "
            f"{'met' if d['max_abs_delta'] <= 0.5 else 'NOT met'})"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = {
        "case": " ".join(args.demo_args) or "defaults",
        "provider": "blip-fast demo",
        "best_wall_s": best["wall_s"],
        "runs_wall_s": [r["wall_s"] for r in runs],
        **best,
    }
    path = _harness.write_results(
        "demo",
        device,
        [row],
        sources=[*_harness.PACKAGE_SOURCES, "benchmarks/bench_demo.py"],
        commit=commit,
        allow_dirty=args.allow_dirty,
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
