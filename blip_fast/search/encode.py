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
from blip_fast.search import tokens as stored_tokens
from blip_fast.search.sources import Item, open_item
from blip_fast.search.store import CORRUPT_REPORT, Store

__all__ = ["encode_pixels", "index_items"]

# what a bad file raises while being read, decoded or resized
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


class _Images(Dataset):
    """(pixels (3, S, S) or None, error or None) per item."""

    def __init__(self, items: list[Item], image_size: int):
        self.items, self.transform = items, test_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return self.transform(open_item(self.items[i])), None
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


def _encode_chunk(model, items, batch_size, num_workers, device, token_format):
    """-> features (n, D) float16 of the readable items, those items, [(item, error)], their
    tokens as stored in ``token_format`` (``blip_fast.search.tokens``; None: not kept)."""
    loader = DataLoader(
        _Images(items, model.cfg.vision.image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    feats, kept, skipped, tokens = [], [], [], []
    at = 0
    for batch in loader:
        good = [(items[at + j], px) for j, (px, _) in enumerate(batch) if px is not None]
        skipped += [(items[at + j], err) for j, (px, err) in enumerate(batch) if px is None]
        at += len(batch)
        if good:
            pixels = torch.stack([px for _, px in good])
            feat, embeds = encode_pixels(model, pixels, device, with_tokens=True)
            feats.append(feat.cpu().numpy().astype(np.float16))
            if token_format:
                tokens.append(stored_tokens.encode(embeds, token_format))
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
    token_format = store.manifest.get("tokens")
    model.eval()
    start, indexed, unreadable = time.perf_counter(), 0, 0
    for c in range(0, len(pending), chunk_size):
        feats, kept, skipped, tokens = _encode_chunk(
            model, pending[c : c + chunk_size], batch_size, num_workers, device, token_format
        )
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
