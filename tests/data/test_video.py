"""Video frames and the MSRVTT-style dataset (blip_fast.data.video) against official BLIP's
sampler and format, on synthetic clips (blip_fast.data.synthetic_video)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blip_fast.data import test_transform
from blip_fast.data.datasets import MissingKeyError
from blip_fast.data.synthetic import Scene
from blip_fast.data.synthetic_video import make_synthetic_videos, pan_frames, write_video
from blip_fast.data.video import (
    UnreadableVideo,
    VideoRetrievalDataset,
    read_frames,
    sample_frame_indices,
)

pytest.importorskip("av", reason="pip install 'blip-fast[video]'")

SCENE = Scene(("gray",), (("large", "red", "circle"), ("small", "blue", "square")))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_synthetic_videos(
        tmp_path_factory.mktemp("videos"), n_videos=3, num_frames=16, size=64, seed=0
    )


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_sampler_hand_computed_cases():
    assert sample_frame_indices(100, 8) == [0, 12, 24, 36, 48, 60, 72, 84]
    assert sample_frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    # numpy's integer arange truncates the step 15 / 8 = 1.875 to 1
    assert sample_frame_indices(15, 8) == list(range(8))
    assert sample_frame_indices(3, 8) == [0] * 8  # fewer frames than asked: the first, n times
    assert sample_frame_indices(7, 4) == [0, 1, 2, 3]


def test_sampler_is_the_official_arange_for_eight_frames():
    for n_video in range(1, 3000):
        official = np.arange(0, n_video, n_video / 8, dtype=int).tolist()
        assert sample_frame_indices(n_video, 8) == official, n_video


def test_sampler_rejects_empty_video_and_zero_frames():
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(10, 0)


def test_read_frames_picks_the_sampled_frames(tmp_path):
    source = pan_frames(SCENE, 64, 16, np.random.default_rng(0))
    write_video(tmp_path / "pan.mp4", source)
    frames = read_frames(tmp_path / "pan.mp4", 8)
    assert len(frames) == 8 and all(f.size == (64, 64) and f.mode == "RGB" for f in frames)
    # each is frame 2k of the 16 (the source frame nearest to it); MPEG-4 with 4:2:0 chroma
    # leaves ~3 grey levels of mean error on these hard colour edges (measured 2.7-3.1)
    for k, frame in enumerate(frames):
        diffs = [_mean_diff(frame, s) for s in source]
        assert int(np.argmin(diffs)) == 2 * k and diffs[2 * k] < 4.0, (k, diffs)


def test_fewer_frames_than_asked_repeat_the_first(tmp_path):
    source = pan_frames(SCENE, 64, 3, np.random.default_rng(1))
    write_video(tmp_path / "short.mp4", source)
    frames = read_frames(tmp_path / "short.mp4", 8)
    assert len(frames) == 8
    assert all(np.array_equal(np.asarray(f), np.asarray(frames[0])) for f in frames)
    assert _mean_diff(frames[0], source[0]) < _mean_diff(frames[0], source[2])


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_frames(tmp_path / "nope.mp4")
    (tmp_path / "text.mp4").write_text("not a video\n" * 100)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ("text.mp4", "empty.mp4"):
        with pytest.raises(UnreadableVideo, match=name) as err:
            read_frames(tmp_path / name)
        assert isinstance(err.value, ValueError)


def test_missing_pyav_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"blip-fast\[video\]"):
        read_frames(tmp_path / "any.mp4")


def test_synthetic_videos_deterministic_and_official_format(clips, tmp_path):
    again = make_synthetic_videos(tmp_path, n_videos=3, num_frames=16, size=64, seed=0)
    for name in ("video0.mp4", "video1.mp4", "video2.mp4"):
        ours, theirs = clips["video_root"] / name, again["video_root"] / name
        assert ours.read_bytes() == theirs.read_bytes(), name
    lines = [json.loads(x) for x in clips["test"].read_text().splitlines()]
    assert [x["clip_name"] for x in lines] == ["video0", "video1", "video2"]
    assert all(isinstance(x["caption"], str) for x in lines)
    assert len({x["caption"] for x in lines}) == 3
    other = make_synthetic_videos(tmp_path / "other", n_videos=1, num_frames=16, size=64, seed=1)
    assert (other["video_root"] / "video0.mp4").read_bytes() != (
        clips["video_root"] / "video0.mp4"
    ).read_bytes()


def test_dataset_items_are_normalised_frames(clips):
    ds = VideoRetrievalDataset(clips["test"], clips["video_root"], test_transform(32), 4)
    assert len(ds) == 3 and ds.txt2video == {0: 0, 1: 1, 2: 2}
    assert ds.video2txt == {0: [0], 1: [1], 2: [2]}
    frames, index = ds[1]
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == torch.float32 and index == 1
    raw = read_frames(clips["video_root"] / "video1.mp4", 4)
    assert torch.equal(frames, torch.stack([test_transform(32)(f) for f in raw]))


def test_dataset_reads_json_list_and_caption_lists(clips, tmp_path):
    ann = [
        {"clip_name": "video2", "caption": ["A Red circle!", "two   shapes"]},
        {"clip_name": "video0", "caption": "x"},
    ]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    ds = VideoRetrievalDataset(tmp_path / "test.json", clips["video_root"], test_transform(32))
    assert ds.text == ["a red circle", "two shapes", "x"]
    assert ds.txt2video == {0: 0, 1: 0, 2: 1} and ds.video2txt == {0: [0, 1], 1: [2]}
    assert ds.video == ["video2", "video0"] and ds[0][0].shape == (8, 3, 32, 32)


def test_dataset_missing_video_is_named(clips, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"clip_name": "gone", "caption": "x"}) + "\n")
    ds = VideoRetrievalDataset(tmp_path / "a.jsonl", clips["video_root"], test_transform(32))
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        ds[0]


@pytest.mark.parametrize(
    "text, error, match",
    [
        ('{"clip_name": "v", "caption": "x"}\n{"caption": "y"}\n', MissingKeyError, "entry 1"),
        ('{"clip_name": 3, "caption": "x"}\n', TypeError, "'clip_name' must be str, got int"),
        ('{"clip_name": "v", "caption": 5}\n', TypeError, "'caption' must be str or list"),
        ('{"clip_name": "v", "caption": []}\n', ValueError, "empty list"),
        ('{"clip_name": "v", "caption": "x"}\n{oops\n', ValueError, "line 2 of"),
        ('[{"clip_name": "v",', ValueError, "invalid JSON"),
        ("\n", ValueError, "no entries"),
    ],
)
def test_bad_annotations_name_file_and_entry(tmp_path, text, error, match):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(error, match=match) as err:
        VideoRetrievalDataset(tmp_path / "bad.jsonl", tmp_path, test_transform(32))
    assert "bad.jsonl" in str(err.value)
