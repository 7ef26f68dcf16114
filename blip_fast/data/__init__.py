"""Data: the official annotation formats as datasets, the official image transforms, loaders
(CPU; DALI in ``blip_fast.data.dali``) and a synthetic data set. The formats and transforms
are summarised in docs/architecture.md ("Official BLIP facts")."""

from blip_fast.data.datasets import (
    CorruptImage,
    MissingKeyError,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    load_annotations,
)
from blip_fast.data.images import load_image
from blip_fast.data.loader import SkipCorrupt, collate, make_loader
from blip_fast.data.synthetic import make_synthetic
from blip_fast.data.transforms import test_transform, train_transform
from blip_fast.data.uint8_transforms import Uint8TestTransform, Uint8TrainTransform

__all__ = [
    "CorruptImage",
    "MissingKeyError",
    "PretrainDataset",
    "RetrievalEvalDataset",
    "RetrievalTrainDataset",
    "SkipCorrupt",
    "Uint8TestTransform",
    "Uint8TrainTransform",
    "collate",
    "load_annotations",
    "load_image",
    "make_loader",
    "make_synthetic",
    "test_transform",
    "train_transform",
]
