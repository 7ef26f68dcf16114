"""Search over one's own images: ``Index`` builds an on-disk index of ITC image features and
answers text queries (exact ITC top-k, then ITM reranking, as the official retrieval
evaluation) and image queries (ITC similarity); ``TextIndex`` holds captions and answers image
queries the same way (image-to-text). Command line: ``blip-fast index`` and
``blip-fast search``."""

from blip_fast.search.index import Hit, Index
from blip_fast.search.texts import TextHit, TextIndex

__all__ = ["Hit", "Index", "TextHit", "TextIndex"]
