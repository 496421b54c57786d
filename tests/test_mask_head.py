"""Mask targets and loss against NumPy references of detectron2's definitions (issue 20), and the
mask head learning shapes rather than rectangles.

References, written here from detectron2 (not from our code):
  - `BitMasks.crop_and_resize`: torchvision/detectron2 `ROIAlign((M, M), scale, sampling_ratio=0,
    aligned=True)` of the bitmap (`roi_align_reference`, float64, one RoI at a time) >= 0.5.
  - `PolygonMasks.crop_and_resize` = `rasterize_polygons_within_box`: the polygon shifted by the
    box corner, scaled by M / max(side, 0.1), rasterised by pycocotools (`frPyObjects` + `merge` +
    `decode`) on the M x M grid.
  - `mask_rcnn_loss` (class-agnostic): `F.binary_cross_entropy_with_logits(logits[fg],
    targets[fg], reduction="mean")`; `logits.sum() * 0` without foreground.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from pycocotools import mask as mask_util

from regionclip_jax.losses.detection import mask_rcnn_loss
from regionclip_jax.models.detector import MaskHead, bitmap_mask_targets, box_filled_mask_targets
from regionclip_jax.ops import roi_align

# ------------------------------------------------------------------------------ NumPy references


def roi_align_reference(image: np.ndarray, box, out: int, scale: float) -> np.ndarray:
    """ROIAlign(aligned=True, sampling_ratio=0) of one `[H, W]` map, float64 (torchvision's
    definition: adaptive ceil(roi/out) samples per bin, samples outside [-1, H] count as 0,
    coordinates clamped to [0, H-1])."""
    h, w = image.shape
    x1, y1, x2, y2 = (float(v) * scale - 0.5 for v in box)
    rw, rh = x2 - x1, y2 - y1
    bw, bh = rw / out, rh / out
    gw, gh = int(np.ceil(rw / out)), int(np.ceil(rh / out))
    res = np.zeros((out, out))
    if gw <= 0 or gh <= 0:
        return res

    def axis(start, bin_, grid, size):
        p = np.arange(out)[:, None]
        i = np.arange(grid)[None, :]
        c = (start + p * bin_ + (i + 0.5) * bin_ / grid).ravel()  # [out * grid]
        inside = (c >= -1.0) & (c <= size)
        c = np.maximum(c, 0.0)
        lo = np.floor(c).astype(int)
        top = lo >= size - 1
        lo = np.where(top, size - 1, lo)
        c = np.where(top, size - 1.0, c)
        hi = np.where(top, size - 1, lo + 1)
        frac = c - lo
        return lo, hi, frac, inside

    ylo, yhi, ly, yin = axis(y1, bh, gh, h)
    xlo, xhi, lx, xin = axis(x1, bw, gw, w)
    f = image.astype(np.float64)
    val = (
        (1 - ly)[:, None] * (1 - lx)[None] * f[ylo[:, None], xlo[None]]
        + (1 - ly)[:, None] * lx[None] * f[ylo[:, None], xhi[None]]
        + ly[:, None] * (1 - lx)[None] * f[yhi[:, None], xlo[None]]
        + ly[:, None] * lx[None] * f[yhi[:, None], xhi[None]]
    )
    val = val * (yin[:, None] & xin[None])
    return val.reshape(out, gh, out, gw).mean(axis=(1, 3))


def bitmask_rule(bitmap: np.ndarray, box, m: int, scale: float = 1.0):
    """detectron2 `BitMasks.crop_and_resize` (with masks at `scale` of the box frame):
    (targets bool [M, M], the pooled values before the threshold)."""
    pooled = roi_align_reference(bitmap, box, m, scale)
    return pooled >= 0.5, pooled


def polygons_to_bitmask(polygons, height: int, width: int) -> np.ndarray:
    """detectron2 `polygons_to_bitmask` (pycocotools)."""
    rles = mask_util.frPyObjects([np.asarray(p, np.float64) for p in polygons], height, width)
    with warnings.catch_warnings():  # pycocotools' decode under NumPy 2: a copy-keyword notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)


def polygon_rule(polygons, box, m: int) -> np.ndarray:
    """detectron2 `rasterize_polygons_within_box` (`PolygonMasks.crop_and_resize`)."""
    box = np.asarray(box, np.float64)
    w, h = box[2] - box[0], box[3] - box[1]
    out = []
    for p in polygons:
        p = np.asarray(p, np.float64).copy()
        p[0::2] = (p[0::2] - box[0]) * (m / max(w, 0.1))
        p[1::2] = (p[1::2] - box[1]) * (m / max(h, 0.1))
        out.append(p)
    return polygons_to_bitmask(out, m, m)


def bce_mean_reference(logits, targets, fg) -> float:
    """`F.binary_cross_entropy_with_logits(logits[fg], targets[fg], reduction="mean")`."""
    z, t = logits[fg].astype(np.float64), targets[fg].astype(np.float64)
    if z.size == 0:
        return 0.0
    p = 1.0 / (1.0 + np.exp(-z))
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log1p(-p))))


# --------------------------------------------------------------------------- ShapesWorld-like


def circle(cx, cy, r, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).ravel()


def triangle(cx, cy, r, rot):
    t = rot + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).ravel()


def square(cx, cy, r):
    return np.array([cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r], np.float64)


def random_shape(rng, kind: str, canvas: int, rmin: float = 6.0, rmax: float = 25.0):
    r = rng.uniform(rmin, rmax)
    cx, cy = rng.uniform(r + 1, canvas - r - 1, size=2)
    if kind == "circle":
        return circle(cx, cy, r)
    if kind == "triangle":
        return triangle(cx, cy, r, rng.uniform(0, 2 * np.pi))
    return square(cx, cy, r / np.sqrt(2))


def poly_box(p):
    return np.array([p[0::2].min(), p[1::2].min(), p[0::2].max(), p[1::2].max()])


def jitter_box(rng, box, amount=0.15):
    w, h = box[2] - box[0], box[3] - box[1]
    return box + rng.uniform(-amount, amount, size=4) * np.array([w, h, w, h])


def edge_distance(points, poly) -> np.ndarray:
    """Distance of `[N, 2]` points to the closed polygon's boundary."""
    v = poly.reshape(-1, 2)
    a, b = v, np.roll(v, -1, axis=0)
    ab = b - a
    ap = points[:, None, :] - a[None]
    t = np.clip(np.sum(ap * ab, -1) / np.maximum(np.sum(ab * ab, -1), 1e-12), 0, 1)
    d = ap - t[..., None] * ab
    return np.sqrt(np.sum(d * d, -1)).min(1)


