"""``blip-fast serve``: the JSON API against ``Index.search``, its errors, batching of concurrent
queries, a bounded load test on loopback, and the page driven in headless Chromium.

The server tests skip without FastAPI (the ``serve`` extra) or httpx; the page test also
skips without Playwright or Debian's ``chromium`` (``apt-get install chromium``; Playwright's
own browser download is not used)."""

import importlib.util
import io
import shutil
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from blip_fast.cli import main
from blip_fast.search import Index
from blip_fast.search.html import THUMB_SIZE

try:
    from fastapi.testclient import TestClient  # needs httpx too

    from blip_fast.search.serve import QueryWorker, create_app

    SERVE_MISSING = None
except ImportError as err:
    SERVE_MISSING = f"needs the serve extra and httpx ({err.name} is not installed)"
needs_serve = pytest.mark.skipif(SERVE_MISSING is not None, reason=SERVE_MISSING or "")

QUERY = "a small blue triangle on the left of a red circle"
TEXTS = [QUERY, "a red square", "two green circles", "a dark photo", "stripes", "blue sky"]
LOAD_QUERIES, LOAD_CLIENTS = 48, 8


def test_serve_without_its_extra_says_which(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name)
    )
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "nowhere"])
    message = exit_.value.code  # one line; lists fastapi too where it is missing
    assert message.startswith("serve: ") and "uvicorn" in message.splitlines()[0]
    assert message.endswith(" not installed: pip install 'blip-fast[serve]'")


@pytest.fixture
def index(model, photos, tmp_path):
    return Index.build(model, photos, tmp_path / "index", chunk_size=3, progress=False)


@pytest.fixture
def client(index):
    with TestClient(create_app(index)) as client:
        yield client


def _same_hits(got: dict, want, index):
    assert [h["path"] for h in got["hits"]] == [h.path for h in want]
    assert [h["rank"] for h in got["hits"]] == list(range(1, len(want) + 1))
    assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want], abs=1e-5)
    assert [index.paths[h["row"]] for h in got["hits"]] == [h.path for h in want]


