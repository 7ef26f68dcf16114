"""Search latency: the ITC candidate stage exact vs approximate, and ITM reranking with the
candidates' image tokens recomputed vs stored.

(a) Vectors: random unit vectors, dim 256, stored float16 in an index folder as ``Index``
    stores them, at ``--sizes`` (10^5, 10^6) items. Exact blocked top-k
    (``rank.exact_top_k``, the default) against faiss (``blip_fast.search.ann``: HNSW up to
    200k items, IVFFlat above, its search parameter calibrated at build): the faiss build time,
    recall@10 of approximate against exact over ``--queries`` random unit queries, and per-query
    latency p50 / p95, one query at a time as a user searches (exact: the first
    ``--exact-queries`` of them). Each faiss index is also measured at a quarter of its
    calibrated search parameter: the recall it trades for speed. faiss runs on the CPU.
(b) Reranking: one text query end to end (``Index.search``, k 10, ``--candidates`` reranked by
    ITM), random weights, on ``blip_demo`` and on ``blip_base_vit_b16_384`` (ViT-B at 384 px),
    over an index of synthetic photos as large as the candidate count. The candidates' ViT
    tokens recomputed from the files (the default; the reference) against tokens stored at
    build (``--store-tokens fp16`` / ``int8``): latency p50 / p95 over ``--rerank-queries``
    (base: ``--base-queries``) queries after one warm-up, bytes per item, and the top-10
    agreement of the int8-token ranking with the fp16-token one; with bf16 (CUDA, or a CPU with
    AMX / AVX512-BF16) also the recomputed path reranking in bf16 (``Index(...,
    precision="bf16")``) and its top-10 agreement with fp32's. Base on the CPU is slow (a
    recomputed query runs ViT-B/384 over every candidate: over a minute for 128): one timed
    query after the warm-up, and no int8 index.

(c) Index build: images per second of ``Index.build`` over ``--build-images`` synthetic
    480 px JPEGs (decoding, resizing, the ViT, the commits), with image decoding in the main
    process and in ``--num-workers`` processes, against the bare ViT + projection forward on
    the same images already decoded, in batches of the same size (32): the share of the
    build the model itself takes. ``blip_base_vit_b16_224``; ms per image, 2 rounds each.

    python benchmarks/bench_search.py [--sizes N ...] [--device cpu|cuda] [--skip-base]
        [--build-images N] [--num-workers N] [--allow-dirty]

Rows carry ``median_ms`` (p50), ``p95_ms`` and ratios against the section's reference (exact;
recomputed tokens), and the 1-minute load average around them (others may share the CPU).
Writes results/search-<device>.json; refuses an uncommitted tree unless ``--allow-dirty``.
"""

import argparse
import os
import statistics
import tempfile
import time

import _harness  # benchmarks/ is on sys.path when this file runs as a script
import numpy as np
import torch

from blip_fast import create_model
from blip_fast.data import load_image, make_synthetic, test_transform
from blip_fast.ops.linear import native_bf16
from blip_fast.search import Index, rank
from blip_fast.search.ann import AnnIndex
from blip_fast.search.encode import encode_pixels
from blip_fast.search.sources import Item
from blip_fast.search.store import Store
from blip_fast.search.tokens import bytes_per_item

DIM, K = 256, 10
QUERIES = [
    "a dog running on the beach",
    "two people riding bicycles down a city street",
    "a plate of food with broccoli and rice",
    "a red double decker bus",
    "a cat sleeping on a laptop keyboard",
    "a man surfing a large wave",
    "a kitchen with wooden cabinets",
    "a giraffe standing next to a tree",
    "a small blue triangle on the left of a red circle",
    "a group of children playing soccer",
    "an airplane flying over the mountains",
    "a bowl of fruit on a table",
]


def latency(fn, args) -> dict:
    """p50 / p95 in ms of ``fn(a)`` over ``args``, after one warm-up call."""
    fn(args[0])
    seconds = []
    for a in args:
        t0 = time.perf_counter()
        fn(a)
        seconds.append(time.perf_counter() - t0)
    p50 = statistics.median(seconds)
    p95 = float(np.percentile(seconds, 95)) if len(seconds) > 1 else p50
    return {"median_ms": p50 * 1e3, "p95_ms": p95 * 1e3, "rounds": len(seconds)}


def unit_vectors(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1)


