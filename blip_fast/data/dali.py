"""NVIDIA DALI loader: JPEG decode on the GPU (``mixed`` decoder) and the uint8 transforms of
``blip_fast.data.uint8_transforms`` as DALI operators, fed by an external source in sampler
order.

    external_source (JPEG bytes, dataset index) -> decode [random crop] -> resize (bicubic)
      -> crop_mirror_normalize [flip] -> float32 (B, 3, S, S) on the GPU

The dataset index travels through the pipeline with each image; the item's other fields
(caption, image id) wait on the host in a FIFO and are joined to the batch by that index.
Same items, order and sharding as the CPU loader: both iterate the same ``sampler``.

Pixels vs PIL's bicubic resize (the official transform): DALI resamples in float and rounds
once; PIL rounds to uint8 after the horizontal pass. Resizing rows first, then columns, as PIL
does, brings DALI to a mean |difference| of ~0.01/255 with a few pixels at ringing edges up to
~6/255 (tests/data/test_dali.py). Train crops draw from DALI's RNG (``seed``), not torch's: the
same distribution as ``Uint8TrainTransform`` (area in (min_scale, 1), aspect ratio in
(3/4, 4/3), 10 attempts), different draws; DALI's fallback after 10 failed attempts is the
whole image where torchvision's is a centre crop clamped to the ratio range.

With ``device_id=None`` the pipeline runs DALI's CPU operators (decoders.image(device='cpu'));
tests run that graph on machines without a GPU.

``video_batches``: the frames of ``blip_fast.data.video``'s clips (official sampler) through
``decoders.video`` (NVDEC), resized and normalised as the test images.
"""

from __future__ import annotations

import collections
import math
import os

import numpy as np
import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler, default_collate

from blip_fast.data.corrupt_report import record_corrupt
from blip_fast.data.datasets import CorruptImage
from blip_fast.data.transforms import MEAN, STD
from blip_fast.data.uint8_transforms import Uint8TestTransform, Uint8TrainTransform
from blip_fast.data.video import count_frames, sample_frame_indices

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy, feed_ndarray

    IMPORT_ERROR = None
except ImportError as err:  # the [dali] extra is optional
    IMPORT_ERROR = f"nvidia.dali not importable ({err}); pip install 'blip-fast[dali]'"

__all__ = ["DaliLoader", "available", "image_pipeline", "video_batches", "video_pipeline"]


def available() -> bool:
    return IMPORT_ERROR is None


def _resize_like_pil(images, size: int):
    """(H, W, 3) -> (size, size, 3) bicubic: rows, rounded to uint8, then columns (PIL's order).
    A video's frames (F, H, W, 3) are resized each alike."""
    height = fn.cast(images.shape()[-3], dtype=types.FLOAT)
    images = fn.resize(images, resize_x=size, resize_y=height, interp_type=types.INTERP_CUBIC)
    return fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC)


def image_pipeline(
    source,
    *,
    image_size: int,
    train: bool,
    min_scale: float = 0.5,
    batch_size: int,
    device_id: int | None,
    num_threads: int = 4,
    seed: int = 0,
):
    """The DALI graph. ``source``: an iterable of batches ([uint8 JPEG bytes], [int64 (1,)
    dataset index]); each pass is an epoch (``cycle="raise"``: iter() again after
    StopIteration). Outputs: images float32 (B, 3, S, S) normalised with
    BLIP's MEAN / STD, on GPU ``device_id`` (``mixed`` decoder) or on the CPU when it is None;
    idx int64 (B, 1). ``train``: random resized crop + flip (p 0.5); else resize (S, S)."""
    if not available():
        raise ImportError(IMPORT_ERROR)
    decoder = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipeline():
        encoded, idx = fn.external_source(
            source=source,
            num_outputs=2,
            batch=True,
            cycle="raise",
            dtype=[types.UINT8, types.INT64],
        )
        if train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decoder,
                output_type=types.RGB,
                random_area=[min_scale, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
            )
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            mirror = 0
        images = fn.crop_mirror_normalize(
            _resize_like_pil(images, image_size),
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in MEAN],
            std=[255 * s for s in STD],
            mirror=mirror,
        )
        return images, idx

    return pipeline()


