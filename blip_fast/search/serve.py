"""``blip-fast serve``: search an index from a browser, or through a small JSON API.

    GET  /                     the search page (``page.html`` beside this file)
    GET  /search?q=TEXT&k=10   the k best images for a text
    POST /search/image?k=10    the same for an uploaded image (multipart field ``file``)
    GET  /search/image/{row}   the same with the indexed image of row ``row`` as the query
    GET  /thumb/{row}          a JPEG thumbnail of the indexed image of row ``row``

A search answers ``{"query", "k", "ms", "hits"}``, each hit ``{"rank", "row", "path", "score",
"itc", "itm", "thumb"}`` as ``Index.search`` returns it. Bad input (an empty or overlong query,
k out of range, an upload that is not an image, an unknown row) is answered ``{"error":
message}`` with a 4xx status; anything else that fails is logged and answered the same way with
500: no traceback leaves the server.

One worker thread owns the model (``QueryWorker``): whenever it is free it takes every query
waiting as one batch, the texts encoded together and ranked in one pass over the index
(``Index.search_texts``; ITM reranking stays per text), so a request waits at most for the batch
in progress, then its own.

FastAPI, uvicorn and python-multipart are an optional extra: ``pip install 'blip-fast[serve]'``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from blip_fast.data.images import decode_image
from blip_fast.search.encode import UNREADABLE
from blip_fast.search.html import thumbnail_jpeg
from blip_fast.search.index import Hit, Index
from blip_fast.search.sources import open_item

__all__ = ["MAX_K", "QueryWorker", "create_app", "serve"]

log = logging.getLogger("blip_fast")

MAX_K = 1000
MAX_QUERY_CHARS = 1000  # the tokenizer keeps 35 tokens anyway
MAX_UPLOAD_BYTES = 32 << 20
THUMBS_CACHED = 4096  # ~15 KB each


class QueryError(Exception):
    """A request the server answers with ``{"error": message}`` and ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Query:
    query: str | Image.Image
    k: int
    answer: Future = field(default_factory=Future)


class QueryWorker:
    """The thread that owns the model: each time it is free, it answers every query waiting
    as one batch. ``batch_sizes`` records the size of each batch it took."""

    def __init__(self, index: Index, rerank: bool = True, candidates: int = 128):
        self.index, self.rerank, self.candidates = index, rerank, candidates
        self.batch_sizes: list[int] = []
        self._waiting: queue.SimpleQueue[_Query | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="blip-fast-search", daemon=True)
        self._thread.start()

    def submit(self, query: str | Image.Image, k: int) -> Future:
        """A future of the hits (``list[Hit]``) for ``query``."""
        pending = _Query(query, k)
        self._waiting.put(pending)
        return pending.answer

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        self._waiting.put(None)
        self._thread.join()

    def _run(self) -> None:
        running = True
        while running:
            batch = [self._waiting.get()]
            while True:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            running = None not in batch
            # a request gone meanwhile (client disconnected) has cancelled its future: skip it
            batch = [q for q in batch if q is not None and q.answer.set_running_or_notify_cancel()]
            if batch:
                self.batch_sizes.append(len(batch))
                self._answer(batch)

    def _answer(self, batch: list[_Query]) -> None:
        texts = [q for q in batch if isinstance(q.query, str)]
        for k in sorted({q.k for q in texts}):
            same_k = [q for q in texts if q.k == k]
            queries = [q.query for q in same_k]
            _settle(same_k, self.index.search_texts, queries, k, self.rerank, self.candidates)
        for q in batch:
            if not isinstance(q.query, str):
                _settle([q], self._search_image, q.query, q.k)

    def _search_image(self, image: Image.Image, k: int) -> list[list[Hit]]:
        return [self.index.search(image, k)]


def _settle(queries: list[_Query], search, *args) -> None:
    """Run ``search(*args)`` (-> a list of hits per query) and hand each query its answer, or
    the error."""
    try:
        results = search(*args)
    except Exception as err:  # the requests report it; the worker goes on
        for q in queries:
            q.answer.set_exception(err)
        return
    for q, hits in zip(queries, results):
        q.answer.set_result(hits)


