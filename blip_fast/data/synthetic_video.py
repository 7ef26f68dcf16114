"""Synthetic video clips in official BLIP's MSRVTT test format, for tests and smoke evaluations
of text-to-video retrieval without downloads.

Each clip shows one scene of ``blip_fast.data.synthetic`` (2-3 coloured shapes on a plain or
two-tone background) panning horizontally: the shapes slide together by up to an eighth of the
frame to the left or right, the background staying put (it is uniform along each row, so the
columns shifted in repeat the edge). The left-to-right order the captions describe never
changes. Clips are MPEG-4 Part 2 in .mp4 (the encoder built into PyAV's ffmpeg); no scene occurs
twice, and everything derives from ``seed``.

    python -m blip_fast.data.synthetic_video ROOT [--n-videos 20] [--num-frames 16] [--size 96]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from blip_fast.data.synthetic import Scene, _random_scene, render, scene_captions
from blip_fast.data.video import _import_av

__all__ = ["make_synthetic_videos", "pan_frames", "write_video"]

FPS = 8
# pixel format of each codec: 4:2:0 chroma (MJPEG's is full range, "yuvj")
PIXEL_FORMATS = {"mpeg4": "yuv420p", "mjpeg": "yuvj420p"}


def write_video(
    path: str | os.PathLike, frames: list[Image.Image], fps: int = FPS, codec: str = "mpeg4"
) -> None:
    """Encode RGB ``frames`` (one size, even sides: 4:2:0 halves the chroma) with ``codec``,
    "mpeg4" (MPEG-4 Part 2) or "mjpeg" (which DALI's CPU video decoder reads)."""
    if codec not in PIXEL_FORMATS:
        raise ValueError(f"codec must be one of {sorted(PIXEL_FORMATS)}, got {codec!r}")
    av = _import_av()
    width, height = frames[0].size
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMATS[codec]
        stream.bit_rate = 4_000_000  # a few kB per frame at 96 px: edges stay sharp
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def pan_frames(scene: Scene, size: int, num_frames: int, rng: np.random.Generator) -> list:
    """``num_frames`` frames of ``scene`` sliding horizontally (module docstring); ``rng``
    places the shapes, jitters the colours and picks the direction."""
    image = np.asarray(render(scene, size, rng))
    travel = size // 8
    padded = np.pad(image, ((0, 0), (travel, travel), (0, 0)), mode="edge")
    direction = 1 if rng.random() < 0.5 else -1
    frames = []
    for t in range(num_frames):
        shift = round(direction * travel * (2 * t / max(num_frames - 1, 1) - 1))
        left = travel - shift  # content moves right by ``shift`` pixels
        frames.append(Image.fromarray(padded[:, left : left + size]))
    return frames


def make_synthetic_videos(
    root: str | os.PathLike,
    n_videos: int = 20,
    num_frames: int = 16,
    size: int = 96,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``n_videos`` clips of ``num_frames`` frames (``size`` x ``size``, even) under
    ``root`` and return their paths: ``video_root`` holds ``video<i>.mp4``; ``test`` is
    ``msrvtt_test.jsonl``, one ``{"clip_name": "video<i>", "caption": str}`` line per clip (the
    official format: one caption per video)."""
    if size % 2:
        raise ValueError(f"size must be even (yuv420p), got {size}")
    if n_videos < 1 or num_frames < 1:
        raise ValueError(f"need n_videos >= 1 and num_frames >= 1, got {n_videos}, {num_frames}")
    root = Path(root)
    video_root = root / "videos"
    video_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seen: set[Scene] = set()
    lines = []
    for i in range(n_videos):
        scene = _random_scene(rng)
        while scene in seen:
            scene = _random_scene(rng)
        seen.add(scene)
        write_video(video_root / f"video{i}.mp4", pan_frames(scene, size, num_frames, rng))
        caption = scene_captions(scene, rng, 1)[0]
        lines.append(json.dumps({"clip_name": f"video{i}", "caption": caption}))
    test = root / "msrvtt_test.jsonl"
    test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "video_root": video_root, "test": test}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--n-videos", type=int, default=20)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = make_synthetic_videos(a.root, a.n_videos, a.num_frames, a.size, a.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))


if __name__ == "__main__":
    main()
