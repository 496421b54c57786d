"""Anchors against a NumPy reference of detectron2's `DefaultAnchorGenerator` formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regionclip_jax.ops import AnchorGenerator


def _reference(hw, stride, sizes, ratios, offset):
    """detectron2: cell anchors (size-major, then ratio), grid shifts row-major, then cells."""
    cells = []
    for size in sizes:
        for r in ratios:
            w = math.sqrt(size * size / r)
            h = r * w
            cells.append((-w / 2, -h / 2, w / 2, h / 2))
    cells = np.array(cells, np.float32)
    out = []
    for y in range(hw[0]):
        for x in range(hw[1]):
            sx, sy = (
                np.float32(offset * stride + x * stride),
                np.float32(offset * stride + y * stride),
            )
            for c in cells:
                out.append(np.array([sx, sy, sx, sy], np.float32) + c)
    return np.array(out, np.float32)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_c4_anchors(offset):
    gen = AnchorGenerator(
        sizes=((32, 64, 128, 256, 512),),
        aspect_ratios=((0.5, 1.0, 2.0),),
        strides=(16,),
        offset=offset,
    )
    (anchors,) = gen([(5, 7)])
    assert gen.num_anchors == [15]
    want = _reference((5, 7), 16, (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), offset)
    np.testing.assert_array_equal(anchors, want)
    # Every anchor has area size^2 and h / w = ratio.
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    np.testing.assert_allclose(
        (w * h)[:15], np.repeat(np.array([32, 64, 128, 256, 512.0]) ** 2, 3), rtol=1e-5
    )


def test_fpn_anchors_one_size_per_level():
    strides = (4, 8, 16, 32, 64)
    sizes = ((32,), (64,), (128,), (256,), (512,))
    gen = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),), strides=strides)
    hws = [(256 // s, 384 // s) for s in strides]  # a 256 x 384 canvas
    levels = gen(hws)
    assert gen.num_anchors == [3] * 5
    for hw, s, sz, a in zip(hws, strides, sizes, levels):
        np.testing.assert_array_equal(a, _reference(hw, s, sz, (0.5, 1.0, 2.0), 0.0))
    with pytest.raises(ValueError):
        gen(hws[:2])
