"""NMS against torchvision (`nms`, `batched_nms`), soft-NMS against a NumPy reference written from
spec §6, RPN proposal selection against a reference built from detectron2's steps."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from regionclip_jax import ops as N

_nms = jax.jit(N.nms, static_argnames=("max_output_size", "tile_size"))
_batched = jax.jit(N.batched_nms, static_argnames=("max_output_size", "tile_size"))


def _boxes_with_ties(rng, n):
    """Random boxes with exact duplicates, tied scores and heavy overlap."""
    xy = rng.uniform(0, 120, (n, 2))
    wh = rng.uniform(2, 50, (n, 2))
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    s = rng.random(n).astype(np.float32)
    m = n // 5
    src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
    b[dst] = b[src]  # duplicates
    s[dst[: m // 2]] = s[src[: m // 2]]  # duplicate boxes with equal scores
    s[rng.integers(0, n, m)] = 0.5  # ties among unrelated boxes
    return b, s


@pytest.mark.torch_ref
def test_nms_and_batched_nms_keep_what_torchvision_keeps():
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    n = 400  # 1,600 numbers: torchvision's batched_nms takes its coordinate-offset path
    for trial, thr in enumerate((0.3, 0.5, 0.7)):
        b, s = _boxes_with_ties(rng, n)
        want = torchvision.ops.nms(torch.from_numpy(b), torch.from_numpy(s), thr).numpy()
        idx, ok = _nms(b, s, iou_threshold=thr, max_output_size=n, tile_size=64)
        np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want)
        # Padded output: exactly `len(want)` valid slots, -1 elsewhere; a short budget truncates.
        assert (np.asarray(idx)[~np.asarray(ok)] == -1).all()
        idx, ok = _nms(b, s, iou_threshold=thr, max_output_size=17, tile_size=64)
        np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want[:17])

        cls = rng.integers(0, 4, n)
        want = torchvision.ops.batched_nms(
            torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(cls), thr
        ).numpy()
        idx, ok = _batched(b, s, cls, iou_threshold=thr, max_output_size=n, tile_size=64)
        np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want, err_msg=str(trial))


@pytest.mark.torch_ref
def test_nms_ignores_invalid_scores_and_masked_entries():
    import torch
    import torchvision

    rng = np.random.default_rng(1)
    b, s = _boxes_with_ties(rng, 120)
    s[:10] = -np.inf
    s[10:20] = np.nan
    mask = np.ones(120, bool)
    mask[20:30] = False
    idx, ok = _nms(b, s, iou_threshold=0.5, max_output_size=120)
    idx2, ok2 = jax.jit(functools.partial(N.nms, iou_threshold=0.5, max_output_size=120))(
        b, s, valid=mask
    )
    keep = np.isfinite(s)
    sub = np.flatnonzero(keep)
    want = sub[
        torchvision.ops.nms(torch.from_numpy(b[keep]), torch.from_numpy(s[keep]), 0.5).numpy()
    ]
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want)
    sub = np.flatnonzero(keep & mask)
    want = sub[torchvision.ops.nms(torch.from_numpy(b[sub]), torch.from_numpy(s[sub]), 0.5).numpy()]
    np.testing.assert_array_equal(np.asarray(idx2)[np.asarray(ok2)], want)


def test_nms_many_candidates_runs_blocked():
    """3,000 candidates x 40 classes in tiles: same result as a dense greedy NumPy reference."""
    rng = np.random.default_rng(2)
    n = 3000
    b, s = _boxes_with_ties(rng, n)
    cls = rng.integers(0, 40, n)
    idx, ok = _batched(b, s, cls, iou_threshold=0.5, max_output_size=300)
    order = np.argsort(-s, kind="stable")
    x1, y1, x2, y2 = b.T
    area = (x2 - x1) * (y2 - y1)
    alive = np.ones(n, bool)
    kept = []
    for i in order:
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) == 300:
            break
        w = np.clip(np.minimum(x2[i], x2) - np.maximum(x1[i], x1), 0, None)
        h = np.clip(np.minimum(y2[i], y2) - np.maximum(y1[i], y1), 0, None)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        alive &= ~((iou > 0.5) & (cls == cls[i]))
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], kept)


def _np_soft_nms(boxes, scores, classes, sigma, thr, k):
    """Gaussian soft-NMS as spec §6 describes detectron2: argmax -> record -> decay the others of
    the same class by exp(-IoU^2 / sigma) -> prune scores <= thr."""
    boxes = boxes.astype(np.float32)
    scores = scores.astype(np.float32).copy()  # fp32 like detectron2, so near-ties break alike
    alive = np.isfinite(scores)
    out_i, out_s = [], []
    while alive.any() and len(out_i) < k:
        cand = np.where(alive, scores, -np.inf)
        top = int(np.argmax(cand))
        out_i.append(top)
        out_s.append(scores[top])
        b = boxes[top]
        w = np.clip(np.minimum(b[2], boxes[:, 2]) - np.maximum(b[0], boxes[:, 0]), 0, None)
        h = np.clip(np.minimum(b[3], boxes[:, 3]) - np.maximum(b[1], boxes[:, 1]), 0, None)
        inter = w * h
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        iou = np.where(inter > 0, inter / (area[top] + area - inter), 0.0)
        iou = np.where(classes == classes[top], iou, 0.0)
        scores = scores * np.exp(-(iou**2) / np.float32(sigma)).astype(np.float32)
        alive &= scores > thr
        alive[top] = False
    return np.array(out_i), np.array(out_s)


def test_soft_nms_matches_numpy_reference():
    rng = np.random.default_rng(3)
    n, k = 500, 120
    b, s = _boxes_with_ties(rng, n)
    s[:5] = 0.0005  # below the prune threshold from the start: only prunable after a step
    s[5:8] = -np.inf
    cls = rng.integers(0, 3, n)
    fn = jax.jit(N.soft_nms, static_argnames=("sigma", "score_threshold", "max_output_size"))
    idx, new_s, ok = fn(b, s, cls, sigma=0.5, score_threshold=0.001, max_output_size=k)
    want_i, want_s = _np_soft_nms(b, s, cls, 0.5, 0.001, k)
    ok = np.asarray(ok)
    np.testing.assert_array_equal(np.asarray(idx)[ok], want_i)
    np.testing.assert_allclose(np.asarray(new_s)[ok], want_s, rtol=1e-5, atol=1e-7)
    # Small budget of candidates: the loop ends when nothing is left; the rest is padding.
    idx, _, ok = fn(b[:6], s[:6], cls[:6], sigma=0.5, score_threshold=0.001, max_output_size=10)
    want_i, _ = _np_soft_nms(b[:6], s[:6], cls[:6], 0.5, 0.001, 10)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], want_i)
    assert (np.asarray(idx)[~np.asarray(ok)] == -1).all()


@pytest.mark.torch_ref
def test_find_top_rpn_proposals_follows_detectron2_steps():
    import torch
    import torchvision

    rng = np.random.default_rng(4)
    sizes = (300, 120)
    img_hw = np.array([[90.0, 110.0], [70.0, 60.0]], np.float32)
    props, logits = [], []
    for n in sizes:
        xy = rng.uniform(-20, 110, (2, n, 2))
        wh = rng.uniform(0, 40, (2, n, 2))
        props.append(np.concatenate([xy, xy + wh], -1).astype(np.float32))
        logits.append(rng.normal(0, 2, (2, n)).astype(np.float32))
    logits[0][0, :3] = np.nan
    pre, post, thr = 100, 50, 0.7
    fn = jax.jit(
        functools.partial(
            N.find_top_rpn_proposals, nms_threshold=thr, pre_nms_topk=pre, post_nms_topk=post
        )
    )
    boxes, scores, valid = fn(props, logits, img_hw)
    for i in range(2):
        cb, cs, cl = [], [], []
        for lvl, (p, s) in enumerate(zip(props, logits)):
            top = torch.topk(torch.from_numpy(s[i]), min(pre, s.shape[1])).indices.numpy()
            cb.append(p[i][top])
            cs.append(s[i][top])
            cl.append(np.full(len(top), lvl))
        cb, cs, cl = map(np.concatenate, (cb, cs, cl))
        ok = np.isfinite(cb).all(1) & np.isfinite(cs)
        cb, cs, cl = cb[ok], cs[ok], cl[ok]
        h, w = img_hw[i]
        cb = np.stack(
            [cb[:, 0].clip(0, w), cb[:, 1].clip(0, h), cb[:, 2].clip(0, w), cb[:, 3].clip(0, h)], 1
        )
        ok = ((cb[:, 2] - cb[:, 0]) > 0) & ((cb[:, 3] - cb[:, 1]) > 0)
        cb, cs, cl = cb[ok], cs[ok], cl[ok]
        keep = torchvision.ops.batched_nms(
            torch.from_numpy(cb), torch.from_numpy(cs), torch.from_numpy(cl), thr
        ).numpy()[:post]
        v = np.asarray(valid[i])
        assert v.sum() == len(keep)
        np.testing.assert_allclose(np.asarray(boxes[i])[v], cb[keep], rtol=0, atol=0)
        np.testing.assert_array_equal(np.asarray(scores[i])[v], cs[keep])
        assert np.all(np.asarray(scores[i])[~v] == -np.inf)


def test_nms_ops_vmap_over_images():
    """Per-image results are unchanged under `jax.vmap` (padded, fixed-size outputs)."""
    rng = np.random.default_rng(5)
    data = [_boxes_with_ties(rng, 150) for _ in range(2)]
    b = np.stack([d[0] for d in data])
    s = np.stack([d[1] for d in data])
    cls = rng.integers(0, 3, (2, 150))
    hard_one = jax.jit(lambda b, s, c: N.batched_nms(b, s, c, 0.5, 40))
    soft_one = jax.jit(lambda b, s, c: N.soft_nms(b, s, c, 0.5, 0.001, 40))
    hard = jax.jit(jax.vmap(hard_one))(b, s, cls)
    soft = jax.jit(jax.vmap(soft_one))(b, s, cls)
    for i in range(2):
        for got, want in zip(hard, hard_one(b[i], s[i], cls[i])):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
        for got, want in zip(soft, soft_one(b[i], s[i], cls[i])):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
