"""The fast CPU loader against the official PIL transforms, and the corrupt-image policy."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip_fast.data import (
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    SkipCorrupt,
    Uint8TestTransform,
    Uint8TrainTransform,
    collate,
    load_image,
    make_loader,
)
from blip_fast.data import test_transform as official_test_transform
from blip_fast.data.corrupt_report import read_corrupt_report
from blip_fast.data.transforms import STD

PIXEL = 1 / 255  # one grey level, in [0, 1] units


def _pil_rgb(path) -> np.ndarray:
    with open(path, "rb") as f:
        return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))


def _max_pixel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two normalised image tensors, in [0, 1] pixel units."""
    return ((a - b).abs() * torch.tensor(STD).view(3, 1, 1)).max().item()


def test_load_image_decodes_as_pil(synthetic_jpegs, photos):
    for path in synthetic_jpegs + photos:
        assert np.array_equal(np.asarray(load_image(path)), _pil_rgb(path)), path


@pytest.mark.parametrize("size", [224, 384])
def test_test_transform_matches_official(size, synthetic_jpegs, photos):
    """uint8 out of the workers + batched normalise == PIL bicubic resize + normalise."""
    paths = synthetic_jpegs + photos
    images = [load_image(p) for p in paths]
    fast = collate([(Uint8TestTransform(size)(img), i) for i, img in enumerate(images)])
    assert fast[0].shape == (len(paths), 3, size, size) and fast[0].dtype == torch.float32
    assert fast[1].tolist() == list(range(len(paths)))
    for k, img in enumerate(images):
        official = official_test_transform(size)(img)
        assert _max_pixel_diff(fast[0][k], official) <= PIXEL, paths[k]
        assert torch.equal(fast[0][k], official), paths[k]  # in fact the same bits


def test_train_transform(synthetic_jpegs):
    img = load_image(synthetic_jpegs[0])
    outs = [
        Uint8TrainTransform(96, generator=torch.Generator().manual_seed(s))(img) for s in range(8)
    ]
    assert all(o.shape == (3, 96, 96) and o.dtype == torch.uint8 for o in outs)
    again = Uint8TrainTransform(96, generator=torch.Generator().manual_seed(3))(img)
    assert torch.equal(again, outs[3])
    assert len({o.sum().item() for o in outs}) > 4  # different crops
    # scale (1, 1) on a square image can only be the whole image: output = resize, or its flip
    whole = Uint8TestTransform(96)(img)
    gen = torch.Generator().manual_seed(0)
    full = [Uint8TrainTransform(96, min_scale=1.0, generator=gen)(img) for _ in range(16)]
    flipped = [torch.equal(o, whole.flip(-1)) for o in full]
    assert all(f or torch.equal(o, whole) for f, o in zip(flipped, full))
    assert 0 < sum(flipped) < 16


def test_make_loader_workers_and_sampler(synthetic):
    ds = RetrievalTrainDataset(synthetic["train"], synthetic["image_root"], Uint8TestTransform(64))
    order = [5, 0, 17, 3, 9]
    loader = make_loader(ds, 2, sampler=order, num_workers=2, drop_last=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    images = torch.cat([b[0] for b in batches])
    captions = [c for b in batches for c in b[1]]
    img_idx = torch.cat([b[2] for b in batches])
    official = RetrievalTrainDataset(
        synthetic["train"], synthetic["image_root"], official_test_transform(64)
    )
    for k, i in enumerate(order):
        image, caption, idx = official[i]
        assert torch.equal(images[k], image) and captions[k] == caption and img_idx[k] == idx
    with pytest.raises(ValueError, match="backend must be"):
        make_loader(ds, 2, backend="gpu")


def _corrupt_pretrain_json(synthetic, tmp_path):
    """pretrain.json over 4 good images, plus one missing and one truncated file."""
    truncated = tmp_path / "truncated.jpg"
    data = (synthetic["root"] / "images" / "train" / "000000.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    good = [{"image": f"images/train/{i:06d}.jpg", "caption": f"image {i}"} for i in range(4)]
    ann = (
        good[:2]
        + [
            {"image": str(tmp_path / "missing.jpg"), "caption": "gone"},
            {"image": str(truncated), "caption": "half"},
        ]
        + good[2:]
    )
    path = tmp_path / "dirty.json"
    path.write_text(json.dumps(ann))
    return path, truncated


def test_skip_corrupt_drops_and_records(synthetic, tmp_path):
    ann, truncated = _corrupt_pretrain_json(synthetic, tmp_path)
    report = tmp_path / "corrupt.tsv"
    ds = PretrainDataset(ann, synthetic["image_root"], Uint8TestTransform(32), skip_corrupt=True)
    loader = make_loader(ds, 3, num_workers=2, collate_fn=SkipCorrupt(report))
    captions = [c for images, caps in loader for c in caps]
    assert captions == ["image 0", "image 1", "image 2", "image 3"]
    rows = sorted(read_corrupt_report(report), key=lambda r: r["index"])
    assert [(r["index"], r["path"]) for r in rows] == [
        (2, str(tmp_path / "missing.jpg")),
        (3, str(truncated)),
    ]
    assert "not found" in rows[0]["error"] and "cannot decode" in rows[1]["error"]
    assert SkipCorrupt(report)([ds[2], ds[3]]) is None  # nothing left to collate


def test_corrupt_images_raise_without_opt_in(synthetic, tmp_path):
    ann, truncated = _corrupt_pretrain_json(synthetic, tmp_path)
    ds = PretrainDataset(ann, synthetic["image_root"], Uint8TestTransform(32))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ds[2]
    with pytest.raises(OSError, match=str(truncated)):
        ds[3]
    # evaluation never skips: the file is named in the error
    (tmp_path / "test.json").write_text(
        json.dumps([{"image": str(truncated), "caption": ["half"]}])
    )
    with pytest.raises(OSError, match="cannot decode image .*truncated.jpg"):
        RetrievalEvalDataset(tmp_path / "test.json", tmp_path, official_test_transform(32))[0]
