"""One index built by several ranks (torchrun): each rank encodes a contiguous share of the
source into its own part, then rank 0 merges the parts, in rank order, into the index.

    OUT/parts/rank-RR-of-WW/   rank RR's part: an index folder (``blip_fast.search.store``)
                               with OUT's header, removed once merged

Shares are cut from the source's fixed item order, less what OUT holds already, and merged in
rank order, so the index ends with the rows of a single-process build in the same order (its
chunk boundaries are the parts' own). A killed run resumes: with the same world size each rank
finds its share and continues its part; the merge leaves out items OUT holds already, so a merge
killed halfway completes without duplicates. Another world size re-encodes what the old parts
held and not OUT (the old parts are not read).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from blip_fast.data.corrupt_report import record_corrupt
from blip_fast.data.datasets import CorruptImage
from blip_fast.search.encode import index_items
from blip_fast.search.index import Index, _device
from blip_fast.search.sources import Item
from blip_fast.search.store import CORRUPT_REPORT, Store

__all__ = ["build_on_ranks", "merge_parts", "share"]

PARTS = "parts"


def share(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (sizes differ by at most one)."""
    return items[rank * len(items) // world : (rank + 1) * len(items) // world]


def build_on_ranks(
    model,
    src,
    out,
    *,
    add: bool = False,
    store_tokens: str | None = None,
    videos: bool = False,
    **options,
) -> Index:
    """``Index.build`` (or, with ``add``, ``Index.add``) run by every rank of the initialised
    process group, each encoding its share; returns the merged index on every rank.
    ``options`` as for ``Index.build``. An error on any rank is raised on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # rank 0 alone creates or checks the index; then every rank encodes its share
    index, items = _agreed(
        lambda: _open(model, src, out, add, store_tokens, videos) if rank == 0 else None
    ) or (None, None)
    _agreed(lambda: _encode_share(model, src, out, index, items, options))
    _agreed(lambda: _merge(index, out, world, items) if rank == 0 else None)
    return Index.load(out, model)


def _merge(index: Index, out, world: int, items: list[Item]) -> None:
    root = Path(out) / PARTS
    merge_parts(index.store, [Store.open(root / _part_name(r, world)) for r in range(world)], items)
    shutil.rmtree(root)  # with the parts of any earlier world size


def _encode_share(model, src, out, index, items, options) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    if index is None:  # not rank 0
        index = Index.load(out, model)
        items = index.items_of(src)
    seen = index.store.seen()
    mine = [item for item in share(items, rank, world) if item not in seen]
    part = _part(index.store, Path(out) / PARTS / _part_name(rank, world))
    return index_items(model, part, mine, device=_device(model), **options)


def _open(model, src, out, add, store_tokens, videos):
    if add:
        index = Index.load(out, model)
        return index, index.add_source(src)
    return Index.prepare(model, src, out, store_tokens, videos)


def _agreed(step):
    """``step()`` on this rank, then wait for every rank's; if any raised, raise on every
    rank (naming the first that failed) instead of leaving the others waiting for it."""
    try:
        result, error = step(), None
    except Exception as err:  # re-raised below, on every rank
        result, error = None, err
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result


def _part(store: Store, root: Path) -> Store:
    """The part in ``root`` (created with ``store``'s header when absent)."""
    if (root / "index.json").exists():
        return Store.open(root)
    dropped = ("format", "version", "chunks")
    return Store.create(root, {k: v for k, v in store.manifest.items() if k not in dropped})


def _part_name(rank: int, world: int) -> str:
    return f"rank-{rank:02d}-of-{world:02d}"


def merge_parts(store: Store, parts: list[Store], items: list[Item]) -> None:
    """Commit the chunks of ``parts``, in order, into ``store``, leaving out items it holds
    already, and record their unreadable items in its corrupt report (by position in
    ``items``, the source's order)."""
    position, seen = {item: i for i, item in enumerate(items)}, store.seen()
    for part in parts:
        for c in range(len(part.manifest["chunks"])):
            feats, chunk_items, skipped, tokens = part.chunk(c)
            rows = [i for i, item in enumerate(chunk_items) if item not in seen]
            skipped = [(item, err) for item, err in skipped if item not in seen]
            if not rows and not skipped:
                continue
            kept_tokens = tuple(a[rows] for a in tokens) if tokens and rows else None
            kept = [chunk_items[i] for i in rows]
            store.commit(feats[rows], kept, skipped, kept_tokens)
            seen.update(kept, (item for item, _ in skipped))
            if skipped:
                report = [CorruptImage(position[i], str(i), err) for i, err in skipped]
                record_corrupt(store.root / CORRUPT_REPORT, report)
