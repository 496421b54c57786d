"""Box utilities against torchvision's box ops and NumPy references of detectron2's formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regionclip_jax.ops import boxes as B


def _random_boxes(rng, n, lo=-20.0, hi=200.0, degenerate=0):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(0.5, 80.0, (n, 2))
    wh[:degenerate] *= rng.uniform(-1.0, 0.0, (degenerate, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _np_iou(a, b):
    """detectron2 `pairwise_iou`, written out in NumPy (float64)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area_a[:, None] + area_b[None, :] - inter)
    return np.where(inter > 0, iou, 0.0)


@pytest.mark.torch_ref
def test_area_and_iou_match_torchvision():
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 50), _random_boxes(rng, 40)
    a[:3] = b[:3]  # identical pairs
    got = np.asarray(jax.jit(B.pairwise_iou)(a, b))
    want = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(B.box_area(a)), torchvision.ops.box_area(torch.from_numpy(a)).numpy(), rtol=1e-6
    )


def test_iou_degenerate_boxes_and_batching():
    rng = np.random.default_rng(1)
    a, b = _random_boxes(rng, 30, degenerate=10), _random_boxes(rng, 20, degenerate=5)
    a[10] = (5, 5, 5, 5)  # empty box: IoU 0 (never NaN), even with itself
    b[0] = a[10]
    got = np.asarray(B.pairwise_iou(a, b))
    np.testing.assert_allclose(got, _np_iou(a, b), rtol=1e-5, atol=1e-7)
    assert np.isfinite(got).all()
    batched = np.asarray(B.pairwise_iou(np.stack([a, a[::-1]]), np.stack([b, b])))
    np.testing.assert_allclose(batched[1], _np_iou(a[::-1], b), rtol=1e-5, atol=1e-7)


def test_clip_nonempty_and_conversions():
    rng = np.random.default_rng(2)
    bx = _random_boxes(rng, 3 * 8).reshape(3, 8, 4)
    hw = np.array([[100, 150], [60, 200], [120, 90]], np.float32)
    got = np.asarray(B.clip_boxes(bx, hw))
    want = bx.copy()
    want[..., 0::2] = np.clip(bx[..., 0::2], 0, hw[:, None, 1:2])
    want[..., 1::2] = np.clip(bx[..., 1::2], 0, hw[:, None, 0:1])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(B.clip_boxes(bx[0], (100, 150))), want[0])
    ne = np.asarray(B.nonempty(got, 1.0))
    np.testing.assert_array_equal(
        ne, ((want[..., 2] - want[..., 0]) > 1.0) & ((want[..., 3] - want[..., 1]) > 1.0)
    )
    x = bx[0]
    xywh = np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], 1)
    cxcywh = np.concatenate([(x[:, :2] + x[:, 2:]) / 2, x[:, 2:] - x[:, :2]], 1)
    np.testing.assert_allclose(np.asarray(B.xyxy_to_xywh(x)), xywh, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(B.xyxy_to_cxcywh(x)), cxcywh, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(B.xywh_to_xyxy(xywh)), x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(B.cxcywh_to_xyxy(cxcywh)), x, rtol=1e-5, atol=1e-4)


def _np_get_deltas(src, tgt, weights):
    """detectron2 `Box2BoxTransform.get_deltas` in NumPy."""
    wx, wy, ww, wh = weights
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    scx, scy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    tcx, tcy = tgt[:, 0] + 0.5 * tw, tgt[:, 1] + 0.5 * th
    return np.stack(
        [wx * (tcx - scx) / sw, wy * (tcy - scy) / sh, ww * np.log(tw / sw), wh * np.log(th / sh)],
        1,
    )


def _np_apply_deltas(deltas, boxes, weights, clamp):
    """detectron2 `Box2BoxTransform.apply_deltas` in NumPy (deltas `[N, K*4]`)."""
    wx, wy, ww, wh = weights
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = np.minimum(deltas[:, 2::4] / ww, clamp)
    dh = np.minimum(deltas[:, 3::4] / wh, clamp)
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = np.exp(dw) * w[:, None], np.exp(dh) * h[:, None]
    out = np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], -1)
    return out.reshape(deltas.shape)


def test_box2box_transform_matches_detectron2_formulas():
    rng = np.random.default_rng(3)
    src = _random_boxes(rng, 64).astype(np.float64)
    tgt = _random_boxes(rng, 64).astype(np.float64)
    weights = (10.0, 10.0, 5.0, 5.0)
    t = B.Box2BoxTransform(weights)
    assert t.scale_clamp == pytest.approx(math.log(1000.0 / 16))
    deltas = np.asarray(t.get_deltas(jnp.asarray(src, jnp.float32), jnp.asarray(tgt, jnp.float32)))
    np.testing.assert_allclose(deltas, _np_get_deltas(src, tgt, weights), rtol=1e-4, atol=1e-4)
    # Round trip, and class-specific deltas [N, K*4] with some beyond the scale clamp.
    back = np.asarray(t.apply_deltas(jnp.asarray(deltas), jnp.asarray(src, jnp.float32)))
    inside = (np.abs(deltas[:, 2:] / 5.0) < math.log(1000.0 / 16)).all(1)  # not clamped
    assert inside.sum() > 50
    np.testing.assert_allclose(back[inside], tgt[inside], rtol=1e-4, atol=1e-2)
    d3 = rng.normal(0, 3, (64, 12))
    d3[:5, 2] = 40.0  # exp would overflow without the clamp
    got = np.asarray(t.apply_deltas(jnp.asarray(d3, jnp.float32), jnp.asarray(src, jnp.float32)))
    want = _np_apply_deltas(d3, src, weights, math.log(1000.0 / 16))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)
    assert np.isfinite(got).all()
