"""Every ``BLIP_FAST_*`` environment variable, typed and documented in one place."""

import os


def backend() -> str | None:
    """``BLIP_FAST_BACKEND``: backend for every op that supports it (``reference``, ``sdpa``,
    ``triton``, ``cuda``, ``cpu``, ...). An explicit ``backend=`` argument wins over it; an op
    that lacks the named backend falls back to its best available one."""
    return os.environ.get("BLIP_FAST_BACKEND") or None


def vocab_file() -> str | None:
    """``BLIP_FAST_VOCAB``: path of a BERT uncased ``vocab.txt`` (overrides the packaged one)."""
    return os.environ.get("BLIP_FAST_VOCAB") or None


def debug() -> bool:
    """``BLIP_FAST_DEBUG=1``: the command line shows full tracebacks instead of one line."""
    return os.environ.get("BLIP_FAST_DEBUG", "") not in ("", "0")
