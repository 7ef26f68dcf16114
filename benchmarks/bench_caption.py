"""Caption generation of the trained demo model: reference (official eager math) vs blip-fast's
decoding, fp32 and bf16.

Captioners, all with the same weights on the same test images, beam search with 3 beams,
max length 20, min length 5 (official COCO decoding; lengths count the prompt):
    reference   eager fp32, every op on its ``reference`` backend, as official BLIP computes
                (the decoding loop, ``models.generation``, is the same for all three)
    fast        ``BlipCaption.generate`` on the best backends, fp32
    fast bf16   ``generate(precision="bf16")``: ViT and decoder under bf16 autocast, on a CPU
                with AMX / AVX512-BF16 on prepacked bf16 weights (oneDNN), the decoder's layers
                in fp32 where they weigh little beside its LM head (the demo model's); each
                beam's 16 largest logits recomputed in fp32, beam scores fp32
                (default where bf16 is native: CUDA, or such a CPU)
``reference`` is the baseline: every row gets its ratio to it. Each captioner is warmed up on
two images, then they take turns ``--repeats`` times over the whole set, each keeping its
fastest run (``best_s``; ``best_cpu_s``: the process's CPU time, steadier on a shared
machine). Every row records the share of images whose caption equals fast fp32's
(``identical_to_fast``); the bf16 row also its speed-up over fast fp32
(``speedup_vs_fast_fp32``, ``cpu_speedup_vs_fast_fp32``). A share means something only for
a trained model: random weights give near-tied logits everywhere.

The model is ``blip-fast demo``'s (pre-trained from scratch on the synthetic set: its decoder
captions without a prompt, as the demo's do): ``--checkpoint`` one saved by ``blip-fast demo
--save``, or, without it, the demo is run here first (defaults, a few minutes on 2 cores).
The test images are the demo's (synthetic set, seed 0, regenerated here). The demo model is
tiny (one 128-wide text layer): its decoding step is mostly (beams, 30524-word) passes, and bf16
keeps its layers in fp32. Further cases, speed only, caption the same images with random weights of
the ``--random`` presets (default ``blip_small_demo``: 4 text layers of 256, 100 images, and
``blip_base_vit_b16_224``: ViT-B/16 and a 12-layer BERT-base decoder as people serve it, 12
images), with the official prompt, where the GEMMs weigh more; their caption agreement is not
meaningful.

    python benchmarks/bench_caption.py [--checkpoint PATH] [--device cpu|cuda] [--images N]
        [--random PRESET[:IMAGES] ...] [--batch-size B] [--threads N] [--repeats R]
        [--allow-dirty]

Writes benchmarks/results/caption[_<N>t]-<device>.json; refuses an uncommitted tree unless
``--allow-dirty`` (a dry run).
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch

from blip_fast.checkpoint import load
from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
from blip_fast.models import create_model
from blip_fast.models.blip_caption import BlipCaption
from blip_fast.ops import _backend
from blip_fast.ops.linear import native_bf16

DECODING = dict(num_beams=3, max_length=20, min_length=5)
DEMO_TEST_IMAGES, DEMO_IMAGE_SIZE = 100, 128  # blip-fast demo's defaults


@dataclasses.dataclass
class Captioner:
    model: BlipCaption
    precision: str

    def __call__(self, images, batch_size):
        out = []
        for i in range(0, len(images), batch_size):
            out += self.model.generate(
                images[i : i + batch_size], precision=self.precision, **DECODING
            )
        return out


def train_demo(folder: str) -> str:
    """Run ``blip-fast demo`` (defaults) and return the path of the model it saved."""
    path = os.path.join(folder, "demo.pth")
    command = [sys.executable, "-m", "blip_fast.cli", "demo", "--data", folder, "--save", path]
    print("training the demo model:", " ".join(command[1:]), flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return path


def demo_captioners(checkpoint: str, device) -> tuple[BlipCaption, BlipCaption]:
    """(reference, fast) copies of the demo's captioner: the pre-trained model's ViT and
    decoder, no prompt."""
    out = []
    for backend in ("reference", None):
        model = load(checkpoint, task="pretrain", backend=backend)
        cap = BlipCaption(dataclasses.replace(model.cfg, prompt=""), backend)
        cap.visual_encoder, cap.text_decoder = model.visual_encoder, model.text_decoder
        out.append(cap.to(device).eval())
    return tuple(out)


def random_captioners(config: str, device) -> tuple[BlipCaption, BlipCaption]:
    """(reference, fast) captioners of preset ``config`` with the same random weights."""
    torch.manual_seed(0)
    fast = create_model("caption", config).to(device).eval()
    reference = create_model("caption", config, backend="reference").to(device).eval()
    reference.load_state_dict(fast.state_dict())
    return reference, fast


def measure(case: str, models, images, args) -> list[dict]:
    """Rows of the reference / fast / fast bf16 captioners of ``models`` (reference, fast) on
    ``images``: warm-up, alternated timed runs, captions compared with fast fp32's."""
    reference, fast = models
    captioners = {"reference": Captioner(reference, "fp32"), "fast": Captioner(fast, "fp32")}
    gpu = args.device.startswith("cuda")
    if args.bf16 if args.bf16 is not None else gpu or native_bf16():
        captioners["fast bf16"] = Captioner(fast, "bf16")
    load_before = os.getloadavg()[0]
    for c in captioners.values():  # first calls: allocation, weight packing, lazy init
        c(images[:2], args.batch_size)
    runs, cpu, captions = {n: [] for n in captioners}, {n: [] for n in captioners}, {}
    for _ in range(args.repeats):  # alternated: a slow spell of a shared machine hits all
        for name, c in captioners.items():
            if gpu:
                torch.cuda.synchronize()
            # process CPU time too: what other processes of a busy machine take from the wall
            # clock is not in it (the cache misses they cause are)
            t, t_cpu = time.perf_counter(), time.process_time()
            captions[name] = c(images, args.batch_size)
            if gpu:
                torch.cuda.synchronize()
            runs[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - t_cpu)
            print(f"{case}, {name}: {runs[name][-1]:.2f} s ({cpu[name][-1]:.2f} s CPU)", flush=True)
    common = {
        "case": case,
        "images": len(images),
        "image_size": fast.cfg.vision.image_size,
        "text_layers": fast.cfg.text.num_layers,
        "text_hidden": fast.cfg.text.hidden_size,
        "batch_size": args.batch_size,
        "decoding": DECODING,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }
    rows = []
    for name, c in captioners.items():
        same = sum(a == b for a, b in zip(captions[name], captions["fast"])) / len(images)
        row = {
            **common,
            "provider": name,
            "precision": c.precision,
            "best_s": min(runs[name]),
            "runs_s": runs[name],
            "best_cpu_s": min(cpu[name]),
            "images_per_s": len(images) / min(runs[name]),
            "identical_to_fast": same,
            "captions": captions[name][:5],
        }
        if c.precision == "bf16":
            row["speedup_vs_fast_fp32"] = min(runs["fast"]) / min(runs[name])
            row["cpu_speedup_vs_fast_fp32"] = min(cpu["fast"]) / min(cpu[name])
        rows.append(row)
    return rows


