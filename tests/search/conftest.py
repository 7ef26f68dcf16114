"""Shared setup of the search tests: a few tiny synthetic photos and a random blip_tiny."""

import shutil

import pytest
import torch
from PIL import Image

from blip_fast import create_model
from blip_fast.data import make_synthetic


@pytest.fixture(scope="session")
def synthetic_images(tmp_path_factory):
    """Eight 64-pixel JPEGs (images/test/00000N.jpg) to copy from."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train_images=0, n_test_images=8, n_val_images=0, image_size=64)
    return sorted((root / "images" / "test").glob("*.jpg"))


@pytest.fixture
def photos(tmp_path, synthetic_images):
    """A photo folder: six JPEGs, a PNG and a WebP in a subfolder, and two files that are not
    images (a note and a video), which the index leaves out."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for src in synthetic_images[:6]:
        shutil.copy(src, folder / src.name)
    Image.open(synthetic_images[6]).save(folder / "trip" / "a.png")
    Image.open(synthetic_images[7]).save(folder / "trip" / "b.webp", lossless=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "trip" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return folder


@pytest.fixture(scope="session")
def model():
    torch.manual_seed(0)
    return create_model("retrieval", "blip_tiny").eval()
