"""Image transforms: test = bicubic resize + normalise; train = BLIP's augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from blip_fast.data import transforms as T

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _image(w=97, h=61, seed=0, mode="RGB", lo=0, hi=256):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(lo, hi, (h, w, 3), dtype=np.uint8))
    return img.convert(mode)


@pytest.mark.parametrize("size", [16, 64])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_test_transform_is_bicubic_resize_and_normalise(size, mode):
    img = _image(mode=mode)
    out = T.test_transform(size)(img)
    ref = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    ref = ((ref - MEAN) / STD).transpose(2, 0, 1)
    assert out.dtype == torch.float32 and out.shape == (3, size, size)
    torch.testing.assert_close(out, torch.from_numpy(ref), atol=1e-6, rtol=0)


def test_train_transform_shape_and_finite():
    tf = T.train_transform(48)
    for seed in range(5):
        out = tf(_image(seed=seed))
        assert out.dtype == torch.float32 and out.shape == (3, 48, 48)
        assert torch.isfinite(out).all()


def test_train_transform_deterministic_with_generator():
    img = _image()
    outs = [
        T.train_transform(32, generator=torch.Generator().manual_seed(7))(img) for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])
    tf = T.train_transform(32, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(tf(img), tf(img))  # the generator advances between calls
    torch.manual_seed(3)  # without a generator the global RNG drives it
    a = T.train_transform(32)(img)
    torch.manual_seed(3)
    assert torch.equal(a, T.train_transform(32)(img))


@pytest.mark.parametrize("w, h", [(97, 61), (61, 97), (64, 64), (400, 20)])
def test_crop_params_within_bounds(w, h):
    crop = T.RandomResizedCrop(32, scale=(0.5, 1.0))
    gen = torch.Generator().manual_seed(0)
    img = _image(w, h)
    for _ in range(200):
        top, left, ch, cw = crop.get_params(img, gen)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        if w / h <= 4 / 3 and h / w <= 4 / 3:  # the draws always fit: scale and ratio hold
            # rounding w and h to ints moves the area by up to ~(w + h) / 2 pixels
            slack = (cw + ch) / 2 + 1
            assert 0.5 * w * h - slack <= cw * ch <= w * h
            assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05


def test_crop_fallback_is_clamped_centre_crop():
    """A 400x20 image never fits a ratio in [3/4, 4/3] at half its area: centre crop 27x20."""
    crop = T.RandomResizedCrop(16)
    assert crop.get_params(_image(400, 20), torch.Generator().manual_seed(0)) == (0, 186, 20, 27)
    assert crop.get_params(_image(20, 400), torch.Generator().manual_seed(0)) == (186, 0, 27, 20)


def test_crop_output_equals_crop_then_resize():
    img = _image()
    crop = T.RandomResizedCrop(24)
    top, left, h, w = crop.get_params(img, torch.Generator().manual_seed(5))
    ref = img.crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
    out = crop(img, torch.Generator().manual_seed(5))
    assert np.array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("name", T.BLIP_AUGS)
def test_each_augmentation_keeps_size_and_mode(name):
    img = _image(40, 30, lo=50, hi=200)  # low contrast, so AutoContrast has work to do
    out = T.RandomAugment(2, 5).apply(name, img, torch.Generator().manual_seed(0))
    assert out.size == img.size and out.mode == "RGB"
    changes = not np.array_equal(np.asarray(out), np.asarray(img))
    # at BLIP's magnitude 5 the enhance factor is exactly 1.0: Brightness/Sharpness are no-ops
    assert changes == (name not in ("Identity", "Brightness", "Sharpness"))


def test_translate_moves_by_pixels_and_fills_grey():
    img = _image(40, 30)
    gen = torch.Generator().manual_seed(0)
    out = np.asarray(T.RandomAugment(2, 5).apply("TranslateX", img, gen))
    src = np.asarray(img)
    left = np.array_equal(out[:, :-5], src[:, 5:])  # the sign is random: one of the two holds
    right = np.array_equal(out[:, 5:], src[:, :-5])
    assert left or right
    grey = out[:, -5:] if left else out[:, :5]
    assert (grey == 128).all()


def test_unknown_augmentation_rejected():
    with pytest.raises(ValueError, match="Solarise"):
        T.RandomAugment(2, 5, augs=("Identity", "Solarise"))
