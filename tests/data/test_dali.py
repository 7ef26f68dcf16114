"""The DALI graph on DALI's CPU operators (device_id=None) against the CPU loader; the same
graph with the ``mixed`` decoder runs on a GPU (marked ``gpu``)."""

import json

import numpy as np
import pytest
import torch

from blip_fast.data import (
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    Uint8TestTransform,
    Uint8TrainTransform,
    dali,
    make_loader,
)
from blip_fast.data.corrupt_report import read_corrupt_report
from blip_fast.data.synthetic import Scene
from blip_fast.data.synthetic_video import pan_frames, write_video
from blip_fast.data.transforms import MEAN, STD, test_transform
from blip_fast.data.video import VideoRetrievalDataset, count_frames, read_frames

pytestmark = pytest.mark.skipif(not dali.available(), reason=str(dali.IMPORT_ERROR))


def _eval_dataset(tmp_path, paths, size):
    (tmp_path / "ann.json").write_text(json.dumps([{"image": p, "caption": ["x"]} for p in paths]))
    return RetrievalEvalDataset(tmp_path / "ann.json", "/", Uint8TestTransform(size))


def _pixel_diff(a, b):
    """|a - b| of normalised images, in grey levels (0..255)."""
    return (a - b).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255


@pytest.mark.parametrize("size", [224, 384])
def test_test_transform_matches_cpu_loader(size, tmp_path, synthetic_jpegs, photos):
    ds = _eval_dataset(tmp_path, synthetic_jpegs + photos, size)
    cpu_images, cpu_idx = next(iter(make_loader(ds, len(ds), num_workers=0, backend="cpu")))
    dali_images, dali_idx = next(iter(dali.DaliLoader(ds, len(ds), device_id=None, num_threads=2)))
    assert dali_images.shape == cpu_images.shape and dali_images.dtype == torch.float32
    assert torch.equal(dali_idx, cpu_idx)
    diff = _pixel_diff(dali_images, cpu_images)
    # Measured (synthetic 128 px + skimage/sklearn photos): max 6 grey levels at a few ringing
    # edge pixels, mean ~0.005; DALI rounds once, PIL after each pass (see blip_fast/data/dali.py).
    assert diff.mean() < 0.05, diff.mean()
    assert (diff > 1.01).float().mean() < 0.005
    assert diff.max() <= 8, diff.max()


def _train_loader(synthetic, seed, **kw):
    ds = RetrievalTrainDataset(
        synthetic["train"], synthetic["image_root"], Uint8TrainTransform(64, **kw)
    )
    return dali.DaliLoader(ds, 8, device_id=None, num_threads=2, seed=seed)


def test_train_transform_shapes_range_determinism(synthetic):
    batches = list(_train_loader(synthetic, seed=1))
    assert [b[0].shape for b in batches] == [(8, 3, 64, 64)] * 3
    images = torch.cat([b[0] for b in batches])
    lo = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    assert ((images >= lo - 1e-5) & (images <= hi + 1e-5)).all()
    again = torch.cat([b[0] for b in _train_loader(synthetic, seed=1)])
    other = torch.cat([b[0] for b in _train_loader(synthetic, seed=2)])
    assert torch.equal(images, again)
    assert not torch.equal(images, other)


