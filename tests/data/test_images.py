"""Every PIL mode a decoder can hand back, converted to 8-bit RGB against hand-computed pixels."""

import io

import numpy as np
import pytest
from PIL import Image

from blip_fast.data.images import decode_image, load_image, to_rgb

# (mode, how to make a 1x2 image of it, the RGB pixels expected). Deep modes scale from their
# full range (65535 for 16-bit samples, 1.0 for float); alpha is dropped as official BLIP does.
CASES = [
    ("1", lambda: Image.frombytes("1", (2, 1), bytes([0b10000000])), [[255] * 3, [0] * 3]),
    ("L", lambda: Image.fromarray(np.array([[7, 200]], np.uint8), "L"), [[7] * 3, [200] * 3]),
    ("LA", lambda: Image.fromarray(np.array([[[9, 0], [90, 255]]], np.uint8), "LA"),
     [[9] * 3, [90] * 3]),
    ("P", lambda: _palette("P"), [[10, 20, 30], [40, 50, 60]]),
    ("PA", lambda: _palette("PA"), [[10, 20, 30], [40, 50, 60]]),
    ("I;16", lambda: Image.fromarray(np.array([[128 * 257, 65535]], np.uint16)),
     [[128] * 3, [255] * 3]),
    ("I", lambda: Image.fromarray(np.array([[64 * 257, 70000]], np.int32), "I"),
     [[64] * 3, [255] * 3]),
    ("F", lambda: Image.fromarray(np.array([[0.5, -1.0]], np.float32), "F"),
     [[128] * 3, [0] * 3]),
    ("RGBA", lambda: Image.fromarray(np.array([[[1, 2, 3, 0], [4, 5, 6, 255]]], np.uint8), "RGBA"),
     [[1, 2, 3], [4, 5, 6]]),
    ("CMYK", lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0]]], np.uint8), "CMYK"),
     [[255, 255, 255], [0, 255, 255]]),
    ("YCbCr", lambda: Image.fromarray(np.array([[[255, 128, 128], [0, 128, 128]]], np.uint8),
                                      "YCbCr"), [[255] * 3, [0] * 3]),
]  # fmt: skip


def _palette(mode):
    img = Image.new(mode, (2, 1))
    img.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    img.putpixel((1, 0), 1 if mode == "P" else (1, 255))
    return img


@pytest.mark.parametrize("mode,make,expected", CASES, ids=[c[0] for c in CASES])
def test_to_rgb_scales_each_mode_from_its_full_range(mode, make, expected):
    img = make()
    assert img.mode == mode
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (2, 1)
    assert np.asarray(out).tolist() == [expected]


def test_sixteen_bit_png_is_not_white(tmp_path):
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    grey = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert np.array_equal(grey.ravel(), np.arange(256))


def test_float_tiff_decodes_through_the_same_scaling():
    buf = io.BytesIO()
    Image.fromarray(np.array([[0.25, 1.0]], np.float32), "F").save(buf, format="TIFF")
    assert np.asarray(decode_image(buf.getvalue(), "mem.tiff"))[0, :, 0].tolist() == [64, 255]
