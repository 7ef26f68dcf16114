"""Video clips for zero-shot text-to-video retrieval: official BLIP's frame sampler and MSRVTT
test set (``data/video_dataset.py``, evaluated by ``eval_retrieval_video.py``).

A clip becomes ``num_frames`` RGB frames picked by the official "uniform" sampler, each then
transformed like an evaluation image (bicubic resize to (S, S), CLIP mean / std). Official BLIP
decodes with decord, which resizes inside ffmpeg; here PyAV decodes at the native size and PIL
resizes, as for images, so pixels are close to, not identical with, the official ones.

Annotations: the official ``msrvtt_test.jsonl``, one ``{"clip_name", "caption"}`` object per
line, the video being ``<video_root>/<clip_name>.mp4``; a JSON list of the same objects is read
too. ``caption`` is a string (the official file: one text per video) or a list of strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from blip_fast.data.datasets import MissingKeyError, _check_caption_list
from blip_fast.text import pre_caption

__all__ = [
    "UnreadableVideo",
    "VideoRetrievalDataset",
    "count_frames",
    "load_video_annotations",
    "read_frames",
    "sample_frame_indices",
]

PathLike = str | os.PathLike


class UnreadableVideo(ValueError):
    """A file that is not a decodable video: not a container ffmpeg knows, no video stream,
    no frames, or fewer frames than its container lists."""


def sample_frame_indices(num_video_frames: int, num_frames: int = 8) -> list[int]:
    """Indices of the ``num_frames`` frames official BLIP's "uniform" sampler reads from a
    video of ``num_video_frames`` frames.

    The official sampler is ``np.arange(0, V, V / n, dtype=int)``; numpy casts the step to an
    integer before stepping, so the indices are ``i * (V // n)`` for i < n, not evenly spread
    over the video (V = 15, n = 8: frames 0..7). A video with fewer frames than asked (V < n)
    gives step 0: its first frame, ``n`` times. (For n not a power of two, rounding in V / n
    makes numpy return one index more for some V; every clip here has exactly n frames.)
    """
    if num_video_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    step = num_video_frames // num_frames
    return [i * step for i in range(num_frames)]


def _import_av():
    try:
        import av
    except ImportError as err:
        raise ImportError(
            f"reading videos needs PyAV ({err}): pip install 'blip-fast[video]'"
        ) from err
    return av


def count_frames(path: PathLike) -> int:
    """Frames of the first video stream of ``path``, counted from its packets (no decoding).
    Raises FileNotFoundError for a missing file, ``UnreadableVideo`` for a file ffmpeg cannot
    open or that has no video stream or frames."""
    av = _import_av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise UnreadableVideo(f"{path} has no video stream")
            n = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    except av.FFmpegError as err:
        raise UnreadableVideo(f"cannot read video {path}: {err}") from err
    if n == 0:
        raise UnreadableVideo(f"{path} has no video frames")
    return n


def read_frames(path: PathLike, num_frames: int = 8) -> list[Image.Image]:
    """The ``num_frames`` RGB frames of the video at ``path`` chosen by
    ``sample_frame_indices``; a video shorter than ``num_frames`` frames gives its first frame
    ``num_frames`` times, as official BLIP. Raises FileNotFoundError for a missing file and
    ``UnreadableVideo`` (a ValueError) for anything that does not decode as a video."""
    av = _import_av()
    path = os.fspath(path)
    n_video = count_frames(path)
    indices = sample_frame_indices(n_video, num_frames)
    wanted, frames, decoded = set(indices), {}, 0
    try:
        with av.open(path) as container:
            for frame in container.decode(container.streams.video[0]):
                if decoded in wanted:
                    frames[decoded] = frame.to_image()
                decoded += 1
                if decoded > indices[-1]:
                    break
    except av.FFmpegError as err:
        raise UnreadableVideo(f"cannot read video {path}: {err}") from err
    if len(frames) < len(wanted):
        raise UnreadableVideo(
            f"{path} lists {n_video} frames but only {decoded} decode (frame {indices[-1]} wanted)"
        )
    return [frames[i] for i in indices]


def _parse_entries(path: Path) -> list:
    """A JSON list, or JSON Lines (one object per non-blank line) as the official file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON in annotation file {path}: {err}") from err
    entries = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON on line {line_no} of {path}: {err}") from err
    return entries


def load_video_annotations(ann_file: PathLike) -> list[dict]:
    """The entries of an MSRVTT-style annotation file, each checked: ``clip_name`` (str) and
    ``caption`` (str or non-empty list of str). Errors name the file, entry and key."""
    path = Path(ann_file)
    entries = _parse_entries(path)
    if not entries:
        raise ValueError(f"annotation file {path} has no entries")
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise TypeError(f"{where} must be an object, got {type(entry).__name__}")
        for key in ("clip_name", "caption"):
            if key not in entry:
                raise MissingKeyError(f"{where} has no '{key}' key (keys: {sorted(entry)})")
        clip, caption = entry["clip_name"], entry["caption"]
        if not isinstance(clip, str):
            raise TypeError(f"{where}: 'clip_name' must be str, got {type(clip).__name__}")
        if isinstance(caption, list):
            _check_caption_list(caption, where)
        elif not isinstance(caption, str):
            raise TypeError(
                f"{where}: 'caption' must be str or list of str, got {type(caption).__name__}"
            )
    return entries


class VideoRetrievalDataset(Dataset):
    """Official ``VideoDataset`` with the "uniform" sampler: one item per video.

    ``text``: ``pre_caption(caption, max_words)`` of every caption in order; ``video``: clip
    names; ``video2txt[v]``: the text ids of video v; ``txt2video[t]``: the video of text t
    (the official file has one caption per video: both are the identity).
    ``__getitem__(v)`` -> (frames (num_frames, 3, S, S) float32, each ``transform``-ed, v).
    """

    def __init__(
        self,
        ann_file: PathLike,
        video_root: PathLike,
        transform: Callable[[Image.Image], torch.Tensor],
        num_frames: int = 8,
        max_words: int = 40,
        video_format: str = ".mp4",
    ):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.annotation = load_video_annotations(ann_file)
        self.video_root, self.transform = Path(video_root), transform
        self.num_frames, self.video_format = num_frames, video_format
        self.video = [ann["clip_name"] for ann in self.annotation]
        self.text: list[str] = []
        self.txt2video: dict[int, int] = {}
        self.video2txt: dict[int, list[int]] = {}
        for v, ann in enumerate(self.annotation):
            captions = ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]
            self.video2txt[v] = []
            for caption in captions:
                self.video2txt[v].append(len(self.text))
                self.txt2video[len(self.text)] = v
                self.text.append(pre_caption(caption, max_words))

    def __len__(self) -> int:
        return len(self.annotation)

    def video_path(self, index: int) -> str:
        return os.fspath(self.video_root / (self.video[index] + self.video_format))

    def __getitem__(self, index: int):
        frames = read_frames(self.video_path(index), self.num_frames)
        return torch.stack([self.transform(f) for f in frames]), index
