"""Image loading throughput: the CPU loader (make_loader, worker processes) and DALI (GPU
``mixed`` decoder when there is a GPU, DALI's CPU operators otherwise) on one JPEG set, test
transform at 224 and 384 px, images/s over whole epochs after one warm-up epoch.

    python benchmarks/bench_data.py            # 256 images, ~1 min on a 2-core machine
    python benchmarks/bench_data.py --images 4096 --epochs 3 --batch-size 256   # a GPU machine

JPEGs: scikit-image's / scikit-learn's photos (427x640 to 1411x1411) when installed, else
synthetic 512 px scenes, repeated to ``--images`` files. Target on one H100: >= 3000 img/s
at 384 px with DALI. Writes benchmarks/results/data-<device>.json; refuses an uncommitted tree
unless ``--allow-dirty`` (a dry run). A script, not a pytest-benchmark module: it times whole
epochs of loaders whose worker processes start once.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import torch

from blip_fast.data import (
    RetrievalEvalDataset,
    Uint8TestTransform,
    dali,
    make_loader,
    make_synthetic,
)
from blip_fast.data.photos import sample_photos

SIZES = (224, 384)


def jpeg_set(folder: str, n: int) -> str:
    """``n`` JPEG files (real photos repeated) and an eval annotation over them."""
    photos = sample_photos()
    if not photos:
        paths = make_synthetic(
            os.path.join(folder, "synthetic"),
            n_train_images=16,
            n_test_images=1,
            n_val_images=1,
            image_size=512,
        )
        photos = sorted(str(p) for p in (paths["root"] / "images" / "train").glob("*.jpg"))
    files = []
    for i in range(n):
        dst = os.path.join(folder, f"{i:06d}.jpg")
        shutil.copyfile(photos[i % len(photos)], dst)
        files.append(dst)
    ann = os.path.join(folder, "ann.json")
    with open(ann, "w", encoding="utf-8") as f:
        json.dump([{"image": p, "caption": ["x"]} for p in files], f)
    return ann


def images_per_s(loader, epochs: int) -> float:
    for _ in loader:  # warm-up: workers / pipeline start, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch[0].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    a = p.parse_args()
    commit = _harness.require_clean(a.allow_dirty)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = {
        "cpu-loader": lambda ds: make_loader(ds, a.batch_size, num_workers=a.workers, backend="cpu")
    }
    if dali.available():
        providers["dali-gpu" if device == "cuda" else "dali-cpu"] = lambda ds: dali.DaliLoader(
            ds, a.batch_size, device_id="auto", num_threads=a.workers
        )
    else:
        print(f"skipping DALI: {dali.IMPORT_ERROR}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        ann = jpeg_set(folder, a.images)
        for size in SIZES:
            ds = RetrievalEvalDataset(ann, "/", Uint8TestTransform(size))
            for name, make in providers.items():
                rate = images_per_s(make(ds), a.epochs)
                rows.append(
                    {
                        "case": f"{size}px",
                        "provider": name,
                        "images_per_s": rate,
                        "images": a.images,
                        "batch_size": a.batch_size,
                        "workers": a.workers,
                    }
                )
                print(f"{size}px {name:12s} {rate:8.0f} img/s")
    path = _harness.write_results(
        "data",
        device,
        rows,
        sources=["blip_fast/data", *_harness.HARNESS_SOURCES, "benchmarks/bench_data.py"],
        commit=commit,
        allow_dirty=a.allow_dirty,
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
