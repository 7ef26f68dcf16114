"""blip-fast: a fast, drop-in reimplementation of BLIP (Li et al., ICML 2022)."""

import logging as _logging

import torch as _torch  # noqa: F401  (loads libc10 / libtorch before the extension)

__version__ = "0.1.0"

try:  # the compiled kernels register themselves on import (TORCH_LIBRARY_IMPL in csrc/)
    from blip_fast import _C  # noqa: F401

    HAS_C = True
except ImportError as _err:  # a pure-Python install still has every op (reference kernels)
    HAS_C = False
    _logging.getLogger("blip_fast").warning("blip_fast._C not loaded (%s); C++ kernels off", _err)

from blip_fast import ops  # noqa: E402,F401  (defines the op schemas)
from blip_fast.checkpoint import load, save  # noqa: E402
from blip_fast.models import BlipConfig, create_model, list_models  # noqa: E402
from blip_fast.tokenization import tokenizer  # noqa: E402

__all__ = [
    "BlipConfig",
    "create_model",
    "list_models",
    "load",
    "ops",
    "save",
    "tokenizer",
    "__version__",
]