def test_train_flip_happens(synthetic, tmp_path):
    """Scale (1, 1) on square images leaves only the whole image: each output is the test
    resize of its image or that mirrored, and both occur."""
    ann = [{"image": "images/train/000000.jpg", "caption": "x"}] * 16
    (tmp_path / "one.json").write_text(json.dumps(ann))
    ds = PretrainDataset(
        tmp_path / "one.json", synthetic["image_root"], Uint8TrainTransform(64, min_scale=1.0)
    )
    images, captions = next(iter(dali.DaliLoader(ds, 16, device_id=None, num_threads=2)))
    whole = next(
        iter(dali.DaliLoader(_eval_dataset(tmp_path, [ds.entry(0)[0]], 64), 1, device_id=None))
    )[0]
    plain = (images - whole).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (images - whole.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (plain | mirrored).all() and 0 < mirrored.sum() < 16
    assert list(captions) == ["x"] * 16


def test_sampler_order_fields_and_epochs(synthetic):
    ds = RetrievalTrainDataset(synthetic["train"], synthetic["image_root"], Uint8TestTransform(32))
    order = [7, 2, 20, 11, 0]
    loader = dali.DaliLoader(ds, 2, sampler=order, device_id=None)
    assert len(loader) == 3
    for _ in range(2):  # the second epoch restarts the source
        batches = list(loader)
        assert [len(b[1]) for b in batches] == [2, 2, 1]
        captions = [c for b in batches for c in b[1]]
        img_idx = torch.cat([b[2] for b in batches]).tolist()
        assert captions == [ds.entry(i)[1][0] for i in order]
        assert img_idx == [ds.entry(i)[1][1] for i in order]
    assert [
        len(b[1]) for b in dali.DaliLoader(ds, 2, sampler=order, drop_last=True, device_id=None)
    ] == [2, 2]


def test_missing_images_skipped_and_recorded(synthetic, tmp_path):
    ann = [
        {"image": "images/train/000000.jpg", "caption": "a"},
        {"image": "images/train/nope.jpg", "caption": "b"},
        {"image": "images/train/000001.jpg", "caption": "c"},
    ]
    (tmp_path / "p.json").write_text(json.dumps(ann))
    ds = PretrainDataset(
        tmp_path / "p.json", synthetic["image_root"], Uint8TestTransform(32), skip_corrupt=True
    )
    report = tmp_path / "corrupt.tsv"
    batches = list(dali.DaliLoader(ds, 2, device_id=None, corrupt_report=report))
    assert [c for b in batches for c in b[1]] == ["a", "c"]
    assert [r["index"] for r in read_corrupt_report(report)] == [1]
    strict = PretrainDataset(tmp_path / "p.json", synthetic["image_root"], Uint8TestTransform(32))
    with pytest.raises(OSError, match="nope.jpg"):
        list(dali.DaliLoader(strict, 2, device_id=None))


def test_needs_uint8_transform(synthetic):
    ds = PretrainDataset(synthetic["pretrain"], synthetic["image_root"])
    with pytest.raises(TypeError, match="Uint8TestTransform"):
        dali.DaliLoader(ds, 2, device_id=None)


@pytest.mark.gpu
def test_mixed_decoder_matches_cpu_operators(tmp_path, synthetic_jpegs):
    ds = _eval_dataset(tmp_path, synthetic_jpegs, 224)
    gpu = next(iter(make_loader(ds, len(ds), backend="auto")))[0]
    cpu = next(iter(dali.DaliLoader(ds, len(ds), device_id=None)))[0]
    assert gpu.is_cuda
    assert _pixel_diff(gpu.cpu(), cpu).max() <= 8  # nvJPEG's IDCT may differ by a level or two


def test_sampler_read_after_set_epoch(synthetic):
    """Epoch e's order comes from the sampler as set_epoch(e) left it (no early prefetch)."""

    class EpochSampler:
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter([self.epoch, self.epoch + 1])

        def __len__(self):
            return 2

    ds = RetrievalTrainDataset(synthetic["train"], synthetic["image_root"], Uint8TestTransform(32))
    sampler = EpochSampler()
    loader = dali.DaliLoader(ds, 1, sampler=sampler, device_id=None)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert [ds.entry(i)[1][0] for i in (epoch, epoch + 1)] == [b[1][0] for b in loader]


def _video_dataset(tmp_path, lengths, codec):
    """Panning clips of ``lengths`` frames (64 px) with ``codec``, read 8 frames at 32 px."""
    pytest.importorskip("av", reason="pip install 'blip-fast[video]'")
    scene = Scene(("white", "black"), (("large", "red", "star"), ("small", "cyan", "cross")))
    lines = []
    for i, n in enumerate(lengths):
        frames = pan_frames(scene, 64, n, np.random.default_rng(i))
        write_video(tmp_path / f"clip{i}.mp4", frames, codec=codec)
        lines.append(json.dumps({"clip_name": f"clip{i}", "caption": "x"}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines))
    return VideoRetrievalDataset(tmp_path / "test.jsonl", tmp_path, test_transform(32), 8)


def _assert_same_frames(dali_batches, ds):
    """DALI's frames are the CPU loader's (official sampler): each is nearest to the frame the
    CPU loader put at its place among all frames of its clip, and close to it."""
    batches = list(dali_batches)
    assert [b[1].tolist() for b in batches] == [[0, 1], [2]]
    got = torch.cat([b[0].cpu() for b in batches])
    cpu = torch.cat([b[0] for b in torch.utils.data.DataLoader(ds, batch_size=2)])
    assert got.shape == cpu.shape == (3, 8, 3, 32, 32) and got.dtype == torch.float32
    for v in range(len(ds)):
        path = ds.video_path(v)
        every = torch.stack([ds.transform(f) for f in read_frames(path, count_frames(path))])
        for k in range(8):
            nearest = _pixel_diff(every, got[v, k][None]).mean(dim=(1, 2, 3)).argmin()
            assert torch.equal(every[nearest], cpu[v, k]), (v, k)
    # YUV -> RGB conversion and chroma upsampling differ between decoders: measured mean
    # 1.6 grey levels at 64 px (MJPEG, DALI CPU vs PyAV)
    assert _pixel_diff(got, cpu).mean() < 3


def test_video_frames_match_cpu_loader(tmp_path):
    """DALI's CPU decoder (MJPEG only) picks the frames of the official sampler, a clip
    shorter than 8 frames included (its first frame 8 times)."""
    ds = _video_dataset(tmp_path, [16, 5, 11], "mjpeg")
    _assert_same_frames(dali.video_batches(ds, 2, device_id=None, num_threads=2), ds)


@pytest.mark.gpu
def test_video_frames_on_gpu_match_cpu_loader(tmp_path):
    """The same on NVDEC, with the MPEG-4 clips of the synthetic video set."""
    ds = _video_dataset(tmp_path, [16, 5, 11], "mpeg4")
    _assert_same_frames(dali.video_batches(ds, 2), ds)