def _parse_k(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise QueryError(400, f"k must be an integer from 1 to {MAX_K}, got {text!r}") from None
    if not 1 <= k <= MAX_K:
        raise QueryError(400, f"k must be an integer from 1 to {MAX_K}, got {k}")
    return k


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(index: Index, rerank: bool = True, candidates: int = 128) -> FastAPI:
    """The web app over ``index`` (loaded with its model). Its worker thread stops when the
    app shuts down (``with TestClient(app)``, or uvicorn's exit)."""
    worker = QueryWorker(index, rerank, candidates)
    items = index.store.items
    rows = {str(item): row for row, item in enumerate(items)}
    page = resources.files("blip_fast.search").joinpath("page.html").read_text("utf-8")
    thumbnail = functools.lru_cache(maxsize=THUMBS_CACHED)(lambda row: thumbnail_jpeg(items[row]))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="blip-fast search", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.exception_handler(QueryError)
    async def query_error(request: Request, err: QueryError):
        return _error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return _error(422, f"invalid request: {where}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):  # uvicorn logs the traceback
        return _error(500, f"internal error: {type(err).__name__}")

    def row_of(row: int):
        if not 0 <= row < len(items):
            raise QueryError(
                404, f"no image at row {row}: the index holds rows 0..{len(items) - 1}"
            )
        return items[row]

    async def answer(query: str | Image.Image, k: int, described: dict) -> dict:
        start = time.perf_counter()
        try:
            hits = await asyncio.wrap_future(worker.submit(query, k))
        except (ValueError, TypeError) as err:
            raise QueryError(400, str(err)) from None
        except Exception as err:
            log.exception("serve: search for %s failed", described)
            raise QueryError(500, f"search failed: {type(err).__name__}: {err}") from None
        ms = (time.perf_counter() - start) * 1e3
        return {
            "query": described,
            "k": k,
            "ms": round(ms, 2),
            "hits": [
                {
                    "rank": rank,
                    "row": rows.get(hit.path),
                    "path": hit.path,
                    "score": hit.score,
                    "itc": hit.itc,
                    "itm": hit.itm,
                    "thumb": f"/thumb/{rows[hit.path]}" if hit.path in rows else None,
                }
                for rank, hit in enumerate(hits, 1)
            ],
        }

    @app.get("/", response_class=HTMLResponse)
    async def search_page():
        return page

    @app.get("/search")
    async def search_text(q: str = "", k: str = "10"):
        text = q.strip()
        if not text:
            raise QueryError(400, "empty query: pass the text as q=...")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(
                400, f"query too long: {len(text)} characters, at most {MAX_QUERY_CHARS}"
            )
        return await answer(text, _parse_k(k), {"text": text})

    @app.post("/search/image")
    async def search_upload(file: Annotated[UploadFile | None, File()] = None, k: str = "10"):
        k = _parse_k(k)
        if file is None:
            raise QueryError(400, "no image: upload it as the multipart field 'file'")
        name = file.filename or "upload"
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise QueryError(413, f"{name}: larger than {MAX_UPLOAD_BYTES >> 20} MiB")
        try:
            image = await run_in_threadpool(decode_image, data, name)
        except UNREADABLE as err:
            raise QueryError(400, f"unreadable image upload: {err}") from None
        return await answer(image, k, {"image": name})

    @app.get("/search/image/{row}")
    async def search_row(row: int, k: str = "10"):
        k, item = _parse_k(k), row_of(row)
        try:
            image = await run_in_threadpool(open_item, item)
        except UNREADABLE as err:
            raise QueryError(410, f"row {row} is no longer readable: {err}") from None
        return await answer(image, k, {"row": row, "path": str(item)})

    @app.get("/thumb/{row}")
    async def thumb(row: int):
        row_of(row)
        try:
            jpeg = await run_in_threadpool(thumbnail, row)
        except UNREADABLE as err:
            raise QueryError(410, f"row {row} is no longer readable: {err}") from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(index: Index, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve ``create_app(index, **options)`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(index, **options), host=host, port=port, log_level="info")