@needs_serve
def test_text_search_answers_what_index_search_does(client, index):
    r = client.get("/search", params={"q": QUERY, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == {"text": QUERY} and body["k"] == 5
    _same_hits(body, index.search(QUERY, k=5), index)
    assert all(h["itm"] is not None for h in body["hits"])
    thumb = client.get(body["hits"][0]["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert max(img.size) <= THUMB_SIZE
    page = client.get("/")
    assert page.status_code == 200 and '<input id="q"' in page.text


@needs_serve
def test_image_searches_answer_what_index_search_does(client, index, photos):
    query = photos / "000002.jpg"
    want = index.search(query, k=3)
    upload = {"file": ("mine.jpg", query.read_bytes(), "image/jpeg")}
    r = client.post("/search/image", params={"k": 3}, files=upload)
    assert r.status_code == 200, r.text
    assert r.json()["query"] == {"image": "mine.jpg"}
    _same_hits(r.json(), want, index)
    row = index.paths.index(str(query))
    r = client.get(f"/search/image/{row}", params={"k": 3})
    assert r.status_code == 200, r.text
    _same_hits(r.json(), want, index)
    assert r.json()["hits"][0]["path"] == str(query)


@needs_serve
@pytest.mark.parametrize(
    "method, url, kwargs, status, message",
    [
        ("get", "/search", {"params": {"q": "  "}}, 400, "empty query"),
        ("get", "/search", {}, 400, "empty query"),
        ("get", "/search", {"params": {"q": "x" * 1001}}, 400, "query too long"),
        ("get", "/search", {"params": {"q": "a dog", "k": 0}}, 400, "k must be an integer"),
        ("get", "/search", {"params": {"q": "a dog", "k": "ten"}}, 400, "got 'ten'"),
        ("get", "/search", {"params": {"q": "a dog", "k": 10**6}}, 400, "got 1000000"),
        ("post", "/search/image", {}, 400, "no image: upload it"),
        (
            "post",
            "/search/image",
            {"files": {"file": ("notes.txt", b"not an image", "text/plain")}},
            400,
            "unreadable image upload: ",
        ),
        ("get", "/search/image/8", {}, 404, "no image at row 8: the index holds rows 0..7"),
        ("get", "/search/image/-1", {}, 404, "no image at row -1"),
        ("get", "/thumb/99", {}, 404, "no image at row 99"),
        ("get", "/thumb/first", {}, 422, "invalid request: path.row"),
        ("get", "/nowhere", {}, 404, "Not Found"),
        ("delete", "/search", {}, 405, "Method Not Allowed"),
    ],
)
def test_bad_input_is_a_json_error(client, method, url, kwargs, status, message):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and message in r.json()["error"]
    assert "Traceback" not in r.text


@needs_serve
def test_a_file_unreadable_since_indexing_is_a_json_error(client, index):
    Path(index.paths[3]).unlink()
    r = client.get("/thumb/3")
    assert r.status_code == 410 and "row 3 is no longer readable" in r.json()["error"]


def _hold_first_batch(index, monkeypatch) -> tuple[list[list[str]], threading.Event]:
    """Makes the worker's first text batch take 1.5 s more; returns (the texts of each batch
    it runs, an event set once the first is in the model)."""
    search_texts, batches, started = index.search_texts, [], threading.Event()

    def slow_first(texts, *args):
        batches.append(list(texts))
        if len(batches) == 1:
            started.set()
            time.sleep(1.5)
        return search_texts(texts, *args)

    monkeypatch.setattr(index, "search_texts", slow_first)
    return batches, started


@needs_serve
def test_an_unexpected_failure_is_a_json_500_without_traceback(index):
    app = create_app(index)

    @app.get("/broken")
    def broken():
        raise RuntimeError("a detail the client need not see")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/broken")
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}


@needs_serve
def test_concurrent_queries_wait_for_one_batch_and_are_answered_together(index, monkeypatch):
    """The first query is held in the model; the others, sent meanwhile from threads, are
    answered together by the next batch."""
    batches, started = _hold_first_batch(index, monkeypatch)
    app = create_app(index)
    with TestClient(app) as client, ThreadPoolExecutor(len(TEXTS)) as pool:

        def ask(text):
            return client.get("/search", params={"q": text, "k": 3})

        first = pool.submit(ask, TEXTS[0])
        assert started.wait(60)
        rest = list(pool.map(ask, TEXTS[1:]))
        answers = [first.result(), *rest]
    assert [r.status_code for r in answers] == [200] * len(TEXTS)
    for text, r in zip(TEXTS, answers):
        _same_hits(r.json(), index.search(text, k=3), index)
    sizes = app.state.worker.batch_sizes
    assert batches[0] == [TEXTS[0]] and sizes[0] == 1 and sum(sizes) == len(TEXTS)
    assert max(sizes[1:]) > 1, f"queries waiting together were not batched: {sizes}"


@needs_serve
def test_a_query_cancelled_while_waiting_is_dropped(index, monkeypatch):
    batches, started = _hold_first_batch(index, monkeypatch)
    worker = QueryWorker(index)
    try:
        first = worker.submit(TEXTS[0], 3)
        assert started.wait(60)
        gone, kept = worker.submit(TEXTS[1], 3), worker.submit(TEXTS[2], 3)
        assert gone.cancel()
        assert [h.path for h in kept.result(60)] == [h.path for h in index.search(TEXTS[2], k=3)]
        assert len(first.result(60)) == 3
    finally:
        worker.close()
    assert batches == [[TEXTS[0]], [TEXTS[2]]] and worker.batch_sizes == [1, 1]


@pytest.fixture
def live_server(index):
    """The app served by a real uvicorn on a free loopback port, in a thread; its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(index), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


@needs_serve
def test_load_on_loopback_every_query_is_answered(live_server, index):
    """A bounded burst: LOAD_QUERIES text queries from LOAD_CLIENTS concurrent clients. The
    latencies are printed for the record, not asserted (this machine's speed is not a claim)."""
    import httpx

    want = {text: [h.path for h in index.search(text, k=4)] for text in TEXTS}

    def ask(i):
        text = TEXTS[i % len(TEXTS)]
        start = time.perf_counter()
        with httpx.Client(base_url=live_server, timeout=120) as http:
            r = http.get("/search", params={"q": text, "k": 4})
        return text, r, time.perf_counter() - start

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = list(pool.map(ask, range(LOAD_QUERIES)))
    for text, r, _ in results:
        assert r.status_code == 200, r.text
        assert [h["path"] for h in r.json()["hits"]] == want[text]
    ms = sorted(seconds * 1e3 for *_, seconds in results)
    p50, p95 = statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]
    print(
        f"\nserve load: {LOAD_QUERIES} queries, {LOAD_CLIENTS} concurrent clients: "
        f"p50 {p50:.0f} ms, p95 {p95:.0f} ms"
    )


@needs_serve
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install)")
def test_page_in_headless_chromium(live_server, index, tmp_path):
    """A person's path through the page: type a query, see the grid, click the top result to
    find images like it."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")
    top = index.search(QUERY, k=12)[0].path
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(live_server)
            page.fill("#q", QUERY)
            page.press("#q", "Enter")
            page.wait_for_selector(".hit .path", timeout=60_000)
            page.wait_for_function(
                "[...document.images].every(img => img.complete && img.naturalWidth > 0)"
            )
            assert page.locator(".hit .path").first.text_content() == top
            assert page.locator(".hit").count() == len(index)
            screenshot = tmp_path / "serve_page.png"
            page.screenshot(path=screenshot, full_page=True)
            print(f"\nserve page screenshot: {screenshot}")

            page.locator(".hit").first.click()
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('image')"
            )
            assert page.locator(".hit .path").first.text_content() == top  # itself, first
        finally:
            browser.close()
