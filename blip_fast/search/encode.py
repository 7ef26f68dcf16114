"""Encoding images into an index, chunk by chunk, each chunk committed before the next starts.

Items the index already holds (indexed, or skipped as unreadable) are not read again, so the
same call resumes a killed build and adds new files to a finished one; since items are taken in
the source's fixed order, a resumed build ends with the rows of an uninterrupted one.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from blip_fast.data.corrupt_report import record_corrupt
from blip_fast.data.datasets import CorruptImage
from blip_fast.data.transforms import test_transform
from blip_fast.eval.video import encode_frames
from blip_fast.search import tokens as stored_tokens
from blip_fast.search.sources import Item, is_video, open_frames, open_item
from blip_fast.search.store import CORRUPT_REPORT, Store

__all__ = ["encode_pixels", "encode_videos", "index_items", "item_pixels"]

# what a bad file raises while being read, decoded or resized
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def item_pixels(item: Item, transform) -> torch.Tensor:
    """An image item's pixels (3, S, S), a video item's (NUM_FRAMES, 3, S, S)."""
    if is_video(item):
        return torch.stack([transform(frame) for frame in open_frames(item)])
    return transform(open_item(item))


class _Images(Dataset):
    """(pixels as ``item_pixels`` or None, error or None) per item."""

    def __init__(self, items: list[Item], image_size: int):
        self.items, self.transform = items, test_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return item_pixels(self.items[i], self.transform), None
        except UNREADABLE as err:
            return None, str(err)


@torch.no_grad()
def encode_pixels(model, pixels: torch.Tensor, device, with_tokens: bool = False):
    """pixels (B, 3, S, S) -> normalised ITC image features (B, embed_dim), fp32; with
    ``with_tokens`` also the ViT tokens (B, Li, W) they are projected from."""
    with torch.autocast(torch.device(device).type, enabled=False):
        tokens = model.image_embeds(pixels.to(device))
        feats = model.image_features(image_embeds=tokens).float()
    return (feats, tokens) if with_tokens else feats


@torch.no_grad()
def encode_videos(model, frames: torch.Tensor, device, with_tokens: bool = False):
    """frames (B, n, 3, S, S) -> video features (B, embed_dim), fp32, as official BLIP's video
    retrieval (``blip_fast.eval.video.encode_frames``); with ``with_tokens`` also the frames'
    tokens concatenated in frame order (B, n * Li, W), what ITM reads."""
    with torch.autocast(torch.device(device).type, enabled=False):
        tokens, feats = encode_frames(model, frames.to(device))
    return (feats.float(), tokens) if with_tokens else feats.float()


def _chunk_batches(n: int, chunk_size: int, batch_size: int) -> list[list[int]]:
    """Batches of positions 0..n-1, none across a chunk boundary: one loader (one set of
    decoding workers) serves every chunk, and a chunk always starts a batch, so a resumed
    build batches its items as an uninterrupted one."""
    return [
        list(range(b, min(b + batch_size, c + chunk_size, n)))
        for c in range(0, n, chunk_size)
        for b in range(c, min(c + chunk_size, n), batch_size)
    ]


def _encode_chunk(model, items, batches, device, token_format):
    """-> features (n, D) float16 of the readable ``items``, those items, [(item, error)], their
    tokens as stored in ``token_format`` (``blip_fast.search.tokens``; None: not kept);
    ``batches`` yields the chunk's decoded batches (``_chunk_batches``), then the next's."""
    feats, kept, skipped, tokens = [], [], [], []
    at = 0
    while at < len(items):
        batch = next(batches)
        good = [(items[at + j], px) for j, (px, _) in enumerate(batch) if px is not None]
        skipped += [(items[at + j], err) for j, (px, err) in enumerate(batch) if px is None]
        at += len(batch)
        if good:
            feat = torch.empty(len(good), model.cfg.embed_dim)
            images = [j for j, (_, px) in enumerate(good) if px.dim() == 3]
            videos = [j for j, (_, px) in enumerate(good) if px.dim() == 4]
            if images:
                pixels = torch.stack([good[j][1] for j in images])
                image_feat, embeds = encode_pixels(model, pixels, device, with_tokens=True)
                feat[images] = image_feat.cpu()
                if token_format:  # an index with videos keeps no tokens (Index.prepare)
                    tokens.append(stored_tokens.encode(embeds, token_format))
            if videos:
                frames = torch.stack([good[j][1] for j in videos])
                feat[videos] = encode_videos(model, frames, device).cpu()
            feats.append(feat.numpy().astype(np.float16))
            kept += [item for item, _ in good]
    dim = model.cfg.embed_dim
    feats = np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)
    return feats, kept, skipped, tuple(map(np.concatenate, zip(*tokens))) or None


def index_items(
    model,
    store: Store,
    items: list[Item],
    *,
    batch_size: int = 32,
    chunk_size: int = 1024,
    num_workers: int = 0,
    device="cpu",
    progress: bool = True,
) -> int:
    """Encode the ``items`` ``store`` does not hold yet and commit them in chunks of
    ``chunk_size``; unreadable ones are listed in the store's corrupt report and skipped. With
    ``progress`` a line per chunk goes to stderr. Returns the number of items indexed."""
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and chunk_size ({chunk_size}) must be >= 1")
    position = {item: i for i, item in enumerate(items)}
    seen = store.seen()
    pending = [item for item in items if item not in seen]
    if not pending:
        return 0
    token_format = store.manifest.get("tokens")
    model.eval()
    start, indexed, unreadable = time.perf_counter(), 0, 0
    batches = iter(
        DataLoader(
            _Images(pending, model.cfg.vision.image_size),
            batch_sampler=_chunk_batches(len(pending), chunk_size, batch_size),
            num_workers=num_workers,
            collate_fn=list,
        )
    )
    for c in range(0, len(pending), chunk_size):
        chunk = pending[c : c + chunk_size]
        feats, kept, skipped, tokens = _encode_chunk(model, chunk, batches, device, token_format)
        store.commit(feats, kept, skipped, tokens)
        if skipped:  # after the commit: the chunk record, not this report, decides what is done
            report = [CorruptImage(position[item], str(item), err) for item, err in skipped]
            record_corrupt(store.root / CORRUPT_REPORT, report)
        indexed, unreadable = indexed + len(kept), unreadable + len(skipped)
        if progress:
            rate = (indexed + unreadable) / max(time.perf_counter() - start, 1e-9)
            print(
                f"index: {indexed + unreadable}/{len(pending)} new items, {unreadable} "
                f"unreadable, {rate:.1f} items/s",
                file=sys.stderr,
            )
    return indexed
