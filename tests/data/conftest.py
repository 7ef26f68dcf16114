"""Fixtures for the data tests: synthetic JPEGs and real photos shipped inside PyPI packages."""

import pytest

from blip_fast.data import make_synthetic
from blip_fast.data.photos import sample_photos


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic data set: 12 train images (128 px JPEGs), pretrain.json over them."""
    return make_synthetic(
        tmp_path_factory.mktemp("synthetic"),
        n_train_images=12,
        n_test_images=2,
        n_val_images=2,
        captions_per_train_image=2,
    )


@pytest.fixture(scope="session")
def photos():
    found = sample_photos()
    if not found:
        pytest.skip("no real photos: pip install scikit-image (or scikit-learn)")
    return found


@pytest.fixture(scope="session")
def synthetic_jpegs(synthetic):
    root = synthetic["root"] / "images" / "train"
    return sorted(str(p) for p in root.glob("*.jpg"))[:6]
