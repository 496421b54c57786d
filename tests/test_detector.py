"""`models.detector.OVDFastRCNN` vs NumPy references written from the spec (§5.2-5.4, §2.4, §6.1).

Sampling is made deterministic by asking for more RoIs than there are candidates
(`rois_per_image` >= P + G, and `int(rois_per_image * positive_fraction)` >= the foreground
count): `subsample_labels` then keeps every valid candidate, so the losses are functions of the
candidates alone. The reference matches, labels and scores those candidates in NumPy:
IoU (detectron2 `pairwise_iou`), best valid GT per candidate with IoU >= 0.5 -> its class else
background K; logits cos(x̂, ŵ)/0.01 with a 0 background column; COCO focal-scaled CE (γ 0.5,
background weight 0.2, plain mean) or LVIS weighted CE (background 0.8, weighted mean); L1 on
Box2BoxTransform(10, 10, 5, 5) deltas summed over foreground / number of sampled RoIs; the
mask head (deconv 2x2 s2 + ReLU + 1x1) and per-pixel BCE against box-filled targets (the
fallback without masks) or against detectron2's `BitMasks.crop_and_resize` of GT bitmaps (the
NumPy RoIAlign reference of tests/test_mask_head.py), foreground RoIs whose GT has no mask left
out.

Region features for the reference come from `RegionEncoder` / `visual.res5` on every candidate
(tested against open_clip + torchvision in test_region.py), not from the detector's own path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from regionclip_jax.models.detector import (
    OVDFastRCNN,
    bitmap_mask_targets,
    box_filled_mask_targets,
)
from regionclip_jax.models.region import RegionEncoder
from regionclip_jax.models.resnet import ModifiedResNet
from regionclip_jax.ops import roi_align

K_TRAIN, K_TEST, D = 3, 5, 32
B, P, G, HW = 2, 8, 3, 64
TAU = 0.01


def build(mask_head: bool) -> OVDFastRCNN:
    visual = ModifiedResNet((1, 1, 1, 1), D, 2, HW, 8, rngs=nnx.Rngs(0))
    return OVDFastRCNN(
        visual,
        num_train_classes=K_TRAIN,
        num_test_classes=K_TEST,
        mask_head=mask_head,
        mask_conv_dim=16,
        rngs=nnx.Rngs(1),
    )


def random_model(mask_head: bool, seed: int) -> OVDFastRCNN:
    """Abstract init (no per-shape compiles), then NumPy random values for every variable."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(mask_head)))
    rng = np.random.RandomState(seed)

    def fill(path, var):
        names = [str(getattr(k, "key", k)) for k in path]
        shape, name = var.get_value().shape, names[-1]
        if name == "mean":
            x = rng.normal(scale=0.1, size=shape)
        elif name in ("var", "scale"):
            x = rng.uniform(0.5, 1.0, size=shape)
        elif name == "bias" or name == "deconv_bias":
            x = rng.normal(scale=0.1, size=shape)
        elif name.endswith("embeddings"):
            x = rng.normal(size=shape)
        else:  # conv / linear kernels, positional embedding: fan-in scaled
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            x = rng.normal(scale=(2.0 / fan_in) ** 0.5, size=shape)
        if names[0] == "bbox_pred":
            # Large enough deltas to move boxes, and a dw beyond the log(1000/16) clamp.
            x = rng.normal(scale=0.5, size=shape) if name == "kernel" else [0.5, -0.3, 30, -2]
        return var.replace(jnp.asarray(np.asarray(x, np.float32)))

    state = jax.tree_util.tree_map_with_path(
        fill, state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    return nnx.merge(graphdef, state)


def make_batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    images = rng.normal(size=(B, HW, HW, 3)).astype(np.float32)
    gt = np.array(
        [
            [[8, 10, 30, 34], [34, 20, 60, 50], [2, 40, 20, 62]],
            [[10, 10, 40, 40], [20, 30, 50, 60], [0, 0, 0, 0]],
        ],
        np.float32,
    )
    labels = np.array([[2, 0, 1], [-1, -1, -1]], np.int32)
    gmask = np.array([[True, True, False], [False, False, False]])
    jitter = rng.uniform(-2, 2, size=(B, P, 4)).astype(np.float32)
    props = rng.uniform(0, 30, size=(B, P, 2)).astype(np.float32)
    props = np.concatenate([props, props + rng.uniform(8, 30, size=(B, P, 2))], -1)
    props[0, 0] = gt[0, 0] + jitter[0, 0]  # IoU > 0.5 with GT 0 -> class 2
    props[0, 1] = gt[0, 1] + jitter[0, 1]  # -> class 0
    props[0, 2] = gt[0, 0] + [12, 12, 12, 12]  # overlaps GT 0 below 0.5 -> background
    props[0, 5] = gt[0, 2]  # equals the *padded* GT: must stay background
    props[0, 6] = gt[0, 1]  # would be foreground, but the proposal slot is invalid
    props[1, 0] = gt[1, 0]  # equals a GT box of an image whose GT are all padded
    valid = np.ones((B, P), bool)
    valid[0, 6] = False
    valid[1, 7] = False
    return images, props.astype(np.float32), valid, gt, labels, gmask


# ------------------------------------------------------------------------------ NumPy reference


def np_iou(a, b):
    """`[N, 4]`, `[M, 4]` -> `[N, M]` (detectron2 pairwise_iou)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0.0)


def np_encode(src, tgt, w=(10.0, 10.0, 5.0, 5.0)):
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    dx = w[0] * ((tgt[:, 0] + tw / 2) - (src[:, 0] + sw / 2)) / sw
    dy = w[1] * ((tgt[:, 1] + th / 2) - (src[:, 1] + sh / 2)) / sh
    return np.stack([dx, dy, w[2] * np.log(tw / sw), w[3] * np.log(th / sh)], 1)


def np_logits(feats, emb):
    x = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    w = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    z = x @ w.T / TAU
    return np.concatenate([z, np.zeros(z.shape[:-1] + (1,))], -1)


def reference_candidates(props, valid, gt, labels, gmask):
    """Per image: candidate boxes (proposals + GT), validity, labels, matched GT boxes."""
    out = []
    for i in range(B):
        cand = np.concatenate([props[i], gt[i]]).astype(np.float64)
        nonempty = lambda b: (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        gok = gmask[i] & (labels[i] >= 0) & nonempty(gt[i])
        ok = np.concatenate([valid[i] & nonempty(props[i]), gok])
        lab = np.full(len(cand), K_TRAIN)
        mgt = np.zeros_like(cand)
        if gok.any():
            iou = np_iou(gt[i][gok].astype(np.float64), cand)
            best = iou.argmax(0)
            fg = iou.max(0) >= 0.5
            lab = np.where(fg, labels[i][gok][best], K_TRAIN)
            mgt = gt[i][gok][best].astype(np.float64)
        out.append((cand, ok, lab, mgt))
    return out


def reference_losses(model, feats, res5, cands, mode):
    """feats `[B, P+G, D]` / res5 `[B, P+G, S, S, C]` of every candidate -> dict of losses."""
    emb = np.asarray(model.train_embeddings[...], np.float64)
    wk = np.asarray(model.bbox_pred.kernel[...], np.float64)
    wb = np.asarray(model.bbox_pred.bias[...], np.float64)
    f = np.concatenate([feats[i][c[1]] for i, c in enumerate(cands)]).astype(np.float64)
    y = np.concatenate([c[2][c[1]] for c in cands])
    box = np.concatenate([c[0][c[1]] for c in cands])
    mgt = np.concatenate([c[3][c[1]] for c in cands])
    z = np_logits(f, emb)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    ce = lse - z[np.arange(len(y)), y]
    bg = y == K_TRAIN
    if mode == "coco":
        p_y = np.exp(-ce)
        loss_cls = np.mean(ce * (1 - p_y) ** 0.5 * np.where(bg, 0.2, 1.0))
    else:
        w = np.where(bg, 0.8, 1.0)
        loss_cls = np.sum(w * ce) / np.sum(w)
    fg = ~bg
    deltas = f @ wk + wb
    loss_box = 0.0
    if fg.any():
        loss_box = np.abs(deltas[fg] - np_encode(box[fg], mgt[fg])).sum()
    out = {"loss_cls": loss_cls, "loss_box_reg": loss_box / len(y), "num_fg": fg.sum()}
    if res5 is not None:
        r5 = np.concatenate([res5[i][c[1]] for i, c in enumerate(cands)]).astype(np.float64)[fg]
        mh = model.mask_head
        k = np.asarray(mh.deconv_kernel[...], np.float64)  # [2, 2, C, O]
        n, s = r5.shape[:2]
        up = np.zeros((n, 2 * s, 2 * s, k.shape[-1]))
        for a in range(2):
            for b_ in range(2):  # ConvTranspose2d(k=2, s=2): output (2i + a, 2j + b)
                up[:, a::2, b_::2] = r5 @ k[a, b_]
        up = np.maximum(up + np.asarray(mh.deconv_bias[...]), 0)
        logit = (up @ np.asarray(mh.predictor.kernel[...]))[..., 0] + float(
            np.asarray(mh.predictor.bias[...])[0]
        )
        m = 2 * s
        t = (np.arange(m) + 0.5) / m
        bx, gx = box[fg], mgt[fg]
        xs = bx[:, 0:1] + t * (bx[:, 2:3] - bx[:, 0:1])
        ys = bx[:, 1:2] + t * (bx[:, 3:4] - bx[:, 1:2])
        inx = (xs >= gx[:, 0:1]) & (xs <= gx[:, 2:3])
        iny = (ys >= gx[:, 1:2]) & (ys <= gx[:, 3:4])
        tgt = (iny[:, :, None] & inx[:, None, :]).astype(np.float64)
        bce = np.maximum(logit, 0) - logit * tgt + np.log1p(np.exp(-np.abs(logit)))
        out["loss_mask"] = bce.mean()
    return out


@jax.jit
def candidate_features(visual_state, images, cand):
    """Reference region features (RegionEncoder) and res5 maps of every candidate."""
    visual = nnx.merge(*visual_state)
    enc = RegionEncoder(visual)
    feats = enc(images, cand)
    p = enc.pooler_resolution
    crops = roi_align(visual.trunk(images), cand, (p, p), 1 / 16, 0, True)
    res5 = visual.res5(crops.reshape((-1,) + crops.shape[2:]))
    return feats, res5.reshape(cand.shape[:2] + res5.shape[1:])


@jax.jit
def region_features(visual_state, images, boxes):
    return RegionEncoder(nnx.merge(*visual_state))(images, boxes)


def reference_features(model, images, cands):
    cand = jnp.asarray(np.stack([c[0] for c in cands]), jnp.float32)
    feats, res5 = candidate_features(nnx.split(model.visual), jnp.asarray(images), cand)
    return np.asarray(feats), np.asarray(res5)


# --------------------------------------------------------------------------------------- tests


def loss_fn(model, batch, mode, **kw):
    images, props, valid, gt, labels, gmask = (jnp.asarray(x) for x in batch)
    return model.training_losses(
        images,
        jnp.full((B, 2), HW),
        props,
        valid,
        gt,
        labels,
        gmask,
        jax.random.key(0),
        mode=mode,
        rois_per_image=64,  # >= P + G and 64 * 0.25 >= #fg: every candidate is sampled
        **kw,
    )


@pytest.fixture(scope="module")
def model():
    return random_model(mask_head=False, seed=0)


def test_losses_match_reference_coco(model):
    batch = make_batch()
    cands = reference_candidates(*batch[1:])
    feats, _ = reference_features(model, batch[0], cands)
    ref = reference_losses(model, feats, None, cands, "coco")
    assert ref["num_fg"] == 2 + 2  # two matched proposals + the two appended valid GT

    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, b: loss_fn(nnx.merge(graphdef, s), b, "coco"))
    loss, m = run(state, batch)
    np.testing.assert_allclose(m["loss_cls"], ref["loss_cls"], rtol=2e-4)
    np.testing.assert_allclose(m["loss_box_reg"], ref["loss_box_reg"], rtol=2e-4)
    np.testing.assert_allclose(loss, ref["loss_cls"] + ref["loss_box_reg"], rtol=2e-4)
    n_valid = sum(c[1].sum() for c in cands)
    np.testing.assert_allclose(m["num_fg_samples"], 4 / B)
    np.testing.assert_allclose(m["num_bg_samples"], (n_valid - 4) / B)
    np.testing.assert_allclose(m["fg_fraction"], 4 / n_valid, rtol=1e-6)
    emb = model.train_embeddings[...]
    z = np.concatenate([np_logits(feats[i][c[1]], emb) for i, c in enumerate(cands)])
    y = np.concatenate([c[2][c[1]] for c in cands])
    np.testing.assert_allclose(m["cls_accuracy"], np.mean(z.argmax(1) == y), rtol=1e-6)

    # No valid GT anywhere: every sampled RoI is background and the box loss is 0.
    empty = batch[:5] + (np.zeros_like(batch[5]),)
    cands = reference_candidates(*empty[1:])
    ref = reference_losses(model, feats, None, cands, "coco")
    loss, m = run(state, empty)
    assert ref["num_fg"] == 0 and float(m["loss_box_reg"]) == 0.0
    np.testing.assert_allclose(m["loss_cls"], ref["loss_cls"], rtol=2e-4)
    assert float(m["num_fg_samples"]) == 0.0


def test_lvis_mask_losses_and_gradients():
    model = random_model(mask_head=True, seed=1)
    batch = make_batch(1)
    cands = reference_candidates(*batch[1:])
    feats, res5 = reference_features(model, batch[0], cands)
    ref = reference_losses(model, feats, res5, cands, "lvis")

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, rest, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, "lvis")

    (loss, m), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, rest, batch)
    for key in ("loss_cls", "loss_box_reg", "loss_mask"):
        np.testing.assert_allclose(m[key], ref[key], rtol=2e-4, err_msg=key)
    total = ref["loss_cls"] + ref["loss_box_reg"] + ref["loss_mask"]
    np.testing.assert_allclose(loss, total, rtol=2e-4)

    # Gradients: trained parts get some, the frozen stem/layer1 (FREEZE_AT 2) none; the class
    # embeddings are not parameters at all.
    g = nnx.to_pure_dict(grads) if hasattr(nnx, "to_pure_dict") else grads.to_pure_dict()
    norm = lambda t: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)))
    v = g["visual"]
    for name in ("layer2", "layer3", "layer4", "attnpool"):
        assert norm(v[name]) > 0, name
    assert norm(g["bbox_pred"]) > 0 and norm(g["mask_head"]) > 0
    assert norm(v["layer1"]) == 0 and norm({k: v[k] for k in ("conv1", "bn1", "conv3")}) == 0
    assert "train_embeddings" not in g and "test_embeddings" not in g
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def reference_gt_index(props, valid, gt, labels, gmask):
    """Per image: the GT slot (index into `gt[i]`) every candidate matches, -1 for background."""
    out = []
    for i in range(B):
        cand = np.concatenate([props[i], gt[i]]).astype(np.float64)
        nonempty = (gt[i][:, 2] > gt[i][:, 0]) & (gt[i][:, 3] > gt[i][:, 1])
        gok = gmask[i] & (labels[i] >= 0) & nonempty
        idx = np.full(len(cand), -1)
        if gok.any():
            iou = np_iou(gt[i][gok].astype(np.float64), cand)
            idx = np.where(iou.max(0) >= 0.5, np.nonzero(gok)[0][iou.argmax(0)], -1)
        out.append(idx)
    return out


def test_mask_loss_with_bitmaps_and_mask_valid():
    """`gt_masks` + `mask_valid`: BCE over the fg RoIs whose GT has a mask, against
    BitMasks.crop_and_resize of the matched bitmap (masks at half the canvas resolution)."""
    from test_mask_head import bitmask_rule

    model = random_model(mask_head=True, seed=3)
    batch = make_batch(3)
    images, props, valid, gt, labels, gmask = batch
    cands = reference_candidates(*batch[1:])
    gidx = reference_gt_index(*batch[1:])
    _, res5 = reference_features(model, images, cands)
    scale, hm = 0.5, HW // 2
    rng = np.random.RandomState(3)
    # Blobby bitmaps (not boxes): a disc of random radius inside each GT box.
    yy, xx = np.mgrid[0:hm, 0:hm] + 0.5
    masks = np.zeros((B, G, hm, hm), np.uint8)
    for i, j in np.ndindex(B, G):
        x1, y1, x2, y2 = gt[i, j] * scale
        r = 0.5 * min(x2 - x1, y2 - y1) * rng.uniform(0.6, 1.0)
        masks[i, j] = (xx - (x1 + x2) / 2) ** 2 + (yy - (y1 + y2) / 2) ** 2 <= r * r
    mask_valid = np.array([[True, False, True], [True, True, True]])

    def mask_head_logits(r5):
        mh = model.mask_head
        k = np.asarray(mh.deconv_kernel[...], np.float64)
        n, sz = r5.shape[:2]
        up = np.zeros((n, 2 * sz, 2 * sz, k.shape[-1]))
        for a in range(2):
            for b_ in range(2):
                up[:, a::2, b_::2] = r5 @ k[a, b_]
        up = np.maximum(up + np.asarray(mh.deconv_bias[...]), 0)
        w = np.asarray(mh.predictor.kernel[...], np.float64)
        return (up @ w)[..., 0] + float(np.asarray(mh.predictor.bias[...])[0])

    logits, targets = [], []
    for i, (cand, ok, lab, _) in enumerate(cands):
        for c in np.nonzero(ok & (lab < K_TRAIN))[0]:
            g = gidx[i][c]
            if not mask_valid[i, g]:
                continue
            logits.append(mask_head_logits(res5[i][c : c + 1].astype(np.float64))[0])
            m = logits[-1].shape[-1]
            targets.append(bitmask_rule(masks[i, g], cand[c].astype(np.float32), m, scale)[0])
    assert len(logits) == 2  # image 0: GT 0 and its proposal; GT 1 (and its proposal) no mask
    z, t = np.stack(logits), np.stack(targets).astype(np.float64)
    want = np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))
    assert 0.1 < t.mean() < 0.9

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, masks, mask_valid):
        m = nnx.merge(graphdef, state)
        return loss_fn(m, batch, "lvis", gt_masks=masks, mask_valid=mask_valid, mask_scale=scale)

    _, m = run(state, jnp.asarray(masks), jnp.asarray(mask_valid))
    np.testing.assert_allclose(m["loss_mask"], want, rtol=2e-4)
    # Every GT with a mask: more RoIs enter; no GT with a mask: the loss is 0.
    _, m_all = run(state, jnp.asarray(masks), jnp.ones((B, G), bool))
    assert abs(float(m_all["loss_mask"]) - want) > 1e-4
    _, m_none = run(state, jnp.asarray(masks), jnp.zeros((B, G), bool))
    assert float(m_none["loss_mask"]) == 0.0


def test_predict_decoding(model):
    images, props, valid, *_ = make_batch(2)
    hw = np.array([[50, 40], [5000, 5000]], np.int32)  # image 1: no clipping
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, emb):
        m = nnx.merge(graphdef, state)
        args = (jnp.asarray(images), jnp.asarray(hw), jnp.asarray(props), jnp.asarray(valid))
        return m.predict(*args), m.predict(*args, embeddings=emb, apply_deltas=False)

    (probs, boxes), (probs_tr, raw) = run(state, model.train_embeddings[...])
    feats = np.asarray(region_features(nnx.split(model.visual), images, props))
    assert probs.shape == (B, P, K_TEST + 1) and probs_tr.shape == (B, P, K_TRAIN + 1)

    wk = np.asarray(model.bbox_pred.kernel[...], np.float64)
    wb = np.asarray(model.bbox_pred.bias[...], np.float64)
    for i in range(B):
        ok = valid[i]
        pairs = ((model.test_embeddings[...], probs), (model.train_embeddings[...], probs_tr))
        for emb, got in pairs:
            z = np_logits(feats[i].astype(np.float64), np.asarray(emb, np.float64))
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            np.testing.assert_allclose(got[i][ok], p[ok], rtol=1e-3, atol=1e-6)
            assert (np.asarray(got[i][~ok]) == 0).all()
        # detectron2 Box2BoxTransform.apply_deltas with weights (10, 10, 5, 5), clamp log(1000/16).
        d = feats[i].astype(np.float64) @ wk + wb
        x = props[i].astype(np.float64)
        w, h = x[:, 2] - x[:, 0], x[:, 3] - x[:, 1]
        cx, cy = x[:, 0] + 0.5 * w, x[:, 1] + 0.5 * h
        clamp = np.log(1000.0 / 16)
        pcx, pcy = d[:, 0] / 10 * w + cx, d[:, 1] / 10 * h + cy
        pw = np.exp(np.minimum(d[:, 2] / 5, clamp)) * w
        ph = np.exp(np.minimum(d[:, 3] / 5, clamp)) * h
        dec = np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
        if i == 1:  # unclipped: the clamp is exercised on some rows, not on others
            assert (d[ok, 2] / 5 > clamp).any() and (d[ok, 2] / 5 < clamp).any()
        lim = np.array([hw[i, 1], hw[i, 0]] * 2, np.float64)
        dec = np.clip(dec, 0, lim)
        np.testing.assert_allclose(boxes[i][ok], dec[ok], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(raw[i][ok], np.clip(x, 0, lim)[ok], rtol=1e-6)
        assert (np.asarray(boxes[i][~ok]) == 0).all()


def test_box_filled_targets_match_rasterised_bitmaps():
    """Box-filled targets = bitmap targets of the rasterised box, off the box border."""
    rng = np.random.RandomState(4)
    gt = np.array([[[6.0, 9.0, 41.0, 30.0], [20.0, 2.0, 60.0, 55.0]]], np.float32)
    rois = gt + rng.uniform(-6, 6, size=gt.shape).astype(np.float32)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5  # pixel centres
    bitmaps = np.stack([(xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3]) for b in gt[0]])[
        None
    ].astype(np.float32)
    m = 14
    a = np.asarray(box_filled_mask_targets(jnp.asarray(rois), jnp.asarray(gt), m))
    b = np.asarray(bitmap_mask_targets(jnp.asarray(bitmaps), jnp.asarray(rois), m))
    assert a.shape == b.shape == (1, 2, m, m)
    # They may only differ on bins within a pixel of the GT border.
    assert np.mean(a != b) < 0.1 and a.sum() > 50


@pytest.mark.torch_ref
def test_bitmap_targets_match_torchvision():
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    rng = np.random.RandomState(5)
    masks = (rng.rand(2, 3, 32, 40) > 0.4).astype(np.float32)
    # [x1, y1] <= [x2, y2] after sorting the two corners of each box.
    rois = np.sort(rng.uniform(-4, 70, size=(2, 3, 2, 2)), axis=2).reshape(2, 3, 4)
    rois = rois.astype(np.float32)
    got = np.asarray(bitmap_mask_targets(jnp.asarray(masks), jnp.asarray(rois), 7, 0.5))
    flat = torch.from_numpy(masks.reshape(6, 1, 32, 40))
    r = torch.cat([torch.arange(6.0)[:, None], torch.from_numpy(rois.reshape(6, 4))], 1)
    want = tv_ops.roi_align(flat, r, (7, 7), 0.5, 0, aligned=True)[:, 0] >= 0.5
    np.testing.assert_array_equal(got.reshape(6, 7, 7), want.numpy().astype(np.float32))


def test_sampling_keeps_boxes_labels_and_targets_together(model):
    """Fewer RoIs than candidates: fg capped at int(S * 0.25), every RoI keeps its own label."""
    batch = make_batch()
    cands = reference_candidates(*batch[1:])
    s = jax.jit(lambda *a: model.label_and_sample(*a, rois_per_image=8, positive_fraction=0.25))(
        *(jnp.asarray(x) for x in batch[1:]), jax.random.key(3)
    )
    s = {k: np.asarray(v) for k, v in s.items()}
    # Image 0: 4 fg (2 allowed) + 5 bg; image 1: 7 bg. One slot each stays padding.
    np.testing.assert_array_equal(s["is_fg"].sum(1), [2, 0])
    np.testing.assert_array_equal(s["valid"].sum(1), [7, 7])
    assert (s["labels"][~s["valid"]] == -1).all()
    for i, (cand, ok, lab, mgt) in enumerate(cands):
        for j in np.nonzero(s["valid"][i])[0]:
            (hit,) = np.nonzero(ok & np.all(cand == s["boxes"][i, j], axis=1))
            assert len(hit) >= 1  # a valid candidate (duplicates share their label)
            assert s["labels"][i, j] == lab[hit[0]]
            assert s["is_fg"][i, j] == (lab[hit[0]] < K_TRAIN)
            if s["is_fg"][i, j]:
                np.testing.assert_array_equal(s["gt_boxes"][i, j], mgt[hit[0]])
        picked = [tuple(b) for b in s["boxes"][i][s["valid"][i]]]
        assert len(set(picked)) == len(picked)  # no candidate sampled twice
