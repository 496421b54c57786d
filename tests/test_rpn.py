"""detectron2 RPN (models/rpn.py, convert/detectron2_rpn.py, losses/rpn.py) against references
written here from detectron2's definitions.

  - A detectron2-format checkpoint (original key names, PyTorch layout, random tensors, narrow
    ResNet-50) loads, and res4 / FPN features and the final proposals equal a network assembled
    from torch.nn.functional + torchvision.ops.batched_nms with the same weights (C4, and the LSJ
    FPN variant with BN in the FPN and a 2-conv head).
  - Anchor generation, delta decoding (with the scale clamp), per-level top-k, clipping, the
    min-size filter and per-level NMS equal NumPy formulas.
  - The RPN losses equal a NumPy transcription of detectron2's matcher + BCE + L1 formulas.
  - Mismatched checkpoints fail with a message naming the keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from regionclip_jax.convert.detectron2_rpn import (
    infer_rpn_architecture,
    load_detectron2_rpn,
    rpn_from_detectron2,
)
from regionclip_jax.losses.rpn import label_and_sample_anchors, rpn_losses, rpn_losses_from_labels
from regionclip_jax.models.rpn import RPN

BLOCKS_R50 = (3, 4, 6, 3)
PIXEL_MEAN_BGR = np.array([103.530, 116.280, 123.675], np.float32)
CANVAS = (64, 96)
IMAGE_HW = np.array([[64, 96], [50, 70]], np.int32)


# ---------------------------------------------------------------------------------------------
# A random detectron2 checkpoint, written from detectron2's module names.


def _conv(rng, sd, key, cin, cout, k, gain=1.0, bias=False):
    sd[key + ".weight"] = (
        rng.standard_normal((cout, cin, k, k)) * gain * math.sqrt(2.0 / (cin * k * k))
    ).astype(np.float32)
    if bias:
        sd[key + ".bias"] = rng.normal(0.0, 0.1, cout).astype(np.float32)


def _norm(rng, sd, key, c, scale=1.0, tracked=False):
    sd[key + ".norm.weight"] = (rng.uniform(0.5, 1.0, c) * scale).astype(np.float32)
    sd[key + ".norm.bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
    sd[key + ".norm.running_mean"] = rng.normal(0.0, 0.1, c).astype(np.float32)
    sd[key + ".norm.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    if tracked:
        sd[key + ".norm.num_batches_tracked"] = np.array(7, np.int64)


def detectron2_state_dict(kind, base_width=8, num_convs=1, fpn_norm=False, seed=0):
    """`model` dict of a detectron2 R50 RPN (C4: res2-res4; FPN: res2-res5 + FPN + p6)."""
    rng = np.random.default_rng(seed)
    sd = {}
    bb = "backbone.bottom_up." if kind == "fpn" else "backbone."
    n_stages = 4 if kind == "fpn" else 3
    _conv(rng, sd, bb + "stem.conv1", 3, base_width, 7, gain=0.02)  # inputs are ~100
    _norm(rng, sd, bb + "stem.conv1", base_width, tracked=fpn_norm)
    cin = base_width
    for i in range(n_stages):
        mid, out = base_width * 2**i, 4 * base_width * 2**i
        for j in range(BLOCKS_R50[i]):
            p = f"{bb}res{i + 2}.{j}"
            if j == 0:
                _conv(rng, sd, p + ".shortcut", cin, out, 1)
                _norm(rng, sd, p + ".shortcut", out, tracked=fpn_norm)
            _conv(rng, sd, p + ".conv1", cin, mid, 1)
            _conv(rng, sd, p + ".conv2", mid, mid, 3)
            _conv(rng, sd, p + ".conv3", mid, out, 1)
            for c, n, s in (("conv1", mid, 1.0), ("conv2", mid, 1.0), ("conv3", out, 0.3)):
                _norm(rng, sd, f"{p}.{c}", n, scale=s, tracked=fpn_norm)
            cin = out
    head_in = cin
    if kind == "fpn":
        head_in = 16
        for level in range(2, 6):
            c = 4 * base_width * 2 ** (level - 2)
            for name, ci, k in (("lateral", c, 1), ("output", head_in, 3)):
                key = f"backbone.fpn_{name}{level}"
                _conv(rng, sd, key, ci, head_in, k, bias=not fpn_norm)
                if fpn_norm:
                    _norm(rng, sd, key, head_in, tracked=True)
    num_anchors = 15 if kind == "c4" else 3
    head = "proposal_generator.rpn_head."
    convs = ["conv"] if num_convs == 1 else [f"conv.conv{k}" for k in range(num_convs)]
    for name in convs:
        _conv(rng, sd, head + name, head_in, head_in, 3, bias=True)
    _conv(rng, sd, head + "objectness_logits", head_in, num_anchors, 1, gain=1.0, bias=True)
    _conv(rng, sd, head + "anchor_deltas", head_in, 4 * num_anchors, 1, gain=0.2, bias=True)
    # Some huge width/height deltas: exercises the scale clamp log(1000/16).
    sd[head + "anchor_deltas.bias"][2::8] = 5.0
    # Entries a detectron2 model file also holds; the RPN loader ignores them.
    sd["roi_heads.box_predictor.cls_score.weight"] = np.zeros((3, 4), np.float32)
    sd["pixel_mean"] = PIXEL_MEAN_BGR.reshape(3, 1, 1)
    return sd


def _images(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (len(IMAGE_HW), *CANVAS, 3)).astype(np.float32)
    for b, (h, w) in enumerate(IMAGE_HW):
        x[b, h:] = 0.0
        x[b, :, w:] = 0.0
    return x


# ---------------------------------------------------------------------------------------------
# NumPy references: anchors, decoding, greedy NMS, detectron2's proposal selection.


def np_anchors(feature_hw, stride, sizes, ratios):
    """detectron2 DefaultAnchorGenerator (offset 0): (y, x, size, ratio) order, ratio fastest."""
    cells = []
    for s in sizes:
        for r in ratios:
            w = math.sqrt(s * s / r)
            h = r * w
            cells.append([-w / 2, -h / 2, w / 2, h / 2])
    cells = np.array(cells, np.float32)
    h, w = feature_hw
    out = []
    for y in range(h):
        for x in range(w):
            out.append(cells + np.array([x, y, x, y], np.float32) * stride)
    return np.concatenate(out).astype(np.float32)


def np_decode(deltas, anchors):
    """Box2BoxTransform(1, 1, 1, 1).apply_deltas, scale clamp log(1000 / 16)."""
    clamp = math.log(1000.0 / 16)
    aw = anchors[:, 2] - anchors[:, 0]
    ah = anchors[:, 3] - anchors[:, 1]
    cx = anchors[:, 0] + 0.5 * aw
    cy = anchors[:, 1] + 0.5 * ah
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw, dh = np.minimum(deltas[..., 2], clamp), np.minimum(deltas[..., 3], clamp)
    pcx, pcy = dx * aw + cx, dy * ah + cy
    pw, ph = np.exp(dw) * aw, np.exp(dh) * ah
    return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], -1)


def np_nms(boxes, scores, thr):
    """torchvision.ops.nms: greedy by decreasing score (stable), suppress IoU > thr."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep, dead = [], np.zeros(len(boxes), bool)
    for i in order:
        if dead[i]:
            continue
        keep.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[:, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[:, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[:, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = np.maximum(xx2 - xx1, 0) * np.maximum(yy2 - yy1, 0)
        dead |= inter / (area[i] + area - inter) > thr
    return np.array(keep, np.int64)


def np_find_top(props, logits, hw, thr, pre, post, min_size):
    """detectron2 find_top_rpn_proposals for one image (inference)."""
    bx, sc, lv = [], [], []
    for level, (p, s) in enumerate(zip(props, logits)):
        k = min(pre, len(s))
        idx = np.argsort(-s, kind="stable")[:k]
        bx.append(p[idx])
        sc.append(s[idx])
        lv.append(np.full(k, level))
    bx, sc, lv = np.concatenate(bx), np.concatenate(sc), np.concatenate(lv)
    h, w = hw
    bx = np.stack(
        [
            np.clip(bx[:, 0], 0, w),
            np.clip(bx[:, 1], 0, h),
            np.clip(bx[:, 2], 0, w),
            np.clip(bx[:, 3], 0, h),
        ],
        -1,
    )
    ok = ((bx[:, 2] - bx[:, 0]) > min_size) & ((bx[:, 3] - bx[:, 1]) > min_size)
    bx, sc, lv = bx[ok], sc[ok], lv[ok]
    keep = []
    for level in np.unique(lv):
        (ids,) = np.nonzero(lv == level)
        keep += list(ids[np_nms(bx[ids], sc[ids], thr)])
    keep = np.array(keep, np.int64)
    keep = keep[np.argsort(-sc[keep], kind="stable")][:post]
    return bx[keep], sc[keep]


def _assert_proposals(got, want_boxes, want_logits, rtol=1e-4):
    boxes, logits, valid = (np.asarray(a) for a in got)
    for b in range(len(want_boxes)):
        n = len(want_logits[b])
        assert valid[b].sum() == n, (b, valid[b].sum(), n)
        assert valid[b, :n].all()
        np.testing.assert_allclose(logits[b, :n], want_logits[b], rtol=rtol, atol=rtol)
        scale = max(1.0, float(np.abs(want_boxes[b]).max()))
        np.testing.assert_allclose(boxes[b, :n], want_boxes[b], rtol=rtol, atol=rtol * scale)
        assert np.all(boxes[b, n:] == 0) and np.all(np.isneginf(logits[b, n:]))


# ---------------------------------------------------------------------------------------------
# (a) A torch.nn.functional / torchvision network with the same weights.


def _torch_rpn(sd, kind, images, image_hw, pre, post, thr):
    import torch
    import torch.nn.functional as F
    import torchvision

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items() if k != "pixel_mean"}

    def conv(x, key, **kw):
        return F.conv2d(x, t[key + ".weight"], t.get(key + ".bias"), **kw)

    def norm(x, key):
        if key + ".norm.weight" not in t:
            return x
        scale = t[key + ".norm.weight"] / torch.sqrt(t[key + ".norm.running_var"] + 1e-5)
        shift = t[key + ".norm.bias"] - t[key + ".norm.running_mean"] * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    # ImageList: normalise each image (BGR minus the mean), then zero-pad to the canvas.
    batch = torch.zeros(len(images), 3, *CANVAS)
    for b, (h, w) in enumerate(image_hw):
        img = torch.from_numpy(images[b, :h, :w, ::-1].copy()).permute(2, 0, 1)
        batch[b, :, :h, :w] = img - torch.from_numpy(PIXEL_MEAN_BGR)[:, None, None]

    bb = "backbone.bottom_up." if kind == "fpn" else "backbone."
    x = F.relu(norm(conv(batch, bb + "stem.conv1", stride=2, padding=3), bb + "stem.conv1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    feats = {}
    for i in range(4 if kind == "fpn" else 3):
        for j in range(BLOCKS_R50[i]):
            p = f"{bb}res{i + 2}.{j}"
            s = 2 if (i > 0 and j == 0) else 1  # stride_in_1x1: the stride sits in conv1
            y = F.relu(norm(conv(x, p + ".conv1", stride=s), p + ".conv1"))
            y = F.relu(norm(conv(y, p + ".conv2", padding=1), p + ".conv2"))
            y = norm(conv(y, p + ".conv3"), p + ".conv3")
            if p + ".shortcut.weight" in t:
                x = norm(conv(x, p + ".shortcut", stride=s), p + ".shortcut")
            x = F.relu(y + x)
        feats[f"res{i + 2}"] = x
    if kind == "c4":
        levels, strides = [feats["res4"]], [16]
        sizes = [(32, 64, 128, 256, 512)]
    else:
        key = "backbone.fpn_lateral5"
        prev = norm(conv(feats["res5"], key), key)
        levels = [norm(conv(prev, "backbone.fpn_output5", padding=1), "backbone.fpn_output5")]
        for lvl in (4, 3, 2):
            lat = norm(
                conv(feats[f"res{lvl}"], f"backbone.fpn_lateral{lvl}"), f"backbone.fpn_lateral{lvl}"
            )
            prev = lat + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            key = f"backbone.fpn_output{lvl}"
            levels.insert(0, norm(conv(prev, key, padding=1), key))
        levels.append(F.max_pool2d(levels[-1], kernel_size=1, stride=2, padding=0))
        strides = [4, 8, 16, 32, 64]
        sizes = [(32,), (64,), (128,), (256,), (512,)]

    head = "proposal_generator.rpn_head."
    convs = sorted(k[:-7] for k in t if k.startswith(head + "conv") and k.endswith(".weight"))
    props, logits = [], []
    for feat, stride, sz in zip(levels, strides, sizes):
        h = feat
        for c in convs:
            h = F.relu(conv(h, c, padding=1))
        n, _, fh, fw = feat.shape
        lg = conv(h, head + "objectness_logits").permute(0, 2, 3, 1).flatten(1)
        dl = conv(h, head + "anchor_deltas")
        dl = dl.view(n, -1, 4, fh, fw).permute(0, 3, 4, 1, 2).flatten(1, -2)
        anchors = np_anchors((fh, fw), stride, sz, (0.5, 1.0, 2.0))
        props.append(np_decode(dl.numpy().astype(np.float64), anchors.astype(np.float64)))
        logits.append(lg.numpy())

    want_boxes, want_logits = [], []
    for b, (hh, ww) in enumerate(image_hw):
        bx, sc, lv = [], [], []
        for level, (p, s) in enumerate(zip(props, logits)):
            top = torch.topk(torch.from_numpy(s[b]), min(pre, s.shape[1]))
            bx.append(torch.from_numpy(p[b]).float()[top.indices])
            sc.append(top.values)
            lv.append(torch.full((len(top.values),), level))
        bx, sc, lv = torch.cat(bx), torch.cat(sc), torch.cat(lv)
        bx[:, 0::2] = bx[:, 0::2].clamp(0, int(ww))
        bx[:, 1::2] = bx[:, 1::2].clamp(0, int(hh))
        ok = ((bx[:, 2] - bx[:, 0]) > 0) & ((bx[:, 3] - bx[:, 1]) > 0)
        bx, sc, lv = bx[ok], sc[ok], lv[ok]
        keep = torchvision.ops.batched_nms(bx, sc, lv, thr)[:post]
        want_boxes.append(bx[keep].numpy())
        want_logits.append(sc[keep].numpy())
    features = [f.permute(0, 2, 3, 1).numpy() for f in levels]
    return features, want_boxes, want_logits


@pytest.mark.torch_ref
@pytest.mark.parametrize(
    "kind,num_convs,fpn_norm",
    [("c4", 1, False), ("fpn", 2, True)],  # R50-C4 (COCO) and the LSJ R50-FPN (LVIS)
)
def test_checkpoint_loads_and_matches_torch(kind, num_convs, fpn_norm):
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    sd = detectron2_state_dict(kind, num_convs=num_convs, fpn_norm=fpn_norm)
    arch = infer_rpn_architecture(sd)
    assert (arch["kind"], arch["depth"], arch["base_width"]) == (kind, 50, 8)
    assert (arch["num_convs"], arch["fpn_norm"]) == (num_convs, fpn_norm)
    pre, post, thr = (6000, 100, 0.7) if kind == "c4" else (200, 150, 0.7)
    fpn_channels = {"fpn_channels": 16} if kind == "fpn" else {}
    model = rpn_from_detectron2(
        {"model": sd}, kind, pre_nms_topk=pre, post_nms_topk=post, nms_thresh=thr, **fpn_channels
    )
    images = _images()

    @nnx.jit
    def run(m, x, hw):
        return m.features(x, hw), m(x, hw)

    feats, got = run(model, jnp.asarray(images), jnp.asarray(IMAGE_HW))
    want_feats, want_boxes, want_logits = _torch_rpn(sd, kind, images, IMAGE_HW, pre, post, thr)
    assert len(feats) == len(want_feats)
    for f, w in zip(feats, want_feats):
        assert f.shape == w.shape
        np.testing.assert_allclose(np.asarray(f), w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    _assert_proposals(got, want_boxes, want_logits)
    assert np.asarray(got[2]).sum(axis=1).min() > 20  # a real comparison, not empty outputs


def test_plain_fpn_keys_infer_and_load():
    """The detectron2 R50-FPN (`rpn_lvis_866.pth`) names, and RegionCLIP's `offline_` prefix."""
    sd = detectron2_state_dict("fpn")
    merged = {"offline_" + k: v for k, v in sd.items() if k.startswith(("backbone", "proposal"))}
    merged["backbone.layer1.0.conv1.weight"] = np.zeros((1,), np.float32)  # the CLIP student
    arch = infer_rpn_architecture(merged)
    assert arch == dict(
        kind="fpn",
        depth=50,
        base_width=8,
        num_convs=1,
        fpn_norm=False,
        stride_in_1x1=True,
        anchor_sizes=[32.0, 64.0, 128.0, 256.0, 512.0],
        aspect_ratios=[0.5, 1.0, 2.0],
        pre_nms_topk=1000,
        post_nms_topk=1000,
        nms_thresh=0.7,
    )
    model = rpn_from_detectron2(merged, fpn_channels=16)
    np.testing.assert_array_equal(
        np.asarray(model.fpn.fpn_output3.kernel[...]),
        sd["backbone.fpn_output3.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(model.backbone.res5[2].conv3.norm.var[...]),
        sd["backbone.bottom_up.res5.2.conv3.norm.running_var"],
    )
    assert model.strides == (4, 8, 16, 32, 64) and model.anchor_generator.num_anchors == [3] * 5


def test_mismatched_checkpoint_errors_name_the_keys():
    sd = detectron2_state_dict("c4")
    model = rpn_from_detectron2(sd)
    bad = dict(sd)
    del bad["backbone.res3.1.conv2.norm.running_var"]
    bad["backbone.res4.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    bad["proposal_generator.rpn_head.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ValueError) as e:
        load_detectron2_rpn(bad, model)
    msg = str(e.value)
    assert "missing key 'backbone.res3.1.conv2.norm.running_var'" in msg
    assert "backbone.res4.0.conv1.weight: expected shape (32, 64, 1, 1), found (3, 3, 1, 1)" in msg
    assert "unexpected key 'proposal_generator.rpn_head.extra.weight'" in msg
    assert "roi_heads" not in msg and "pixel_mean" not in msg
    with pytest.raises(ValueError, match="asked for a 'fpn' RPN"):
        rpn_from_detectron2(sd, "fpn")


# ---------------------------------------------------------------------------------------------
# (b) Decoding, top-k, NMS: NumPy formulas on a head over given features.


def _features_rpn(**kw):
    model = RPN(
        "features",
        in_channels=8,
        strides=(8, 16),
        anchor_sizes=((16, 40), (64, 100)),
        aspect_ratios=(0.5, 1.0, 2.0),
        rngs=nnx.Rngs(0),
        **kw,
    )
    rng = np.random.default_rng(3)
    head = model.rpn_head
    head.objectness_logits.kernel[...] = jnp.asarray(rng.normal(0, 0.5, (1, 1, 8, 6)), jnp.float32)
    dk = rng.normal(0, 0.3, (1, 1, 8, 24))
    head.anchor_deltas.kernel[...] = jnp.asarray(dk, jnp.float32)
    bias = rng.normal(0, 0.3, 24)
    bias[3::8] = 6.0  # dh beyond the clamp for half of the anchors
    head.anchor_deltas.bias[...] = jnp.asarray(bias, jnp.float32)
    return model


def test_decoding_topk_nms_match_numpy():
    model = _features_rpn(pre_nms_topk=40, post_nms_topk=60, nms_thresh=0.6, min_box_size=3.0)
    rng = np.random.default_rng(4)
    feats = [
        jnp.asarray(rng.standard_normal((2, 8, 12, 8)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 4, 6, 8)), jnp.float32),
    ]
    got = nnx.jit(lambda m, f, hw: m.from_features(f, hw))(model, feats, jnp.asarray(IMAGE_HW))
    logits, deltas = model.rpn_head(feats)  # the head itself is checked against torch above
    anchors = [
        np_anchors((8, 12), 8, (16, 40), (0.5, 1.0, 2.0)),
        np_anchors((4, 6), 16, (64, 100), (0.5, 1.0, 2.0)),
    ]
    want_boxes, want_logits = [], []
    for b in range(2):
        props = [np_decode(np.asarray(d[b]), a) for d, a in zip(deltas, anchors)]
        bx, sc = np_find_top(
            props, [np.asarray(lg[b]) for lg in logits], IMAGE_HW[b], 0.6, 40, 60, 3.0
        )
        want_boxes.append(bx)
        want_logits.append(sc)
    # Candidates are 80 per image (40 per level): some are suppressed, some filtered by size.
    assert 10 < len(want_logits[1]) < 60 and len(want_logits[1]) < len(want_logits[0])
    _assert_proposals(got, want_boxes, want_logits, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (c) Losses: NumPy transcription of detectron2's RPN.label_and_sample_anchors + RPN.losses.


def np_iou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return np.where(inter > 0, inter / (area_a[:, None] + area_b[None] - inter), 0.0)


def np_match(anchors, gt):
    """Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True); no GT: all 0."""
    if len(gt) == 0:
        return np.zeros(len(anchors), np.int64), np.zeros(len(anchors), np.int64)
    q = np_iou(gt, anchors)
    best, idx = q.max(0), q.argmax(0)
    labels = np.where(best < 0.3, 0, np.where(best < 0.7, -1, 1))
    labels[np.nonzero(q == q.max(1, keepdims=True))[1]] = 1
    return idx, labels


def np_deltas(src, tgt):
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    dx = (tgt[:, 0] + 0.5 * tw - src[:, 0] - 0.5 * sw) / sw
    dy = (tgt[:, 1] + 0.5 * th - src[:, 1] - 0.5 * sh) / sh
    return np.stack([dx, dy, np.log(tw / sw), np.log(th / sh)], -1)


def np_rpn_loss(anchors, logits, deltas, labels, matched_idx, gts, normalizer):
    cls = loc = 0.0
    for b in range(len(labels)):
        ok = labels[b] >= 0
        x, y = logits[b][ok].astype(np.float64), (labels[b][ok] == 1).astype(np.float64)
        cls += np.sum(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
        pos = labels[b] == 1
        if pos.any():
            tgt = np_deltas(anchors[pos], gts[b][matched_idx[b][pos]])
            loc += np.abs(deltas[b][pos] - tgt).sum()
    return cls / normalizer, loc / normalizer


def _loss_inputs():
    rng = np.random.default_rng(5)
    anchors = np.concatenate(
        [np_anchors((8, 12), 8, (16, 40), (0.5, 1.0, 2.0)), np_anchors((4, 6), 16, (64,), (1.0,))]
    )
    n = len(anchors)
    gt = np.zeros((3, 4, 4), np.float32)
    gt[0, :3] = [[10, 12, 40, 50], [50, 5, 90, 30], [30, 30, 37, 36]]  # a small one: low quality
    gt[2, :2] = [[0, 0, 96, 64], [60, 40, 94, 63]]
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)  # image 1: no GT
    logits = rng.normal(0, 2, (3, n)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (3, n, 4)).astype(np.float32)
    return anchors, gt, mask, logits, deltas


def test_rpn_loss_matches_numpy_when_sampling_keeps_everything():
    anchors, gt, mask, logits, deltas = _loss_inputs()
    n = len(anchors)
    big = 4 * n  # every labelled anchor is sampled: deterministic
    got = jax.jit(lambda *a: rpn_losses(*a, batch_size_per_image=big, positive_fraction=0.5))(
        anchors, logits, deltas, gt, mask, jax.random.key(0)
    )
    labels, idx = zip(*[np_match(anchors, gt[b][mask[b]])[::-1] for b in range(3)])
    labels, idx = np.stack(labels), np.stack(idx)
    assert (labels == 1).sum() > 5 and (labels == -1).sum() > 5 and (labels[1] == 0).all()
    gts = [gt[b][mask[b]] for b in range(3)]
    cls, loc = np_rpn_loss(anchors, logits, deltas, labels, idx, gts, big * 3)
    np.testing.assert_allclose(float(got["loss_rpn_cls"]), cls, rtol=1e-5)
    np.testing.assert_allclose(float(got["loss_rpn_loc"]), loc, rtol=1e-5)


def test_rpn_loss_default_sampling_and_gradients():
    anchors, gt, mask, logits, deltas = _loss_inputs()
    key = jax.random.key(1)
    labels, matched = label_and_sample_anchors(anchors, gt, mask, key, batch_size_per_image=64)
    labels = np.asarray(labels)
    for b in range(3):
        _, full = np_match(anchors, gt[b][mask[b]])
        n_pos = min((full == 1).sum(), 32)
        n_neg = min((full == 0).sum(), 64 - n_pos)
        assert (labels[b] == 1).sum() == n_pos and (labels[b] == 0).sum() == n_neg
        assert np.all(full[labels[b] == 1] == 1) and np.all(full[labels[b] == 0] == 0)
    idx = np.stack([np_match(anchors, gt[b][mask[b]])[0] for b in range(3)])
    gts = [gt[b][mask[b]] if mask[b].any() else np.zeros((1, 4)) for b in range(3)]
    cls, loc = np_rpn_loss(anchors, logits, deltas, labels, idx, gts, 64 * 3)

    def loss(lg, dl):
        out = rpn_losses_from_labels(
            jnp.asarray(anchors), lg, dl, jnp.asarray(labels), matched, batch_size_per_image=64
        )
        return out["loss_rpn_cls"] + out["loss_rpn_loc"], out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(logits, deltas)
    np.testing.assert_allclose(float(out["loss_rpn_cls"]), cls, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_rpn_loc"]), loc, rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    # Only sampled anchors get a gradient.
    np.testing.assert_array_equal(np.asarray(grads[0]) != 0, labels >= 0)


def test_rpn_module_losses_on_features():
    """`RPN.losses_from_features` = rpn_losses on its head outputs and concatenated anchors."""
    model = _features_rpn()
    rng = np.random.default_rng(6)
    feats = [
        jnp.asarray(rng.standard_normal((3, 8, 12, 8)), jnp.float32),
        jnp.asarray(rng.standard_normal((3, 4, 6, 8)), jnp.float32),
    ]
    _, gt, mask, _, _ = _loss_inputs()
    hw = jnp.asarray([[64, 96]] * 3)
    key = jax.random.key(2)
    got = model.losses_from_features(feats, hw, gt, mask, key)
    logits, deltas = model.rpn_head(feats)
    anchors = np.concatenate(
        [
            np_anchors((8, 12), 8, (16, 40), (0.5, 1.0, 2.0)),
            np_anchors((4, 6), 16, (64, 100), (0.5, 1.0, 2.0)),
        ]
    )
    want = rpn_losses(
        anchors, jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1), gt, mask, key
    )
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6)
    assert float(got["loss_rpn_loc"]) > 0
