"""Data: annotation datasets, image transforms and a synthetic data set (DESIGN §1, §4)."""
from blip_fast.data.datasets import (MissingKeyError, PretrainDataset, RetrievalEvalDataset,
                                     RetrievalTrainDataset, load_annotations, load_image)
from blip_fast.data.synthetic import make_synthetic
from blip_fast.data.transforms import test_transform, train_transform

__all__ = ["MissingKeyError", "PretrainDataset", "RetrievalEvalDataset", "RetrievalTrainDataset",
           "load_annotations", "load_image", "make_synthetic", "test_transform", "train_transform"]
