"""CapFilt (BLIP §3.3): caption every web image by nucleus sampling, score the web and the
synthetic captions with an ITM filter, keep the texts it finds matching, write the bootstrapped
pre-training JSON or webdataset shards.

    blip-fast capfilt --captioner CAP.pth --filter FILT.pth --ann web.json --out DIR
    blip-fast capfilt --captioner CAP.pth --filter FILT.pth --shards 'web/{000..099}.tar' --out DIR
    torchrun --standalone --nproc_per_node 8 -m blip_fast.cli capfilt ...   (same output)

Work is split into chunks of ``chunk_size`` entries, chunk c going to rank c mod world size;
each finished chunk is written atomically (temp file + os.replace) to DIR/chunks/, so a killed
run restarted with the same settings redoes only the missing chunks. Sampling is seeded per
batch from (seed, index of the batch's first entry), batches never cross a chunk boundary, and
models run in eval mode: the output depends on the inputs, the settings and the device's
numerics, not on the world size or on interruptions. Rank 0 merges the chunks in input order.
Under torchrun the CLI joins the process group with ``init_distributed`` (gloo on CPU, NCCL on
one GPU per local rank) and leaves it with ``shutdown`` once rank 0 has merged.

DIR/bootstrapped.json   JSON input: [{"image", "caption": [kept texts]}] (web texts first);
                        entries whose texts were all removed are left out; loadable by
                        ``PretrainDataset``
DIR/bootstrapped-000000.tar, ...   shard input instead of the JSON: the kept samples in input
                        order, ``per_shard`` a shard, each its input key and image bytes as they
                        were, plus KEY.json {"caption": [kept texts]}; loadable by
                        ``ShardDataset`` (``train_shards: DIR/bootstrapped-*.tar``), which draws
                        one kept text per read as ``PretrainDataset`` does. Keys stay those of
                        the input when they are unique over it, else become "SSSSSS_KEY" (input
                        shard number). Each shard is written to a temp folder and renamed in;
                        stale ones of an earlier merge are removed; summary.json, written last,
                        names them.
DIR/summary.json        kept / removed per source, noise ratio (web texts removed / web texts)
DIR/corrupt.tsv         index, image, error of every missing or undecodable image (skipped); the
                        image is the JSON's path, or "SHARD:KEY" for shard input
DIR/settings.json       what the chunks were computed with; a resume must match it (the
                        threshold and ``per_shard`` are applied at the merge: rerun with others
                        to re-filter)

Input: pre-training JSON(s) (``{"image", "caption": str | [str]}``) or webdataset shards read by
``ShardDataset`` (``KEY.jpg`` + ``KEY.txt`` or ``KEY.json`` caption, str or list); each web
caption is scored.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from blip_fast.data.corrupt_report import record_corrupt
from blip_fast.data.datasets import CorruptImage, load_annotations
from blip_fast.data.images import decode_image, load_image
from blip_fast.data.shards import ShardDataset, write_shards
from blip_fast.data.uint8_transforms import Uint8TestTransform, normalize_uint8
from blip_fast.text import pre_caption
from blip_fast.train.checkpoint import atomic_write

__all__ = ["capfilt", "itm_match_prob"]

MAX_WORDS = 30  # the filter sees texts as pre-training does (pre_caption, 30 words)


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode("utf-8")))


def _texts(caption: str | list[str]) -> list[str]:
    """A web caption field as the list of its texts (each one is scored)."""
    return [caption] if isinstance(caption, str) else list(caption)


class _JsonSource:
    """Entries of pre-training JSONs: ``names[i]`` is entry i's "image" as written."""

    def __init__(self, ann_files: list, image_root):
        self.annotation = load_annotations(ann_files, caption="str|list")
        self.image_root = image_root
        self.names = [e["image"] for e in self.annotation]

    def captions(self, index: int) -> list[str]:
        return _texts(self.annotation[index]["caption"])

    def image(self, index: int):
        name = self.names[index]
        return load_image(name if self.image_root is None else os.path.join(self.image_root, name))


class _ShardSource:
    """Samples of webdataset shards through ``ShardDataset.raw``: ``names[i]`` is "SHARD:KEY"."""

    def __init__(self, shards):
        self.dataset = ShardDataset(shards)
        self.names = [f"{self.dataset.shards[s[0]]}:{s[4]}" for s in self.dataset.samples]

    def captions(self, index: int) -> list[str]:
        return _texts(self.dataset.samples[index][3])

    def image(self, index: int):
        return decode_image(self.dataset.raw(index)[3], self.names[index])

    def output_keys(self) -> list[str]:
        """Keys of the bootstrapped shards: the input keys when unique, else prefixed with the
        input shard number (one output tar must not hold two samples with one key)."""
        keys = [s[4] for s in self.dataset.samples]
        if len(set(keys)) == len(keys):
            return keys
        return [f"{s[0]:06d}_{s[4]}" for s in self.dataset.samples]


