"""Search results as a page to look at: a self-contained HTML contact sheet.

    hits = index.search("a dog on a beach", k=20)
    Path("dogs.html").write_text(contact_sheet(index, "a dog on a beach", hits), "utf-8")

Each result is a card with its thumbnail (a small JPEG embedded as base64, so the file can be
mailed or moved alone), rank, score and path. Everything taken from the user (query, paths,
error messages) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence

from blip_fast.search.encode import UNREADABLE
from blip_fast.search.index import Hit, Index
from blip_fast.search.sources import Item, open_item

__all__ = ["THUMB_SIZE", "contact_sheet", "thumbnail_jpeg"]

THUMB_SIZE = 192  # longest side, pixels
THUMB_QUALITY = 80

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; font-weight: 600; }
.query img { max-height: 96px; vertical-align: middle; margin-left: .5em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(208px, 1fr)); gap: 12px; }
figure { margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }
figure img, .missing { width: 192px; height: 192px; object-fit: contain; background: #f4f4f4; }
.missing { display: flex; align-items: center; justify-content: center; color: #a00; }
figcaption { margin-top: 4px; }
.path { font-family: monospace; font-size: 12px; word-break: break-all; color: #555; }
"""


def thumbnail_jpeg(item: Item, size: int = THUMB_SIZE) -> bytes:
    """The item's image shrunk to fit ``size`` x ``size`` (aspect kept), as JPEG bytes;
    OSError naming the item if it cannot be read."""
    image = open_item(item)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


def _thumbnail_tag(item: Item) -> str:
    try:
        jpeg = base64.b64encode(thumbnail_jpeg(item)).decode("ascii")
    except UNREADABLE as err:
        return f'<div class="missing" title="{html.escape(str(err))}">unreadable</div>'
    return f'<img src="data:image/jpeg;base64,{jpeg}" alt="{html.escape(str(item))}">'


def contact_sheet(index: Index, query: str | os.PathLike, hits: Sequence[Hit]) -> str:
    """The HTML page of ``hits`` (from ``index.search(query)``): ``query`` a text, or the
    path of the query image (shown as a thumbnail too)."""
    items = {str(item): item for item in index.store.items}
    if isinstance(query, str):
        heading = f"&ldquo;{html.escape(query)}&rdquo;"
    else:
        path = os.fspath(query)
        heading = f"image {html.escape(path)}{_thumbnail_tag(Item(path))}"
    cards = []
    for rank, hit in enumerate(hits, 1):
        item = items.get(hit.path)
        thumb = _thumbnail_tag(item) if item else '<div class="missing">not in the index</div>'
        itm = "" if hit.itm is None else f" &middot; itm {hit.itm:.3f} + itc {hit.itc:.3f}"
        cards.append(
            f"<figure>{thumb}<figcaption><b>#{rank}</b> score {hit.score:.4f}{itm}"
            f'<div class="path">{html.escape(hit.path)}</div></figcaption></figure>'
        )
    title = html.escape(query if isinstance(query, str) else os.fspath(query))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>blip-fast search: {title}</title><style>{_STYLE}</style></head><body>\n"
        f'<h1 class="query">{heading}</h1>\n'
        f"<p>{len(hits)} results from {html.escape(str(index.store.root))} "
        f"({len(index)} images)</p>\n"
        f'<div class="grid">\n' + "\n".join(cards) + "\n</div>\n</body></html>\n"
    )
