"""Search over one's own images: ``Index`` builds an on-disk index of ITC image features and
answers text queries (exact ITC top-k, then ITM reranking, as the official retrieval
evaluation) and image queries (ITC similarity). Command line: ``blip-fast index`` and
``blip-fast search``."""

from blip_fast.search.index import Hit, Index

__all__ = ["Hit", "Index"]