class _Images(Dataset):
    """Item i -> ((uint8 image at each size), i), or a ``CorruptImage``."""

    def __init__(self, source, sizes: tuple[int, ...]):
        self.source, self.transforms = source, [Uint8TestTransform(s) for s in sizes]

    def __len__(self) -> int:
        return len(self.source.names)

    def __getitem__(self, index: int):
        try:
            image = self.source.image(index)
        except OSError as err:
            return CorruptImage(index, self.source.names[index], str(err))
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
def itm_match_prob(
    filter_model, tokenizer, texts: list[str], image_embeds: torch.Tensor
) -> torch.Tensor:
    """P(match) = softmax(ITM logits)[:, 1] of texts[k] with image_embeds[k] (K, N, W) -> (K,);
    texts tokenised as in retrieval evaluation (max_length 35, padded, truncated)."""
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=35)
    ids = tok["input_ids"].to(image_embeds.device)
    mask = tok["attention_mask"].to(image_embeds.device)
    return filter_model.itm_logits(ids, mask, image_embeds).float().softmax(-1)[:, 1]


def _process_batch(captioner, filter_model, tokenizer, images, indices, source, settings):
    gen = torch.Generator(device=images[0].device).manual_seed(
        _batch_seed(settings["seed"], indices[0])
    )
    synthetic = captioner.generate(
        images[0],
        sample=True,
        top_p=settings["top_p"],
        repetition_penalty=settings["repetition_penalty"],
        max_length=settings["max_length"],
        min_length=settings["min_length"],
        generator=gen,
    )
    texts, rows = [], []
    for row, (index, caption) in enumerate(zip(indices, synthetic)):
        for text in source.captions(index) + [caption]:
            texts.append(pre_caption(text, MAX_WORDS))
            rows.append(row)
    embeds = filter_model.image_embeds(images[-1])
    probs = itm_match_prob(
        filter_model, tokenizer, texts, embeds[torch.tensor(rows, device=embeds.device)]
    )
    probs, out, k = probs.tolist(), [], 0
    for index, caption in zip(indices, synthetic):
        web = source.captions(index)
        out.append(
            {
                "index": index,
                "image": source.names[index],
                "web": web,
                "synthetic": caption,
                "p_web": probs[k : k + len(web)],
                "p_synthetic": probs[k + len(web)],
            }
        )
        k += len(web) + 1
    return out


def _batches(start: int, end: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]


