"""``blip-fast index``, ``search`` and ``serve``: the command-line face of ``Index`` and
``TextIndex``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

# what blip-fast serve imports (the "serve" extra); python-multipart reads uploads
SERVE_MODULES = ("fastapi", "uvicorn", "python_multipart")


def _load_model(path, device):
    import torch

    from blip_fast.checkpoint import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load(path, task="retrieval").to(device).eval()


def index(args):
    """Build (or continue, or with ``--add`` extend) the index OUT of the images of SRC; under
    torchrun each rank encodes a share and rank 0 merges them (``blip_fast.search.ranks``)."""
    from blip_fast.search import Index
    from blip_fast.search.ranks import build_on_ranks
    from blip_fast.train.distributed import init_distributed, shutdown

    if args.texts:
        return _index_texts(args)
    info = init_distributed(args.device, timeout_s=24 * 3600)  # a share can take hours
    model = _load_model(args.model, info.device)
    options = dict(
        batch_size=args.batch_size, chunk_size=args.chunk_size, num_workers=args.num_workers
    )
    if info.world_size > 1:
        before = len(Index.load(args.out)) if args.add else None
        idx = build_on_ranks(
            model,
            args.src,
            args.out,
            add=args.add,
            store_tokens=args.store_tokens,
            videos=args.videos,
            **options,
        )
        added = len(idx) - before if args.add else None
        shutdown()
        if not info.is_main:
            return
    elif args.add:
        idx = Index.load(args.out, model)
        added = idx.add(args.src, **options)
    else:
        idx = Index.build(
            model, args.src, args.out, args.store_tokens, videos=args.videos, **options
        )
        added = None
    print(
        f"{args.out}: {len(idx)} "
        + ("images and videos" if idx.store.manifest.get("videos") else "images")
        + (f" ({added} added)" if added is not None else "")
        + (f", {len(idx.skipped)} unreadable (listed in corrupt_images.tsv)" if idx.skipped else "")
        + (f", built by {info.world_size} ranks" if info.world_size > 1 else "")
    )


def _index_texts(args):
    """``--texts``: the caption index OUT of the captions file SRC (``TextIndex``)."""
    from blip_fast.search import TextIndex

    if args.add or args.store_tokens or args.videos:
        sys.exit(
            "index: --texts builds a caption index at once: no --add, --store-tokens, --videos"
        )
    idx = TextIndex.build(_load_model(args.model, args.device), args.src, args.out)
    print(f"{args.out}: {len(idx)} captions")


def search(args):
    """Print the best images of INDEX for QUERY (text, or an image file with ``--image``); the
    best captions of a caption index for an image."""
    from blip_fast.search.ann import require_faiss
    from blip_fast.search.store import Store
    from blip_fast.search.texts import is_text_index

    if is_text_index(args.index):
        return _search_texts(args)
    store = Store.open(args.index)  # a missing index is reported before a model is loaded
    if args.approximate:
        try:
            require_faiss()
        except ImportError as err:
            sys.exit(f"search: {err}")
    idx = _with_model(store, args, "search")
    query = Path(args.query) if args.image else args.query
    hits = idx.search(
        query,
        k=args.k,
        rerank=not args.no_rerank,
        candidates=args.candidates,
        exact=not args.approximate,
    )
    if args.html:
        from blip_fast.search.html import contact_sheet

        Path(args.html).write_text(contact_sheet(idx, query, hits), encoding="utf-8")
        print(f"search: results page written to {args.html}", file=sys.stderr)
    print_hits(hits, lambda hit: hit.path, args.json)


def _search_texts(args):
    from blip_fast.search import TextIndex

    if not args.image or args.approximate or args.html:
        sys.exit(
            f"search: {args.index} is a caption index: it answers an image query (--image), "
            "exactly (no --approximate), with no --html"
        )
    manifest = TextIndex(args.index).manifest
    model_path = args.model or manifest["model"]["path"]
    if model_path is None:
        sys.exit(f"search: {args.index} does not name its model; pass --model CHECKPOINT")
    idx = TextIndex(args.index, _load_model(model_path, args.device), args.precision)
    hits = idx.search(
        Path(args.query), k=args.k, rerank=not args.no_rerank, candidates=args.candidates
    )
    print_hits(hits, lambda hit: hit.text, args.json)


def print_hits(hits, name, as_json: bool = False) -> None:
    """``hits`` (``Hit``s or ``TextHit``s) as JSON, or a line each: rank, score, ``name(hit)``
    (``blip-fast search``'s output; the demo's too)."""
    if as_json:
        print(json.dumps([dataclasses.asdict(hit) for hit in hits], indent=1))
        return
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit.score:8.4f}  {name(hit)}")


def serve(args):
    """Serve the search page and JSON API of INDEX (``blip_fast.search.serve``)."""
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"serve: {', '.join(missing)} not installed: pip install 'blip-fast[serve]'")
    from blip_fast.search.serve import serve as run
    from blip_fast.search.store import Store

    idx = _with_model(Store.open(args.index), args, "serve")
    run(idx, args.host, args.port, rerank=not args.no_rerank, candidates=args.candidates)


def _with_model(store, args, command: str):
    """The index ``store`` with its model (``--model``, else the checkpoint that built it)."""
    from blip_fast.search import Index

    model_path = args.model or store.manifest["model"]["path"]
    if model_path is None:
        sys.exit(f"{command}: {args.index} does not name its model; pass --model CHECKPOINT")
    return Index(store, _load_model(model_path, args.device), args.precision)
