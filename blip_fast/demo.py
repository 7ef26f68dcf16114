"""``blip-fast demo``: synthetic data -> pre-train a small model from scratch (ITC + ITM + LM,
the official objectives and loop) -> official retrieval evaluation -> a few generated captions
-> a search over the test images with ``blip_fast.search.Index``, as a user searches their own."""

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from blip_fast import save, tokenizer
from blip_fast.data import RetrievalEvalDataset, make_synthetic, test_transform
from blip_fast.eval.retrieval import evaluate
from blip_fast.models.blip_caption import BlipCaption
from blip_fast.ops.linear import native_bf16
from blip_fast.search import Hit, Index
from blip_fast.search.commands import print_hits
from blip_fast.train.main import build_trainer

__all__ = ["demo_precision", "print_retrieval_result", "run", "search_test_images"]


def run(args) -> None:
    """The demo with the ``blip-fast demo`` options ``args`` (``blip_fast.cli``)."""
    if args.search_queries > args.test_images:
        raise ValueError(
            f"--search-queries {args.search_queries}: one query per test image, and there are "
            f"{args.test_images} (--test-images)"
        )
    precision, why = demo_precision(args.precision)
    print(f"precision: {precision} ({why})")
    root = args.data or tempfile.mkdtemp(prefix="blip_fast_demo_")
    t0 = time.perf_counter()
    paths = make_synthetic(
        root,
        n_train_images=args.train_images,
        n_test_images=args.test_images,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"synthetic data: {paths['root']} ({time.perf_counter() - t0:.1f} s)")
    model = _pretrain(args, paths, precision)
    if args.save:
        print(f"saved the trained model: {save(model, args.save)}")
    size = model.cfg.vision.image_size
    dataset = RetrievalEvalDataset(paths["test"], paths["image_root"], test_transform(size))
    print(
        f"test split: {len(dataset.image)} images, {len(dataset.text)} texts, k_test {args.k_test}"
    )
    result = evaluate(
        model,
        dataset,
        tokenizer(),
        k_test=args.k_test,
        mode=args.mode,
        precision=precision,
        progress=sys.stderr.isatty(),
    )
    print_retrieval_result(result)
    if args.captions:
        _print_captions(model, dataset, args.captions)
    if args.search_queries:
        with tempfile.TemporaryDirectory(prefix="search_", dir=root) as workdir:
            search_test_images(model, dataset, args.search_queries, precision, workdir)


