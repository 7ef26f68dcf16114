"""Shared pytest setup: Triton's interpreter on machines without CUDA, a per-test seed, and the
``gpu`` / ``slow`` markers (``gpu`` tests skip themselves where CUDA is absent)."""

import os

import pytest
import torch  # before blip_fast: blip_fast._C links against torch's libraries

# Must precede any `import triton` (tests/kernels/ run the Triton launchers on CPU this way).
# Importing torch does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state, so a failure reproduces on its own."""
    torch.manual_seed(0)
    return 0
