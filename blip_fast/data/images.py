"""Image files to RGB: reading, decoding, and the conversion of every PIL mode to 8-bit RGB.

``Image.convert("RGB")`` is right for 8-bit modes but not for deeper ones: it clips 16-bit and
32-bit integer samples at 255 (a 16-bit PNG comes out nearly all white) and float samples at 1
(a float TIFF in [0, 1] comes out black). ``to_rgb`` rescales those first. Alpha is dropped,
as the official BLIP loader (``Image.open(path).convert("RGB")``) drops it.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image

try:  # libjpeg-turbo without PIL's per-image overhead; its output is bit-identical to PIL's
    import simplejpeg
except ImportError:
    simplejpeg = None

__all__ = ["decode_image", "load_image", "to_rgb"]

# Full scale of each deep mode's samples: 16-bit PNG / TIFF decode to I;16* (and to I with
# older Pillow), whose white is 65535; float images (TIFF "F") hold [0, 1].
_FULL_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
               "I": 65535.0, "F": 1.0}  # fmt: skip


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, each mode scaled from its own full range (see module docstring)."""
    if img.mode == "RGB":
        return img
    full = _FULL_SCALE.get(img.mode)
    if full is None:
        return img.convert("RGB")
    samples = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
    grey = np.clip(np.rint(samples * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as RGB (decoded now, so a truncated file fails here, not later)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {os.fspath(path)}") from None
    except OSError as err:  # a directory, no permission, an I/O error
        raise OSError(f"cannot read image {os.fspath(path)}: {err}") from err
    return decode_image(data, os.fspath(path))


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes as RGB; ``where`` names the source in errors.

    JPEGs go through simplejpeg when it is installed (same libjpeg-turbo, same pixels as PIL,
    tests/data/test_loader.py checks); anything it rejects (CMYK, truncated, not a JPEG) is left
    to PIL, so PIL alone decides what decodes and what raises."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return Image.fromarray(
                simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)
            )
        except ValueError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated file fails here, inside the try
            return to_rgb(img)
    except OSError as err:  # PIL.UnidentifiedImageError and truncated data are OSErrors
        # PIL names the BytesIO by address: dropped, so reports are reproducible
        reason = re.sub(r" object at 0x[0-9a-fA-F]+>", " object>", str(err))
        raise OSError(f"cannot decode image {where}: {reason}") from err