def _check_settings(path: Path, settings: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = ", ".join(
            f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
            for k in sorted(settings.keys() | old.keys())
            if old.get(k) != settings.get(k)
        )
        if changed:
            raise ValueError(
                f"{path}: the chunks in {path.parent / 'chunks'} were computed with "
                f"other settings ({changed}); use a new --out folder or the old "
                f"settings"
            )
    else:
        write_json_atomic(path, settings)


def _write_shards_atomic(out: Path, samples, per_shard: int) -> list[str]:
    """``write_shards`` into a temp folder in ``out``, each shard flushed and renamed to
    out/bootstrapped-NNNNNN.tar; earlier bootstrapped shards beyond the new ones are removed.
    Returns the shard file names."""
    tmp = Path(tempfile.mkdtemp(prefix=".bootstrapped.tmp", dir=out))
    try:
        paths = write_shards(samples, os.fspath(tmp / "bootstrapped-%06d.tar"), per_shard)
        for path in paths:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(path, out / Path(path).name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = [Path(p).name for p in paths]
    for stale in sorted(out.glob("bootstrapped-*.tar")):
        if stale.name not in names:
            stale.unlink()
    dir_fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames reach the disk before summary.json names the shards
    finally:
        os.close(dir_fd)
    return names


def _merge(
    out: Path,
    n_chunks: int,
    threshold: float,
    source: _ShardSource | None = None,
    per_shard: int = 1000,
) -> dict:
    """Chunks -> bootstrapped JSON (``source`` None) or shards of ``source``'s samples, plus
    summary.json and corrupt.tsv."""
    entries = []
    for c in range(n_chunks):
        entries += json.loads((out / "chunks" / f"{c:06d}.json").read_text(encoding="utf-8"))[
            "entries"
        ]
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
            boot.append({"index": e["index"], "image": e["image"], "caption": kept})
    report = out / "corrupt.tsv"
    report.unlink(missing_ok=True)
    if corrupt:
        record_corrupt(report, corrupt)
    n_web = counts["web"]["kept"] + counts["web"]["removed"]
    summary = {
        "entries": len(entries),
        "corrupt_images": len(corrupt),
        "images_kept": len(boot),
        "images_without_text": len(entries) - len(corrupt) - len(boot),
        **counts,
        "noise_ratio": counts["web"]["removed"] / n_web if n_web else 0.0,
        "threshold": threshold,
    }
    if source is None:
        write_json_atomic(
            out / "bootstrapped.json",
            [{"image": b["image"], "caption": b["caption"]} for b in boot],
        )
    else:
        keys = source.output_keys()

        def samples():  # image bytes and extension as they were in the input
            for b in boot:
                _, _, ext, data, _ = source.dataset.raw(b["index"])
                yield keys[b["index"]], data, b["caption"], ext

        summary["shards"] = _write_shards_atomic(out, samples(), per_shard)
    write_json_atomic(out / "summary.json", summary)
    return summary


def capfilt(
    captioner,
    filter_model,
    tokenizer,
    ann_files,
    out,
    *,
    shards=None,
    image_root=None,
    threshold: float = 0.5,
    per_shard: int = 1000,
    seed: int = 0,
    chunk_size: int = 1024,
    batch_size: int = 64,
    num_workers: int = 4,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    max_length: int = 20,
    min_length: int = 5,
    settings_extra: dict | None = None,
):
    """Run CapFilt with loaded models (eval mode, on the device to use) into folder ``out``,
    on pre-training JSON(s) ``ann_files`` (``image_root``: prefix of relative image paths) or,
    with ``ann_files`` None, on webdataset ``shards`` (a list, glob or brace range; output
    shards of ``per_shard`` samples). Returns the summary dict on rank 0, None on other ranks.
    See the module docstring."""
    if (ann_files is None) == (shards is None):
        raise ValueError("capfilt: give either annotation files or shards, not both or neither")
    if shards is not None and image_root is not None:
        raise ValueError("capfilt: image_root is for annotation files, not shards")
    if shards is not None:
        source = _ShardSource(shards)
        settings = {"shards": source.dataset.shards}
    else:
        if isinstance(ann_files, (str, os.PathLike)):
            ann_files = [ann_files]
        source = _JsonSource(ann_files, image_root)
        settings = {
            "ann_files": [os.fspath(f) for f in ann_files],
            "image_root": None if image_root is None else os.fspath(image_root),
        }
    n_entries = len(source.names)
    out = Path(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    settings = {
        **settings,
        "entries": n_entries,
        "seed": seed,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "max_length": max_length,
        "min_length": min_length,
        **(settings_extra or {}),
    }
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        _check_settings(out / "settings.json", settings)
    if world > 1:
        dist.barrier()
        _check_settings(out / "settings.json", settings)

    n_chunks = -(-n_entries // chunk_size)
    mine = range(rank, n_chunks, world)
    todo = [c for c in mine if not (out / "chunks" / f"{c:06d}.json").exists()]
    print(
        f"capfilt rank {rank} of {world}: {len(todo)} chunks to compute, "
        f"{len(mine) - len(todo)} already written, of {n_chunks}",
        file=sys.stderr,
    )
    batches = {
        c: _batches(c * chunk_size, min((c + 1) * chunk_size, n_entries), batch_size) for c in todo
    }
    sizes = (captioner.cfg.vision.image_size, filter_model.cfg.vision.image_size)
    loader = DataLoader(
        _Images(source, sizes),
        batch_sampler=[b for c in todo for b in batches[c]],
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    device = next(captioner.parameters()).device
    batch_iter = iter(loader)
    for c in todo:
        entries = []
        for _ in batches[c]:
            images, indices, corrupt = next(batch_iter)
            entries += [{"index": x.index, "image": x.path, "error": x.error} for x in corrupt]
            if indices:
                images = [im.to(device, non_blocking=True) for im in images]
                entries += _process_batch(
                    captioner, filter_model, tokenizer, images, indices, source, settings
                )
        entries.sort(key=lambda e: e["index"])
        write_json_atomic(out / "chunks" / f"{c:06d}.json", {"chunk": c, "entries": entries})
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    return _merge(out, n_chunks, threshold, source if shards is not None else None, per_shard)


def run(args) -> dict | None:
    """``blip-fast capfilt``, alone or under torchrun: load both checkpoints, run on CUDA when
    there is a GPU (one per local rank), leave the process group together at the end."""
    from blip_fast import load, tokenizer
    from blip_fast.train.distributed import init_distributed, shutdown

    # rank 0 merges alone (for shard output it re-reads every kept image) while the other
    # ranks wait in shutdown's barrier: a long collective timeout
    info = init_distributed(args.device, timeout_s=24 * 3600)
    captioner = load(args.captioner, task="caption").to(info.device).eval()
    filter_model = load(args.filter, task="retrieval").to(info.device).eval()
    summary = capfilt(
        captioner,
        filter_model,
        tokenizer(),
        args.ann,
        args.out,
        shards=args.shards,
        image_root=args.image_root,
        threshold=args.threshold,
        per_shard=args.per_shard,
        seed=args.seed,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        settings_extra={"captioner": os.fspath(args.captioner), "filter": os.fspath(args.filter)},
    )
    shutdown()
    return summary