def iou(a, b) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


# ------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("m, scale", [(14, 1.0), (18, 0.25), (14, 0.5)])
def test_bitmap_targets_equal_bitmask_reference(m, scale):
    """Our targets = BitMasks.crop_and_resize, except where the pooled value is 0.5 to rounding."""
    rng = np.random.RandomState(m + int(100 * scale))
    canvas, kinds = 128, ("circle", "triangle", "square")
    hm = int(canvas * scale)
    polys = [random_shape(rng, kinds[i % 3], canvas, 8, 40) for i in range(12)]
    # Canvas-frame polygons rasterised at the mask scale (the pipeline's gt_masks).
    masks = np.stack([polygons_to_bitmask([p * scale], hm, hm) for p in polys])
    rois = np.stack([jitter_box(rng, poly_box(p), 0.3) for p in polys])
    rois[0] = [-6.0, -3.0, 20.0, 9.0]  # partly outside the canvas
    rois[1] = [30.0, 40.0, 30.4, 52.0]  # thinner than M pixels: one sample per bin
    got = bitmap_mask_targets(
        jnp.asarray(masks[None].astype(np.uint8)), jnp.asarray(rois[None], jnp.float32), m, scale
    )
    got = np.asarray(got)[0]
    assert got.shape == (12, m, m)
    for i in range(12):
        want, pooled = bitmask_rule(masks[i], rois[i].astype(np.float32), m, scale)
        differ = got[i].astype(bool) != want
        assert np.all(np.abs(pooled[differ] - 0.5) < 1e-5), (i, pooled[differ])
    assert 0.2 < got[2:].mean() < 0.9  # the shapes fill part, not all, of their RoIs


def test_polygon_rule_differs_from_bitmap_rule_on_the_boundary_only(capsys):
    """The measurement in `models.detector`'s docstring: polygon rule vs bitmap rule."""
    rng = np.random.RandomState(7)
    canvas, m = 96, 14
    rows = []
    for kind in ("circle", "triangle", "square"):
        diff, total, far = 0, 0, 0
        for _ in range(20):
            p = random_shape(rng, kind, canvas)
            bitmap = polygons_to_bitmask([p], canvas, canvas)
            box = jitter_box(rng, poly_box(p)).astype(np.float32)
            ours = np.asarray(
                bitmap_mask_targets(
                    jnp.asarray(bitmap[None, None]), jnp.asarray(box[None, None]), m
                )
            )[0, 0].astype(bool)
            poly = polygon_rule([p], box, m)
            d = ours != poly
            diff, total = diff + d.sum(), total + d.size
            # Each differing target pixel lies within one target pixel (+ one image pixel, the
            # bitmap's own rasterisation) of the polygon's edge.
            bw, bh = (box[2] - box[0]) / m, (box[3] - box[1]) / m
            yy, xx = np.nonzero(d)
            centres = np.stack([box[0] + (xx + 0.5) * bw, box[1] + (yy + 0.5) * bh], 1)
            far += int(np.sum(edge_distance(centres, p) > max(bw, bh) + 1.0))
            assert iou(ours, poly) > 0.8
        rows.append((kind, diff / total, far))
    with capsys.disabled():
        for kind, frac, _ in rows:
            print(f"\npolygon vs bitmap rule, {kind}: {100 * frac:.1f}% of target pixels differ")
    for kind, frac, far in rows:
        assert far == 0, kind
        assert 0.0 < frac < 0.08, (kind, frac)


