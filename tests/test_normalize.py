"""models/normalize.py: `clip_normalize` of padded canvases against a NumPy reference written from
the definition ((x / 255 - mean) / std with OpenAI CLIP's constants, typed here; zero outside each
image's (h, w)), for uint8 and float inputs and two images of different sizes on one canvas."""

from __future__ import annotations

import numpy as np
import pytest

from regionclip_jax.models.normalize import CLIP_MEAN, CLIP_STD, clip_normalize

# OpenAI CLIP's preprocessing constants (clip/clip.py `_transform`), typed from the source.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

CANVAS = (12, 16)
SIZES = [(12, 9), (7, 16)]  # (h, w): one narrower than the canvas, one shorter


def _reference(images: np.ndarray, image_hw) -> np.ndarray:
    """Pixel by pixel in float64: (x / 255 - mean[c]) / std[c] inside [:h, :w], 0 elsewhere."""
    b, hc, wc, _ = images.shape
    out = np.zeros((b, hc, wc, 3), np.float64)
    for i, (h, w) in enumerate(image_hw):
        for c in range(3):
            out[i, :h, :w, c] = (images[i, :h, :w, c].astype(np.float64) / 255.0 - MEAN[c]) / STD[c]
    return out


def _canvases(dtype) -> np.ndarray:
    """Two images on one canvas; the padding holds junk (non-zero) that must come out as 0."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (len(SIZES), *CANVAS, 3))
    if dtype == np.uint8:
        return x.astype(np.uint8)
    return (x + rng.uniform(-0.5, 0.5, x.shape)).clip(0, 255).astype(dtype)


def test_constants_are_openai_clips():
    np.testing.assert_allclose(CLIP_MEAN, MEAN, rtol=1e-7)
    np.testing.assert_allclose(CLIP_STD, STD, rtol=1e-7)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_against_the_definition(dtype):
    images = _canvases(dtype)
    hw = np.asarray(SIZES, np.int32)
    got = np.asarray(clip_normalize(images, hw))
    assert got.shape == images.shape and got.dtype == np.float32
    want = _reference(images, SIZES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The padding is exactly zero, and each image's region is not (the junk really was there).
    for i, (h, w) in enumerate(SIZES):
        assert np.all(got[i, h:] == 0) and np.all(got[i, :, w:] == 0)
        assert np.any(images[i, h:]) or np.any(images[i, :, w:])
        assert np.count_nonzero(got[i, :h, :w]) > 0.9 * h * w


def test_known_pixel_values():
    # Black, white and mid-grey pixels: hand-computed values of the definition.
    images = np.zeros((1, 1, 3, 3), np.uint8)
    images[0, 0, 1] = 255
    images[0, 0, 2] = 128
    got = np.asarray(clip_normalize(images, np.asarray([[1, 3]], np.int32)))[0, 0]
    np.testing.assert_allclose(got[0], [-1.7922625, -1.7520971, -1.4802197], rtol=1e-5)
    np.testing.assert_allclose(got[1], [1.9303363, 2.0748838, 2.1458970], rtol=1e-5)
    np.testing.assert_allclose(
        got[2], [(128 / 255 - m) / s for m, s in zip(MEAN, STD, strict=True)], rtol=1e-5
    )


def test_full_and_empty_images():
    images = _canvases(np.uint8)
    hw = np.asarray([CANVAS, (0, 0)], np.int32)  # a full canvas, and an empty slot
    got = np.asarray(clip_normalize(images, hw))
    np.testing.assert_allclose(got[0], _reference(images, [CANVAS])[0], rtol=1e-5, atol=1e-5)
    assert np.all(got[1] == 0)
