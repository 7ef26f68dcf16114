"""CapFilt (BLIP §3.3): caption every web image by nucleus sampling, score the web and the
synthetic captions with an ITM filter, keep the texts it finds matching, write the bootstrapped
pre-training JSON.

    blip-fast capfilt --captioner CAP.pth --filter FILT.pth --ann web.json --out DIR

Work is split into chunks of ``chunk_size`` entries, chunk c going to rank c mod world size;
each finished chunk is written atomically (temp file + os.replace) to DIR/chunks/, so a killed
run restarted with the same settings redoes only the missing chunks. Sampling is seeded per
batch from (seed, index of the batch's first entry), batches never cross a chunk boundary, and
models run in eval mode: the output depends on the inputs, the settings and the device's
numerics, not on the world size or on interruptions. Rank 0 merges the chunks in input order.

DIR/bootstrapped.json   [{"image", "caption": [kept texts]}] (web texts first); entries whose
                        texts were all removed are left out; loadable by ``PretrainDataset``
DIR/summary.json        kept / removed per source, noise ratio (web texts removed / web texts)
DIR/corrupt.tsv         index, path, error of every missing or undecodable image (skipped)
DIR/settings.json       what the chunks were computed with; a resume must match it (the
                        threshold is applied at the merge: rerun with another one to re-filter)

Input: a pre-training JSON (``{"image", "caption": str | [str]}``; each web caption is scored).
Webdataset shards are not supported yet.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from blip_fast.data.datasets import CorruptImage, load_annotations, load_image
from blip_fast.data.loader import Uint8TestTransform, normalize_uint8, record_corrupt
from blip_fast.text import pre_caption
from blip_fast.train.checkpoint import atomic_write

__all__ = ["capfilt", "itm_match_prob"]

MAX_WORDS = 30  # the filter sees texts as pre-training does (pre_caption, 30 words)


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode("utf-8")))


class _Images(Dataset):
    """Item i -> ((uint8 image at each size), i), or a ``CorruptImage``."""

    def __init__(self, paths: list[str], sizes: tuple[int, ...]):
        self.paths, self.transforms = paths, [Uint8TestTransform(s) for s in sizes]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index])
        except OSError as err:
            return CorruptImage(index, self.paths[index], str(err))
        return tuple(t(image) for t in self.transforms), index


def _collate(batch: list) -> tuple[list[torch.Tensor], list[int], list[CorruptImage]]:
    """-> (normalised images per size (B, 3, S, S), indices, corrupt items)."""
    good = [item for item in batch if not isinstance(item, CorruptImage)]
    corrupt = [item for item in batch if isinstance(item, CorruptImage)]
    images = [normalize_uint8(torch.stack(sized)) for sized in zip(*[g[0] for g in good])]
    return images, [g[1] for g in good], corrupt


def _batch_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@torch.no_grad()
def itm_match_prob(filter_model, tokenizer, texts: list[str], image_embeds: torch.Tensor) -> torch.Tensor:
    """P(match) = softmax(ITM logits)[:, 1] of texts[k] with image_embeds[k] (K, N, W) -> (K,);
    texts tokenised as in retrieval evaluation (max_length 35, padded, truncated)."""
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=35)
    ids = tok["input_ids"].to(image_embeds.device)
    mask = tok["attention_mask"].to(image_embeds.device)
    return filter_model.itm_logits(ids, mask, image_embeds).float().softmax(-1)[:, 1]


def _web_captions(entry: dict) -> list[str]:
    return [entry["caption"]] if isinstance(entry["caption"], str) else list(entry["caption"])


def _process_batch(captioner, filter_model, tokenizer, images, indices, annotation, settings):
    gen = torch.Generator(device=images[0].device).manual_seed(_batch_seed(settings["seed"], indices[0]))
    synthetic = captioner.generate(images[0], sample=True, top_p=settings["top_p"],
                                   repetition_penalty=settings["repetition_penalty"],
                                   max_length=settings["max_length"],
                                   min_length=settings["min_length"], generator=gen)
    texts, rows = [], []
    for row, (index, caption) in enumerate(zip(indices, synthetic)):
        for text in _web_captions(annotation[index]) + [caption]:
            texts.append(pre_caption(text, MAX_WORDS))
            rows.append(row)
    embeds = filter_model.image_embeds(images[-1])
    probs = itm_match_prob(filter_model, tokenizer, texts, embeds[torch.tensor(rows, device=embeds.device)])
    probs, out, k = probs.tolist(), [], 0
    for index, caption in zip(indices, synthetic):
        web = _web_captions(annotation[index])
        out.append({"index": index, "image": annotation[index]["image"], "web": web,
                    "synthetic": caption, "p_web": probs[k:k + len(web)],
                    "p_synthetic": probs[k + len(web)]})
        k += len(web) + 1
    return out


def _batches(start: int, end: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                            for k in sorted(settings.keys() | old.keys())
                            if old.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{path}: the chunks in {path.parent / 'chunks'} were computed with "
                             f"other settings ({changed}); use a new --out folder or the old "
                             f"settings")
    else:
        write_json_atomic(path, settings)


def _merge(out: Path, n_chunks: int, threshold: float) -> dict:
    entries = []
    for c in range(n_chunks):
        entries += json.loads((out / "chunks" / f"{c:06d}.json").read_text(encoding="utf-8"))["entries"]
    boot, corrupt = [], []
    counts = {"web": {"kept": 0, "removed": 0}, "synthetic": {"kept": 0, "removed": 0}}
    for e in entries:
        if "error" in e:
            corrupt.append(CorruptImage(e["index"], e["image"], e["error"]))
            continue
        kept = [t for t, p in zip(e["web"], e["p_web"]) if p > threshold]
        counts["web"]["kept"] += len(kept)
        counts["web"]["removed"] += len(e["web"]) - len(kept)
        synthetic_kept = e["p_synthetic"] > threshold
        counts["synthetic"]["kept" if synthetic_kept else "removed"] += 1
        kept += [e["synthetic"]] if synthetic_kept else []
        if kept:
            boot.append({"image": e["image"], "caption": kept})
    report = out / "corrupt.tsv"
    report.unlink(missing_ok=True)
    if corrupt:
        record_corrupt(report, corrupt)
    n_web = counts["web"]["kept"] + counts["web"]["removed"]
    summary = {"entries": len(entries), "corrupt_images": len(corrupt),
               "images_kept": len(boot), "images_without_text": len(entries) - len(corrupt) - len(boot),
               **counts, "noise_ratio": counts["web"]["removed"] / n_web if n_web else 0.0,
               "threshold": threshold}
    write_json_atomic(out / "bootstrapped.json", boot)
    write_json_atomic(out / "summary.json", summary)
    return summary


def capfilt(captioner, filter_model, tokenizer, ann_files, out, *, image_root=None,
            threshold: float = 0.5, seed: int = 0, chunk_size: int = 1024, batch_size: int = 64,
            num_workers: int = 4, top_p: float = 0.9, repetition_penalty: float = 1.1,
            max_length: int = 20, min_length: int = 5, settings_extra: dict | None = None):
    """Run CapFilt with loaded models (eval mode, on the device to use) into folder ``out``.
    Returns the summary dict on rank 0, None on other ranks. See the module docstring."""
    if isinstance(ann_files, (str, os.PathLike)):
        ann_files = [ann_files]
    annotation = load_annotations(ann_files, caption="str|list")
    paths = [e["image"] if image_root is None else os.path.join(image_root, e["image"])
             for e in annotation]
    out = Path(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    settings = {"ann_files": [os.fspath(f) for f in ann_files],
                "image_root": None if image_root is None else os.fspath(image_root),
                "entries": len(annotation), "seed": seed, "chunk_size": chunk_size,
                "batch_size": batch_size, "top_p": top_p, "repetition_penalty": repetition_penalty,
                "max_length": max_length, "min_length": min_length, **(settings_extra or {})}
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        _check_settings(out / "settings.json", settings)
    if world > 1:
        dist.barrier()
        _check_settings(out / "settings.json", settings)

    n_chunks = -(-len(annotation) // chunk_size)
    todo = [c for c in range(rank, n_chunks, world) if not (out / "chunks" / f"{c:06d}.json").exists()]
    batches = {c: _batches(c * chunk_size, min((c + 1) * chunk_size, len(annotation)), batch_size)
               for c in todo}
    sizes = (captioner.cfg.vision.image_size, filter_model.cfg.vision.image_size)
    loader = DataLoader(_Images(paths, sizes), batch_sampler=[b for c in todo for b in batches[c]],
                        collate_fn=_collate, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    device = next(captioner.parameters()).device
    batch_iter = iter(loader)
    for c in todo:
        entries = []
        for _ in batches[c]:
            images, indices, corrupt = next(batch_iter)
            entries += [{"index": x.index, "image": annotation[x.index]["image"], "error": x.error}
                        for x in corrupt]
            if indices:
                images = [im.to(device, non_blocking=True) for im in images]
                entries += _process_batch(captioner, filter_model, tokenizer, images, indices,
                                          annotation, settings)
        entries.sort(key=lambda e: e["index"])
        write_json_atomic(out / "chunks" / f"{c:06d}.json", {"chunk": c, "entries": entries})
    if world > 1:
        dist.barrier()
    return _merge(out, n_chunks, threshold) if rank == 0 else None


def run(args) -> dict | None:
    """``blip-fast capfilt``: load both checkpoints, run on CUDA when there is a GPU."""
    from blip_fast import load, tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # torchrun
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    captioner = load(args.captioner, task="caption").to(device).eval()
    filter_model = load(args.filter, task="retrieval").to(device).eval()
    return capfilt(captioner, filter_model, tokenizer(), args.ann, args.out,
                   image_root=args.image_root, threshold=args.threshold, seed=args.seed,
                   chunk_size=args.chunk_size, batch_size=args.batch_size,
                   num_workers=args.num_workers,
                   settings_extra={"captioner": os.fspath(args.captioner),
                                   "filter": os.fspath(args.filter)})