# --------------------------------------------------------------------------------------- loss


def test_mask_rcnn_loss_equals_bce_mean_over_foreground():
    rng = np.random.RandomState(0)
    logits = rng.normal(scale=3.0, size=(2, 5, 14, 14)).astype(np.float32)
    targets = (rng.rand(2, 5, 14, 14) > 0.5).astype(np.float32)
    fg = np.array([[True, True, False, True, False], [False, True, False, False, False]])
    got = float(mask_rcnn_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(fg)))
    np.testing.assert_allclose(got, bce_mean_reference(logits, targets, fg), rtol=1e-5)
    # The background rows do not matter, whatever their values.
    logits2 = np.where(fg[..., None, None], logits, 1e4).astype(np.float32)
    got2 = float(mask_rcnn_loss(jnp.asarray(logits2), jnp.asarray(1 - targets), jnp.asarray(fg)))
    np.testing.assert_allclose(got2, bce_mean_reference(logits, 1 - targets, fg), rtol=1e-5)
    # No foreground: 0 and a zero gradient (detectron2: logits.sum() * 0).
    none = jnp.zeros_like(jnp.asarray(fg))
    g = jax.grad(lambda z: mask_rcnn_loss(z, jnp.asarray(targets), none))(jnp.asarray(logits))
    assert float(mask_rcnn_loss(jnp.asarray(logits), jnp.asarray(targets), none)) == 0.0
    assert float(jnp.abs(g).max()) == 0.0


# ---------------------------------------------------------------------------------- learning


def make_scenes(rng, n: int, canvas: int, m: int):
    """Scenes with one circle or triangle each: image `[n, H, W, 3]`, exact GT bitmaps, RoIs
    (jittered GT boxes, as sampled foreground proposals), the polygons and kinds."""
    images = np.zeros((n, canvas, canvas, 3), np.float32)
    bitmaps = np.zeros((n, canvas, canvas), np.uint8)
    rois, polys, kinds = [], [], []
    for i in range(n):
        kind = ("circle", "triangle")[i % 2]
        p = random_shape(rng, kind, canvas, 8, 20)
        bm = polygons_to_bitmask([p], canvas, canvas)
        colour, bg = rng.uniform(0.4, 1.0, 3), rng.uniform(-1.0, -0.2, 3)
        img = np.where(bm[..., None], colour, bg) + rng.normal(scale=0.15, size=(canvas, canvas, 3))
        images[i], bitmaps[i] = img, bm
        rois.append(jitter_box(rng, poly_box(p), 0.12))
        polys.append(p)
        kinds.append(kind)
    return images, bitmaps, np.asarray(rois, np.float32), polys, kinds


