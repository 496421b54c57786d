"""`eval.postprocess` vs a NumPy reference of RegionCLIP's `fast_rcnn_inference_single_image`.

The reference is written from the spec (§6.1 steps 4-7), one image at a time, with dynamic
shapes: sqrt(p * o) fusion with NaN for negative RPN logits and the `isfinite` row filter, the
strict score threshold over the K foreground columns, per-class greedy NMS (torchvision overlap
`inter / (a1 + a2 - inter)`, suppress when > thr) or detectron2's class-wise Gaussian soft-NMS
(argmax, decay exp(-IoU² / sigma), prune <= 0.001, decayed scores reported), then the top k.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from regionclip_jax.eval.postprocess import (
    detections_from_scores,
    detections_numpy,
    rescale_to_original,
)

K = 4  # foreground classes


def _clip(b, hw):
    h, w = hw
    return np.stack(
        [
            np.clip(b[:, 0], 0, w),
            np.clip(b[:, 1], 0, h),
            np.clip(b[:, 2], 0, w),
            np.clip(b[:, 3], 0, h),
        ],
        1,
    ).astype(np.float32)


def _inter(a, b):
    w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    return (w * h).astype(np.float32)


def _area(b):
    return ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).astype(np.float32)


def ref_nms(boxes, scores, classes, thr):
    """torchvision batched_nms: greedy by decreasing score within each class."""
    order = np.argsort(-scores, kind="stable")
    keep, dead = [], np.zeros(len(scores), bool)
    for i in order:
        if dead[i]:
            continue
        keep.append(i)
        inter = _inter(boxes[i], boxes)
        with np.errstate(invalid="ignore"):
            iou = inter / (_area(boxes[i]) + _area(boxes) - inter)
        dead |= (iou > thr) & (classes == classes[i])
    return np.array(keep, np.int64), scores[keep]


def ref_soft_nms(boxes, scores, classes, sigma, prune):
    """detectron2 `batched_soft_nms(method='gaussian')` (class separation by masking)."""
    idx = np.arange(len(scores))
    s = scores.astype(np.float32).copy()
    b, c = boxes, classes
    out_i, out_s = [], []
    while len(s):
        top = int(np.argmax(s))
        out_i.append(idx[top])
        out_s.append(s[top])
        inter = _inter(b[top], b)
        union = _area(b[top]) + _area(b) - inter
        iou = np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0).astype(np.float32)
        iou = np.where(c == c[top], iou, 0).astype(np.float32)
        s = (s * np.exp(-(iou * iou) / np.float32(sigma))).astype(np.float32)
        keep = s > prune
        keep[top] = False
        s, b, c, idx = s[keep], b[keep], c[keep], idx[keep]
    return np.array(out_i, np.int64), np.array(out_s, np.float32)


def ref_single_image(probs, boxes, valid, hw, obj, *, thresh, nms_thr, soft, topk):
    """Returns (boxes [n, 4], scores [n], classes [n]) and the sorted passing scores."""
    s = probs.astype(np.float32)
    if obj is not None:
        with np.errstate(invalid="ignore"):
            s = np.sqrt(s * obj.astype(np.float32)[:, None])
    rows = valid & np.isfinite(s).all(1) & np.isfinite(boxes).all(1)
    s, b = s[rows][:, :-1], _clip(boxes[rows], hw)
    ii, kk = np.nonzero(s > thresh)
    cb, cs, cc = b[ii], s[ii, kk], kk
    if soft:
        keep, ks = ref_soft_nms(cb, cs, cc, 0.5, 0.001)
    else:
        keep, ks = ref_nms(cb, cs, cc, nms_thr)
    keep, ks = keep[:topk], ks[:topk]
    return (cb[keep], ks, cc[keep]), np.sort(cs)[::-1]


def make_inputs(seed, b=3, r=40):
    rng = np.random.RandomState(seed)
    logits = rng.normal(size=(b, r, K + 1)) * 2.5
    # Clustered boxes, so that NMS has overlaps to resolve; some cross the image border.
    centres = rng.uniform(5, 60, size=(b, 6, 2))[:, rng.randint(0, 6, r)]
    centres = centres + rng.normal(scale=2.0, size=(b, r, 2))
    half = rng.uniform(4, 14, size=(b, r, 2))
    boxes = np.concatenate([centres - half, centres + half], -1).astype(np.float32)
    valid = rng.rand(b, r) > 0.15
    valid[2] = False  # an image without proposals
    obj = rng.normal(loc=0.5, scale=1.5, size=(b, r)).astype(np.float32)  # some < 0, some > 1
    # Rows the `isfinite` filter must drop although their probabilities pass the threshold:
    # a non-finite box, and an infinite logit (sqrt(p * inf) = inf).
    valid[:2, :2] = True
    probs_hi = np.zeros(K + 1)
    probs_hi[:2] = 0.5
    logits[:2, :2] = np.log(probs_hi + 1e-30)
    boxes[0, 0, 2] = np.nan
    obj[:2, 1] = np.inf
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    hw = np.array([[60, 64], [64, 50], [64, 64]], np.int32)
    return probs.astype(np.float32), boxes, valid, hw, obj


def run_ours(probs, boxes, valid, hw, obj, **kw):
    out = detections_from_scores(
        jnp.asarray(probs),
        jnp.asarray(boxes),
        jnp.asarray(valid),
        jnp.asarray(hw),
        objectness=None if obj is None else jnp.asarray(obj),
        **kw,
    )
    return {k: np.asarray(v) for k, v in out.items()}


def assert_same(ours, i, ref, n=None):
    rb, rs, rc = ref
    n = len(rs) if n is None else n
    got = ours["valid"][i]
    if n == len(rs):
        assert got.sum() == n, (got.sum(), n)
    assert got[:n].all() and not got[got.sum() :].any()
    np.testing.assert_array_equal(ours["classes"][i][:n], rc[:n])
    np.testing.assert_allclose(ours["scores"][i][:n], rs[:n], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours["boxes"][i][:n], rb[:n], rtol=1e-6, atol=1e-5)
    assert np.all(np.diff(ours["scores"][i][:n]) <= 0)  # ordered by score
    assert (ours["classes"][i][got.sum() :] == -1).all()


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("fuse", [False, True])
def test_matches_reference(soft, fuse):
    probs, boxes, valid, hw, obj = make_inputs(0)
    obj = obj if fuse else None
    thresh, topk = 0.05, 12
    ours = run_ours(
        probs,
        boxes,
        valid,
        hw,
        obj,
        score_thresh=thresh,
        nms_thresh=0.5,
        soft_nms=soft,
        topk=topk,
        max_candidates=probs.shape[1] * K,
    )
    counts = []
    for i in range(len(probs)):
        o = None if obj is None else obj[i]
        ref, _ = ref_single_image(
            probs[i], boxes[i], valid[i], hw[i], o, thresh=thresh, nms_thr=0.5, soft=soft, topk=topk
        )
        assert_same(ours, i, ref)
        counts.append(len(ref[1]))
    assert counts[0] == topk and counts[2] == 0  # top-k binds; the empty image gives nothing
    if fuse:
        # NaN rows (negative logits) were present and valid: they must have been dropped.
        assert ((obj[:2] < 0) & valid[:2]).any()
        assert ours["scores"][ours["valid"]].max() <= np.sqrt(obj[np.isfinite(obj)].max())


def test_fewer_candidates_than_topk():
    probs, boxes, valid, hw, obj = make_inputs(1)
    kw = dict(score_thresh=0.6, nms_thresh=0.5, topk=30, max_candidates=64)
    for soft in (False, True):
        ours = run_ours(probs, boxes, valid, hw, obj, soft_nms=soft, **kw)
        for i in range(len(probs)):
            ref, passing = ref_single_image(
                probs[i],
                boxes[i],
                valid[i],
                hw[i],
                obj[i],
                thresh=0.6,
                nms_thr=0.5,
                soft=soft,
                topk=30,
            )
            assert len(passing) < 30
            assert_same(ours, i, ref)


@pytest.mark.parametrize("soft", [False, True])
def test_candidate_budget_approximation(soft):
    """More pairs pass than `max_candidates`: outputs agree down to the best dropped score."""
    probs, boxes, valid, hw, _ = make_inputs(2, r=60)
    budget = 20
    ours = run_ours(
        probs,
        boxes,
        valid,
        hw,
        None,
        score_thresh=0.01,
        nms_thresh=0.5,
        soft_nms=soft,
        topk=40,
        max_candidates=budget,
    )
    checked = 0
    for i in range(2):
        ref, passing = ref_single_image(
            probs[i],
            boxes[i],
            valid[i],
            hw[i],
            None,
            thresh=0.01,
            nms_thr=0.5,
            soft=soft,
            topk=40,
        )
        assert len(passing) > budget  # the approximation is active
        s_drop = passing[budget]
        n = int((ref[1] > s_drop).sum())
        assert n >= 3
        assert_same(ours, i, ref, n=n)
        # Never more detections than candidates were kept.
        assert ours["valid"][i].sum() <= budget
        checked += n
    assert checked > 0


def test_rescale_to_original():
    rng = np.random.RandomState(3)
    boxes = rng.uniform(-5, 90, size=(2, 5, 4)).astype(np.float32)
    scale = np.array([[0.5, 0.4], [2.0, 2.0]], np.float32)
    orig = np.array([[150, 200], [40, 30]], np.int32)
    got = np.asarray(rescale_to_original(boxes, scale, orig))
    for i in range(2):
        want = boxes[i] / np.array([scale[i, 1], scale[i, 0]] * 2, np.float32)
        np.testing.assert_allclose(got[i], _clip(want, orig[i]), rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_host_and_batched_paths_select_the_same_detections(seed):
    """The recognizer's host path (`detections_numpy`) and evaluation's jitted path
    (`detections_from_scores`, every pair a candidate) are one selection: on inputs without exact
    score ties or degenerate boxes they return the same detections in the same order."""
    rng = np.random.default_rng(seed)
    r, k, h, w = 40, 6, 120, 160
    logits = rng.normal(0.0, 2.0, (r, k + 1))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    xy = rng.uniform([-10, -10], [w, h], (r, 2))
    wh = rng.uniform(8, 70, (r, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)  # some cross the image edge
    nb, ns, nl = detections_numpy(
        probs[:, :k], boxes, (h, w), score_thresh=0.05, nms_thresh=0.5, max_detections=50
    )
    out = detections_from_scores(
        jnp.asarray(probs[None], jnp.float32),
        jnp.asarray(boxes[None]),
        jnp.ones((1, r), bool),
        jnp.asarray([[h, w]]),
        score_thresh=0.05,
        nms_thresh=0.5,
        topk=50,
        max_candidates=r * k,
    )
    ok = np.asarray(out["valid"][0])
    assert 0 < len(ns) == ok.sum()
    np.testing.assert_array_equal(np.asarray(out["classes"][0])[ok], nl)
    np.testing.assert_allclose(np.asarray(out["scores"][0])[ok], ns, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["boxes"][0])[ok], nb, rtol=1e-6, atol=1e-4)