def test_images(folder: str, n: int, size: int, device):
    """The demo's first ``n`` test images (synthetic set, seed 0) at ``size`` px: (n, 3, S, S)."""
    paths = make_synthetic(
        folder, n_train_images=1, n_test_images=n, n_val_images=1, image_size=DEMO_IMAGE_SIZE
    )
    ds = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(size))
    return torch.stack([ds[i][0] for i in range(len(ds.image))]).to(device)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", help="model saved by `blip-fast demo --save` (default: train)")
    p.add_argument("--images", type=int, default=DEMO_TEST_IMAGES, help="test images to caption")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="alternated runs, fastest kept")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--random",
        nargs="*",
        default=["blip_small_demo", "blip_base_vit_b16_224:12"],
        metavar="PRESET[:IMAGES]",
        help="presets of the random-weight speed cases (IMAGES: default --images)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="the fast bf16 row (default: CUDA, or a CPU with native bf16)",
    )
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    return p.parse_args()


def main():
    args = parse_args()
    commit = _harness.require_clean(args.allow_dirty)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    # removed at exit: a demo checkpoint and images per run would pile up on the disk
    scratch = tempfile.TemporaryDirectory(prefix="bench_caption_")
    folder = scratch.name
    checkpoint = args.checkpoint or train_demo(folder)
    cases = [(f"demo model, {args.images} images", args.images, demo_captioners(checkpoint, dev))]
    for spec in args.random:
        config, _, n = spec.partition(":")
        n = int(n) if n else args.images
        cases.append((f"{config} random, {n} images", n, random_captioners(config, dev)))
    print(
        f"{_harness.device_name(dev)}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; batch {args.batch_size}, {DECODING}"
    )
    rows = []
    for case, n, models in cases:
        images = test_images(os.path.join(folder, "test"), n, models[1].cfg.vision.image_size, dev)
        rows += measure(case, models, images, args)
    backends = {op: _backend.resolve(op, dev) for op in _backend.PREFERENCE}
    demo = args.checkpoint or "blip-fast demo, trained here"
    rows = [{**r, "backends": backends, "native_bf16": native_bf16(), "demo": demo} for r in rows]
    name = "caption" + (f"_{args.threads}t" if args.threads else "")
    path = _harness.write_results(
        name,
        dev,
        rows,
        sources=[*_harness.PACKAGE_SOURCES, "benchmarks/bench_caption.py"],
        commit=commit,
        allow_dirty=args.allow_dirty,
        baselines=("reference",),
        time_key="best_s",
    )
    _harness.print_ratios(rows, time_key="best_s")
    for row in rows:
        print(
            f"{row['case']}, {row['provider']}: {row['images_per_s']:.1f} images/s, captions "
            f"identical to fast fp32's on {row['identical_to_fast']:.0%} of images"
            + (
                f", x{row['speedup_vs_fast_fp32']:.2f} vs fast (CPU time: "
                f"x{row['cpu_speedup_vs_fast_fp32']:.2f})"
                if "speedup_vs_fast_fp32" in row
                else ""
            )
        )
    print("wrote", path)


if __name__ == "__main__":
    main()
