"""Fixtures of the training tests: a small synthetic data set and its training config."""

import pytest

from blip_fast.data import make_synthetic


@pytest.fixture(scope="session")
def synthetic_train(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("train_data"),
        n_train_images=24,
        n_test_images=8,
        n_val_images=2,
        image_size=64,
    )


@pytest.fixture
def tiny_config(synthetic_train):
    """Official-style keys for a few steps of blip_tiny retrieval fine-tuning."""
    return {
        "model": "blip_tiny",
        "train_file": str(synthetic_train["train"]),
        "image_root": str(synthetic_train["image_root"]),
        "batch_size_train": 4,
        "init_lr": 1e-4,
        "max_epoch": 2,
        "queue_size": 16,
        "alpha": 0.4,
    }