class FixedEncoder:
    """A fixed (untrained) res5-like feature extractor: RoIAlign of the image to M x M, 2x2
    space-to-depth to (M/2) x (M/2) x 12, a random 12 -> C projection and tanh."""

    def __init__(self, m: int, channels: int, seed: int):
        self.m = m
        self.proj = jax.random.normal(jax.random.key(seed), (12, channels)) / np.sqrt(12)

    def __call__(self, images, rois):
        m = self.m
        crops = roi_align(images, rois[:, None], (m, m), 1.0, 0, True)[:, 0]  # [n, M, M, 3]
        n = crops.shape[0]
        s2d = crops.reshape(n, m // 2, 2, m // 2, 2, 3).transpose(0, 1, 3, 2, 4, 5)
        return jnp.tanh(s2d.reshape(n, m // 2, m // 2, 12) @ self.proj)


def train_head(feats, targets, seed: int, steps: int):
    head = MaskHead(feats.shape[-1], 32, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(head)
    opt = optax.adam(3e-3)
    state = opt.init(params)
    fg = jnp.ones(feats.shape[0], bool)

    @jax.jit
    def step(params, state):
        def f(p):
            return mask_rcnn_loss(nnx.merge(graphdef, p)(feats), targets, fg)

        loss, g = jax.value_and_grad(f)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    for _ in range(steps):
        params, state, loss = step(params, state)
    return graphdef, params, float(loss)


@pytest.mark.learning
def test_mask_head_learns_shapes_not_rectangles(learning_seed, report_margin):
    """Trained on bitmap targets (`BitMasks.crop_and_resize` of exact circle/triangle masks), the
    head predicts masks whose IoU with the true shapes (detectron2's polygon rule in the RoI) is
    clearly above the IoU of box-filled masks (what the head learns from box-filled targets)."""
    rng = np.random.RandomState(learning_seed)
    canvas, m = 64, 14
    enc = FixedEncoder(m, 32, learning_seed)
    tr_img, tr_bm, tr_roi, *_ = make_scenes(rng, 256, canvas, m)
    te_img, te_bm, te_roi, te_poly, te_kind = make_scenes(rng, 64, canvas, m)

    feats = enc(jnp.asarray(tr_img), jnp.asarray(tr_roi))
    targets = bitmap_mask_targets(jnp.asarray(tr_bm[:, None]), jnp.asarray(tr_roi[:, None]), m)
    graphdef, params, final_loss = train_head(feats, targets[:, 0], learning_seed, 300)

    logits = nnx.merge(graphdef, params)(enc(jnp.asarray(te_img), jnp.asarray(te_roi)))
    pred = np.asarray(logits) > 0.0
    boxes = np.stack([poly_box(p) for p in te_poly]).astype(np.float32)
    filled = np.asarray(box_filled_mask_targets(jnp.asarray(te_roi), jnp.asarray(boxes), m)) > 0
    rows = {}
    for kind in ("circle", "triangle"):
        idx = [i for i, k in enumerate(te_kind) if k == kind]
        truth = [polygon_rule([te_poly[i]], te_roi[i], m) for i in idx]
        pred_iou = np.mean([iou(pred[i], t) for i, t in zip(idx, truth)])
        box_iou = np.mean([iou(filled[i], t) for i, t in zip(idx, truth)])
        rows[kind] = (pred_iou, box_iou)
        print(f"{kind}: predicted-mask IoU {pred_iou:.3f}, box-filled IoU {box_iou:.3f}")
    print(f"final training loss {final_loss:.4f}")
    for kind, (pred_iou, box_iou) in rows.items():
        threshold = box_iou + 0.08
        report_margin(pred_iou, threshold, higher_is_better=True, what=f"{kind} mask IoU")
        assert pred_iou > threshold, (kind, pred_iou, box_iou)


# ---------------------------------------------------------------------------------- the trainer


def test_detection_task_feeds_masks_to_the_loss(monkeypatch):
    """With `detect.mask_on`, `DetectionTask.batch_spec` asks for `gt_masks` (at
    `detect.mask_scale` of the canvas) and `mask_valid`; `loss` passes them with `mask_scale`,
    and a batch without them keeps the box-filled fallback."""
    import ml_collections

    from regionclip_jax.train import detection_trainer as dt

    task = object.__new__(dt.DetectionTask)
    task.detect = ml_collections.ConfigDict(
        dict(
            mask_on=True,
            mask_scale=0.25,
            max_boxes=3,
            task="lvis",
            rois_per_image=8,
            positive_fraction=0.25,
            iou_threshold=0.5,
            bg_weight=-1.0,
            focal_gamma=-1.0,
            freeze_at=2,
        )
    )
    task.canvas, task.dtype = (32, 40), jnp.float32
    base = ("images", "image_hw", "boxes", "box_mask", "labels")
    spec = task.batch_spec(2)
    assert tuple(spec) == base + ("gt_masks", "mask_valid")
    assert spec["gt_masks"] == ((2, 3, 8, 10), np.dtype(np.uint8))
    assert spec["mask_valid"] == ((2, 3), np.dtype(bool))
    task.detect.mask_on = False
    assert tuple(task.batch_spec(2)) == base
    task.detect.mask_on = True

    seen = {}

    class Detector:
        def training_losses(self, *args, **kwargs):
            seen.clear()
            seen.update(kwargs)
            return jnp.float32(0), {}

    model = dt.DetectionModel(Detector(), None)
    props = (jnp.zeros((2, 4, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4), bool))
    monkeypatch.setattr(task, "proposals", lambda model, batch: props)
    batch = dict(
        images=jnp.zeros((2, 32, 32, 3), jnp.uint8),
        image_hw=jnp.full((2, 2), 32),
        boxes=jnp.zeros((2, 3, 4)),
        box_mask=jnp.ones((2, 3), bool),
        labels=jnp.zeros((2, 3), jnp.int32),
    )
    task.loss(model, batch, jax.random.key(0), 0)
    assert "gt_masks" not in seen and "mask_valid" not in seen  # the box-filled fallback
    masks = jnp.ones((2, 3, 8, 8), jnp.uint8)
    mask_valid = jnp.array([[True, False, True]] * 2)
    task.loss(model, dict(batch, gt_masks=masks, mask_valid=mask_valid), jax.random.key(0), 0)
    assert seen["gt_masks"] is masks and seen["mask_valid"] is mask_valid
    assert seen["mask_scale"] == 0.25