def vector_store(root: str, n: int) -> Store:
    """An index folder of ``n`` random unit float16 features (one chunk)."""
    store = Store.create(root, {"model": None, "embed_dim": DIM, "image_size": 0, "sources": []})
    feats = np.concatenate(
        [unit_vectors(min(1 << 17, n - s), s + 1).half().numpy() for s in range(0, n, 1 << 17)]
    )
    store.commit(feats, [Item(f"/vectors/{i}") for i in range(n)], [])
    return store


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(
        np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, exact)])
    )


def vector_rows(n: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_search_") as root:
        store = vector_store(root, n)
        queries = unit_vectors(args.queries, 0)
        load = os.getloadavg()[0]
        exact = rank.exact_top_k(store, queries, K)[1]
        case = f"vectors {n} x {DIM} fp16, top-{K}"
        rows = [
            {
                "case": case,
                "provider": "exact",
                "recall_at_10": 1.0,
                **latency(
                    lambda q: rank.exact_top_k(store, q[None], K), queries[: args.exact_queries]
                ),
            }
        ]
        t0 = time.perf_counter()
        ann = AnnIndex.for_store(store)
        build_s = time.perf_counter() - t0
        record = dict(ann.record)
        for value in dict.fromkeys([max(1, record["value"] // 4), record["value"]]):
            ann.set_parameter(value)
            rows.append(
                {
                    "case": case,
                    "provider": f"faiss {record['kind']} {record['param']}={value}",
                    "recall_at_10": recall_at_k(ann.search(queries, K)[1], exact),
                    "faiss_build_s": build_s,
                    "faiss_record": record,
                    **latency(lambda q: ann.search(q[None], K), queries),
                }
            )
    for row in rows:
        row["load_avg_1min"] = [load, os.getloadavg()[0]]
    _harness.add_ratios(rows, ("exact",))
    return rows


def rerank_rows(name: str, candidates: int, n_queries: int, formats, device: str) -> list[dict]:
    """Text-query latency on ``name`` with ``candidates`` reranked, tokens recomputed vs stored."""
    torch.manual_seed(0)
    model = create_model("retrieval", name).to(device).eval()
    size = model.cfg.vision.image_size
    rows, rankings = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_search_") as root:
        make_synthetic(
            root, n_train_images=0, n_test_images=candidates, n_val_images=0, image_size=size
        )
        photos = os.path.join(root, "images", "test")
        indexes = {
            fmt: Index.build(
                model, photos, os.path.join(root, fmt), store_tokens=fmt, progress=False
            )
            for fmt in formats
        }
        # the recomputed path: the fp16 index read as one built without tokens
        plain = Store.open(os.path.join(root, formats[0]))
        plain.manifest = {**plain.manifest, "tokens": None}
        providers = {"recomputed tokens": Index(plain, model)}
        if device.startswith("cuda") or native_bf16():
            providers["recomputed tokens, bf16"] = Index(plain, model, "bf16")
        providers.update({f"stored {fmt} tokens": index for fmt, index in indexes.items()})
        queries = QUERIES[:n_queries]
        with torch.no_grad():
            num_tokens, width = model.image_embeds(
                torch.zeros(1, 3, size, size, device=device)
            ).shape[1:]
        for provider, index in providers.items():
            load = os.getloadavg()[0]
            found = []  # the ranking of each timed query, after the warm-up's

            def search(q, i=index, found=found):
                found.append([h.path for h in i.search(q, k=K, candidates=candidates)])

            rows.append(
                {
                    "case": f"{name} {size}px, {candidates} candidates",
                    "provider": provider,
                    **latency(search, queries),
                }
            )
            rows[-1]["load_avg_1min"] = [load, os.getloadavg()[0]]
            rankings[provider] = found[1:]
    stored = {fmt: bytes_per_item(num_tokens, width, fmt) for fmt in ("fp16", "int8")}
    agreement_with = {  # provider -> the ranking it approximates
        "stored int8 tokens": "stored fp16 tokens",
        "recomputed tokens, bf16": "recomputed tokens",
    }
    for row in rows:
        row["bytes_per_item"] = {"feature": 2 * model.cfg.embed_dim, "tokens": stored}
        exact = agreement_with.get(row["provider"])
        if exact:
            agreement = [  # over the results there are: fewer than K with few candidates
                len(set(a) & set(b)) / len(b)
                for a, b in zip(rankings[row["provider"]], rankings[exact])
            ]
            row["top10_agreement"] = {"with": exact, "share": float(np.mean(agreement))}
    _harness.add_ratios(rows, ("recomputed tokens",))
    return rows


def build_rows(name: str, n: int, num_workers: int, device: str) -> list[dict]:
    """ms per image of ``Index.build`` on ``n`` 480 px photos against the bare image forward."""
    torch.manual_seed(0)
    model = create_model("retrieval", name).to(device).eval()
    size = model.cfg.vision.image_size
    case = f"{name} {size}px, build from {n} 480px JPEGs"
    with tempfile.TemporaryDirectory(prefix="bench_search_") as root:
        make_synthetic(root, n_train_images=0, n_test_images=n, n_val_images=0, image_size=480)
        photos = os.path.join(root, "images", "test")
        transform = test_transform(size)
        pixels = torch.stack(
            [transform(load_image(os.path.join(photos, f))) for f in os.listdir(photos)]
        )

        def bare(_):
            with torch.no_grad():
                for b in range(0, n, 32):
                    encode_pixels(model, pixels[b : b + 32], device)
            if device == "cuda":
                torch.cuda.synchronize()

        def build(_, workers):
            out = tempfile.mkdtemp(dir=root)  # a new index every round, not a resumed one
            Index.build(model, photos, out, num_workers=workers, progress=False)

        runs = {"bare ViT forward": bare, "Index.build, decoding inline": lambda i: build(i, 0)}
        if num_workers:
            runs[f"Index.build, {num_workers} decoding workers"] = lambda i: build(i, num_workers)
        rows = []
        for provider, fn in runs.items():
            load = os.getloadavg()[0]
            timing = latency(fn, [0, 1])
            rows.append(
                {
                    "case": case,
                    "provider": provider,
                    "median_ms": timing["median_ms"] / n,
                    "p95_ms": timing["p95_ms"] / n,
                    "rounds": timing["rounds"],
                    "images_per_s": 1e3 * n / timing["median_ms"],
                    "load_avg_1min": [load, os.getloadavg()[0]],
                }
            )
    _harness.add_ratios(rows, ("bare ViT forward",))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--exact-queries", type=int, default=20)
    p.add_argument("--candidates", type=int, default=128)
    p.add_argument("--rerank-queries", type=int, default=10)
    p.add_argument("--base-candidates", type=int)
    p.add_argument("--base-queries", type=int, default=1)
    p.add_argument("--skip-base", action="store_true")
    p.add_argument("--build-images", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow-dirty", action="store_true", help=_harness.ALLOW_DIRTY_HELP)
    args = p.parse_args()
    commit = _harness.require_clean(args.allow_dirty)
    print(f"on {_harness.device_name('cpu')}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for n in args.sizes:
        rows += _print(vector_rows(n, args))
    rows += _print(
        rerank_rows(
            "blip_demo", args.candidates, args.rerank_queries, ("fp16", "int8"), args.device
        )
    )
    if not args.skip_base:
        on_gpu = args.device == "cuda"
        base = args.base_candidates or args.candidates
        formats = ("fp16", "int8") if on_gpu else ("fp16",)
        rows += _print(
            rerank_rows("blip_base_vit_b16_384", base, args.base_queries, formats, args.device)
        )
    rows += _print(
        build_rows("blip_base_vit_b16_224", args.build_images, args.num_workers, args.device)
    )
    path = _harness.write_results(
        "search",
        args.device,
        rows,
        sources=[
            "blip_fast/search",
            "blip_fast/models",
            "blip_fast/ops",
            "csrc",
            "kernels",
            "benchmarks/bench_search.py",
            *_harness.HARNESS_SOURCES,
        ],
        commit=commit,
        allow_dirty=args.allow_dirty,
    )
    print("wrote", path)


def _print(rows: list[dict]) -> list[dict]:
    shown = (
        "recall_at_10",
        "faiss_build_s",
        "bytes_per_item",
        "top10_agreement",
        "images_per_s",
    )
    for r in rows:
        extra = {k: r[k] for k in shown if k in r}
        print(
            f"{r['case']:42s} {r['provider']:28s} p50 {r['median_ms']:9.2f} ms  p95 "
            f"{r['p95_ms']:9.2f} ms  x{r['speedup_vs_reference']:.2f}  {extra}  "
            f"load {r['load_avg_1min'][0]:.1f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
