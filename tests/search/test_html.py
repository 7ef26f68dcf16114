"""The contact sheet of search results: every hit shown in order, thumbnails embedded, and
everything user-controlled escaped."""

import base64
import io
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import blip_fast
from blip_fast.cli import main
from blip_fast.search import Index
from blip_fast.search.html import THUMB_SIZE, contact_sheet

HOSTILE = "<script>alert('q')</script> & \"dogs\""


class _Sheet(HTMLParser):
    """What a reader sees: the text of each .path, the src of each img, any script."""

    def __init__(self):
        super().__init__()
        self.paths, self.images, self.scripts, self._in_path = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_path = attrs.get("class") == "path"
        self.images += [attrs["src"]] if tag == "img" else []
        self.scripts += tag == "script"

    def handle_data(self, data):
        if self._in_path:
            self.paths.append(data)
            self._in_path = False


def _read(page: str) -> _Sheet:
    sheet = _Sheet()
    sheet.feed(page)
    return sheet


@pytest.fixture
def index(model, photos, tmp_path):
    # a file name a browser would read as markup if it were pasted in unescaped
    shutil.copy(photos / "000003.jpg", photos / "<img src=x onerror=alert(1)>&.jpg")
    return Index.build(model, photos, tmp_path / "index", progress=False)


def test_text_results_page_shows_every_hit_in_order_escaped(index):
    hits = index.search(HOSTILE, k=9, candidates=9)
    page = contact_sheet(index, HOSTILE, hits)
    sheet = _read(page)
    assert sheet.paths == [hit.path for hit in hits]
    assert any("<img src=x" in path for path in sheet.paths)  # the hostile name, as text
    assert sheet.scripts == 0 and "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt; &amp; &quot;dogs&quot;" in page
    for rank, hit in enumerate(hits, 1):
        assert f"<b>#{rank}</b> score {hit.score:.4f}" in page
    assert len(sheet.images) == len(hits)
    prefix = "data:image/jpeg;base64,"
    assert all(src.startswith(prefix) for src in sheet.images)
    thumb = Image.open(io.BytesIO(base64.b64decode(sheet.images[0][len(prefix) :])))
    assert thumb.format == "JPEG" and max(thumb.size) <= THUMB_SIZE


def test_image_results_page_shows_the_query_and_marks_unreadable_files(index, photos):
    query = photos / "000002.jpg"
    hits = index.search(query, k=3)
    Path(hits[1].path).unlink()  # deleted since the search
    sheet = _read(contact_sheet(index, query, hits))
    assert sheet.paths == [hit.path for hit in hits]
    assert len(sheet.images) == 1 + len(hits) - 1  # the query's thumbnail, one hit missing
    assert "unreadable" in contact_sheet(index, query, hits)


def test_cli_search_writes_the_page(model, index, tmp_path, capsys):
    blip_fast.save(model, tmp_path / "m.pth", format="official")
    out = tmp_path / "results.html"
    argv = ["search", str(index.store.root), "a red square", "-k", "4", "--model"]
    main([*argv, str(tmp_path / "m.pth"), "--html", str(out), "--json"])
    assert f"results page written to {out}" in capsys.readouterr().err
    want = index.search("a red square", k=4)
    assert _read(out.read_text(encoding="utf-8")).paths == [hit.path for hit in want]
