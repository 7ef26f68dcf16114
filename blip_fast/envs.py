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


def cpu_bf16_products() -> str:
    """``BLIP_FAST_CPU_BF16_PRODUCTS``: the most the C++ CPU attention kernels may use for the
    products of a bf16 forward: ``amx`` (default: AMX tiles where the CPU and OS have them,
    else AVX512-BF16, else fp32), ``avx512_bf16`` or ``fp32`` (bf16 converted, computed in
    fp32). Read by the kernels at every call (csrc/cpu/cross_attention_bf16.cpp); any other
    value is an error there."""
    return os.environ.get("BLIP_FAST_CPU_BF16_PRODUCTS", "amx")