class _BatchSource:
    """One pass over ``sampler`` per epoch, as batches of (JPEG bytes, dataset index); each
    batch's (indices, fields) go to ``pending`` for the loader to join with DALI's output.
    Missing / unreadable files of a ``skip_corrupt`` dataset are recorded and left out."""

    def __init__(self, dataset, batch_size: int, sampler, drop_last: bool, corrupt_report):
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.drop_last, self.corrupt_report = drop_last, corrupt_report
        self.pending: collections.deque = collections.deque()

    def _read(self, index: int):
        path, fields = self.dataset.entry(index)
        try:
            with open(path, "rb") as f:
                return np.frombuffer(f.read(), dtype=np.uint8), fields
        except OSError as err:
            if not (getattr(self.dataset, "skip_corrupt", False) and self.corrupt_report):
                raise OSError(f"cannot read image {path}: {err}") from err
            return CorruptImage(index, path, str(err)), fields

    def __iter__(self):
        self.pending.clear()
        batch = []
        for index in self.sampler:
            data, fields = self._read(int(index))
            if isinstance(data, CorruptImage):
                record_corrupt(self.corrupt_report, [data])
                continue
            batch.append((int(index), data, fields))
            if len(batch) == self.batch_size:
                yield self._emit(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._emit(batch)

    def _emit(self, batch):
        self.pending.append(([i for i, _, _ in batch], [f for _, _, f in batch]))
        return [d for _, d, _ in batch], [np.array([i], dtype=np.int64) for i, _, _ in batch]


def _default_sampler(n: int, shuffle: bool, seed: int):
    """This rank's share when torch.distributed is initialised (DistributedSampler), else all."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistributedSampler(range(n), shuffle=shuffle, seed=seed)
    return RandomSampler(range(n)) if shuffle else SequentialSampler(range(n))


class DaliLoader:
    """Iterable of (images float32 (B, 3, S, S), *fields) batches like ``make_loader``'s, from
    a dataset with ``entry(index)`` (the datasets of ``blip_fast.data``) whose transform is a
    ``Uint8TestTransform`` or ``Uint8TrainTransform`` (read for the image size and crop scale).

    device_id: GPU to decode on; "auto" = torch's current CUDA device, or DALI's CPU operators
    when there is no GPU; None = CPU operators. ``sampler`` as for a DataLoader (call its
    ``set_epoch`` between epochs); by default this rank's DistributedSampler share.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        sampler=None,
        shuffle: bool = False,
        drop_last: bool = False,
        device_id: int | str | None = "auto",
        num_threads: int = 4,
        seed: int = 0,
        corrupt_report: str | os.PathLike | None = None,
    ):
        transform = getattr(dataset, "transform", None)
        if not isinstance(transform, (Uint8TestTransform, Uint8TrainTransform)):
            raise TypeError(
                f"DaliLoader needs a dataset whose transform is a Uint8TestTransform "
                f"or Uint8TrainTransform, got {type(transform).__name__}"
            )
        if device_id == "auto":
            device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.sampler = (
            sampler if sampler is not None else _default_sampler(len(dataset), shuffle, seed)
        )
        self.batch_size, self.drop_last = batch_size, drop_last
        self.source = _BatchSource(dataset, batch_size, self.sampler, drop_last, corrupt_report)
        train = isinstance(transform, Uint8TrainTransform)
        self.pipeline = image_pipeline(
            self.source,
            image_size=transform.image_size,
            train=train,
            min_scale=getattr(transform, "min_scale", 0.5),
            batch_size=batch_size,
            device_id=device_id,
            num_threads=num_threads,
            seed=seed,
        )
        self._iterator = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        # Each epoch starts the source here, not when the last one ends (auto_reset would
        # prefetch it then): the sampler is read after the caller's set_epoch.
        if self._iterator is None:
            self.pipeline.build()
            self._iterator = DALIGenericIterator(
                self.pipeline,
                ["images", "idx"],
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=False,
                prepare_first_batch=False,
            )
        else:
            self._iterator.reset()
        for out in self._iterator:
            idx = out[0]["idx"].view(-1).tolist()
            indices, fields = self.source.pending.popleft()
            if idx != indices:  # a FIFO out of step would pair images with the wrong captions
                raise RuntimeError(f"DALI batch indices {idx[:8]} != queued {indices[:8]}")
            yield (out[0]["images"], *default_collate(fields))


def video_pipeline(*, image_size: int, batch_size: int, device_id: int | None, num_threads=4):
    """The DALI graph of a video clip's frames, fed per batch through ``feed_input``:
    "encoded" (uint8 file bytes) and "frames" (int32 (n,) frame indices) -> float32
    (n, 3, S, S) per clip, resized and normalised as ``image_pipeline``'s test images.
    Decoded on GPU ``device_id`` (NVDEC: MPEG-4, H.264, HEVC, AV1, VP8/9, MJPEG) or, when it is
    None, on the CPU, whose decoder reads VP8, VP9 and MJPEG only."""
    if not available():
        raise ImportError(IMPORT_ERROR)
    decoder = "cpu" if device_id is None else "mixed"

    # fed and run one batch at a time: a deeper prefetch queue asks for batches not yet fed
    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1
    )
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        frames = fn.external_source(name="frames", dtype=types.INT32)
        video = fn.decoders.video(encoded, device=decoder, frames=frames)  # (n, H, W, 3)
        return fn.crop_mirror_normalize(
            _resize_like_pil(video, image_size),
            dtype=types.FLOAT,
            output_layout="FCHW",
            mean=[255 * m for m in MEAN],
            std=[255 * s for s in STD],
        )

    return pipeline()


def video_batches(dataset, batch_size: int, *, device_id: int | str | None = "auto", num_threads=4):
    """(frames float32 (B, n, 3, S, S), index (B,)) batches of a ``VideoRetrievalDataset`` in
    order, as its DataLoader gives them: the same frames (official sampler over the packet
    count of ``count_frames``) decoded by DALI, on the GPU by default. ``device_id`` as
    ``DaliLoader``'s. Pixels differ from PyAV + PIL by the decoders' YUV -> RGB conversion
    (a grey level or two on average, more at sharp colour edges)."""
    if device_id == "auto":
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    pipe = video_pipeline(
        image_size=dataset.transform.image_size,
        batch_size=batch_size,
        device_id=device_id,
        num_threads=num_threads,
    )
    pipe.build()
    out_device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    for start in range(0, len(dataset), batch_size):
        index = range(start, min(start + batch_size, len(dataset)))
        paths = [dataset.video_path(i) for i in index]
        frames = [sample_frame_indices(count_frames(p), dataset.num_frames) for p in paths]
        pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in paths])
        pipe.feed_input("frames", [np.array(f, dtype=np.int32) for f in frames])
        (video,) = pipe.run()
        video = video.as_tensor()
        batch = torch.empty(video.shape(), dtype=torch.float32, device=out_device)
        stream = None if device_id is None else torch.cuda.current_stream(out_device)
        feed_ndarray(video, batch, cuda_stream=stream)
        yield batch, torch.tensor(index)