def _pretrain(args, paths: dict, precision: str):
    """The model pre-trained on the synthetic train split, in eval mode."""
    # Demo hyper-parameters for a model trained from scratch in minutes (official values are
    # for fine-tuning pre-trained weights): higher LR with warm-up, a faster momentum teacher,
    # a queue of one batch (a longer one holds stale features of the random start), no
    # augmentation (the captions name left / right, which flips and crops would falsify), and
    # ITC alone first: ITM's hard negatives and the captions mean nothing before ITC aligns the
    # encoders, and an ITC-only step costs a fifth of a full one (README "demo").
    y = {
        "model": args.config,
        "train_file": str(paths["train"]),
        "image_root": str(paths["root"]),
        "batch_size": args.batch_size,
        "init_lr": args.lr,
        "warmup_lr": 1e-6,
        "warmup_steps": max(1, args.steps // 20),
        "lr_decay_rate": 1.0,
        "max_epoch": 1000,
        "momentum": 0.97,
        "train_augment": False,
        "queue_size": args.batch_size,
        "itc_warmup_steps": args.itc_warmup_steps,
    }
    trainer = build_trainer(
        "pretrain",
        y,
        Path(paths["root"]) / "train",
        num_workers=args.workers,
        max_steps=args.steps,
        seed=args.seed,
        save_every=0,
        precision=precision,
    )
    model = trainer.model
    print(
        f"model: {args.config}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters, random init; training {args.steps} steps of {args.batch_size} "
        f"({args.itc_warmup_steps} ITC only, then ITC + ITM + LM) on "
        f"{len(trainer.sampler.indices(0))} image-caption pairs"
    )
    t0 = time.perf_counter()
    stats = trainer.train()
    print(
        f"trained in {time.perf_counter() - t0:.0f} s; last step: "
        + ", ".join(f"{k} {stats[k]:.3f}" for k in ("itc", "itm", "lm") if k in stats)
    )
    return model.eval()


def _print_captions(model, dataset: RetrievalEvalDataset, n: int) -> None:
    """Caption the first ``n`` test images with the pre-trained decoder, beside their truth."""
    # The pre-training decoder captions without a prompt ([DEC] only), as it was trained.
    captioner = BlipCaption(dataclasses.replace(model.cfg, prompt=""))
    captioner.visual_encoder, captioner.text_decoder = model.visual_encoder, model.text_decoder
    images = torch.stack([dataset[i][0] for i in range(n)])
    for i, caption in enumerate(captioner.eval().generate(images)):
        truth = dataset.text[dataset.img2txt[i][0]]
        print(f"caption {dataset.image[i]}: {caption!r} (truth: {truth!r})")


def search_test_images(
    model, dataset: RetrievalEvalDataset, n_queries: int, precision: str, workdir, k: int = 3
) -> None:
    """Index the images of ``dataset`` with ``model`` in the folder ``workdir`` and search it for
    the first caption of each of its first ``n_queries`` images (``Index.search``'s defaults:
    exact ITC candidates reranked by ITM + ITC, here at ``precision``); print the top ``k`` of
    each as ``blip-fast search`` does, paths relative to the dataset's image root, and whether
    the described image came first, then how long it all took."""
    t0 = time.perf_counter()
    listing = Path(workdir) / "test_images.json"  # the split's images, whatever else is there
    listing.write_text(json.dumps([str(dataset.image_root / rel) for rel in dataset.image]))
    Index.build(model, listing, Path(workdir) / "index", progress=False)
    index = Index.load(Path(workdir) / "index", model, precision)
    print(f"search: {len(index)} test images indexed in {time.perf_counter() - t0:.1f} s")

    def relative(hit: Hit) -> str:  # the path as the dataset names the image
        return os.path.relpath(hit.path, dataset.image_root)

    t0 = time.perf_counter()
    for i in range(n_queries):
        query, described = dataset.text[dataset.img2txt[i][0]], dataset.image[i]
        hits = index.search(query, k=k)
        print(f"query {query!r} (first caption of {described}):")
        print_hits(hits, relative)
        found = [relative(hit) for hit in hits]
        place = f"rank {found.index(described) + 1}" if described in found else f"not in top {k}"
        print(f"  described image first: {'yes' if found[0] == described else f'no ({place})'}")
    queries = "1 query" if n_queries == 1 else f"{n_queries} queries"
    print(
        f"search: {queries} in {time.perf_counter() - t0:.1f} s (ITC candidates reranked by "
        f"ITM + ITC, {index.precision})"
    )


def demo_precision(requested: str) -> tuple[str, str]:
    """The demo's autocast precision (training, retrieval evaluation and search reranking;
    captions are fp32) for ``--precision``, and why: auto is bf16 where the hardware has it (a
    GPU, a CPU with AMX or AVX512-BF16), else fp32."""
    if torch.cuda.is_available():
        native, hardware = True, "CUDA GPU"
    elif native_bf16():
        amx = torch.cpu._is_amx_tile_supported()
        native, hardware = True, f"CPU has {'AMX' if amx else 'AVX512-BF16'} bf16"
    else:
        native, hardware = False, "no AMX / AVX512-BF16"
    if requested == "auto":
        return ("bf16" if native else "fp32"), f"auto: {hardware}"
    if requested == "bf16" and not native:
        return "bf16", f"requested; {hardware}: emulated, slower than fp32"
    return requested, "requested"


def print_retrieval_result(result: dict) -> None:
    """The metrics and timing lines of a ``blip_fast.eval.retrieval.evaluate`` result."""
    print(
        " ".join(
            f"{k}={result[k]:.2f}"
            for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
        )
    )
    print(
        "timing: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in result["timing"].items())
        + f"; {result['pairs_scored']} ITM pairs scored"
        + (f" (ranks ran {result['itm_pairs_per_rank']})" if result["world_size"] > 1 else "")
    )
