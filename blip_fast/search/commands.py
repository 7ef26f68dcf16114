"""``blip-fast index``, ``search`` and ``serve``: the command-line face of ``Index``."""

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
    """Build (or continue, or with ``--add`` extend) the index OUT of the images of SRC."""
    from blip_fast.search import Index

    model = _load_model(args.model, args.device)
    options = dict(
        batch_size=args.batch_size, chunk_size=args.chunk_size, num_workers=args.num_workers
    )
    if args.add:
        idx = Index.load(args.out, model)
        added = idx.add(args.src, **options)
    else:
        idx = Index.build(model, args.src, args.out, store_tokens=args.store_tokens, **options)
        added = None
    print(
        f"{args.out}: {len(idx)} images"
        + (f" ({added} added)" if added is not None else "")
        + (f", {len(idx.skipped)} unreadable (listed in corrupt_images.tsv)" if idx.skipped else "")
    )


def search(args):
    """Print the best images of INDEX for QUERY (text, or an image file with ``--image``)."""
    from blip_fast.search.ann import require_faiss
    from blip_fast.search.store import Store

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
    if args.json:
        print(json.dumps([dataclasses.asdict(hit) for hit in hits], indent=1))
        return
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit.score:8.4f}  {hit.path}")


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
    return Index(store, _load_model(model_path, args.device))
