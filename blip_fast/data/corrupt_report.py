"""The corrupt-image report: one line per sample a loader skipped (a missing or undecodable
image; in training also an empty caption), ``index<TAB>path<TAB>error``.

Written from DataLoader workers (``loader.SkipCorrupt``), from the DALI loader's host-side
reader, from training collates and from CapFilt, so it lives in a file rather than in memory:
each call appends its lines in one small ``O_APPEND`` write, which workers and ranks can share
without interleaving.
"""

from __future__ import annotations

import logging
import os

from blip_fast.data.datasets import CorruptImage

__all__ = ["read_corrupt_report", "record_corrupt"]

log = logging.getLogger("blip_fast.data")


def record_corrupt(report: str | os.PathLike, items: list[CorruptImage]) -> None:
    """Append ``items`` to the ``report`` file in one write."""
    lines = "".join(f"{c.index}\t{c.path}\t{' '.join(c.error.split())}\n" for c in items)
    with open(report, "a", encoding="utf-8") as f:
        f.write(lines)
    log.warning("skipped %d unusable sample(s); listed in %s", len(items), os.fspath(report))


def read_corrupt_report(report: str | os.PathLike) -> list[dict]:
    """The entries recorded in ``report``, in the order written ([] when there is no file)."""
    try:
        with open(report, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t", 2) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    return [{"index": int(i), "path": p, "error": e} for i, p, e in rows]
