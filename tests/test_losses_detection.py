"""Fast R-CNN losses vs float64 NumPy references written from spec §5.3–5.4.

The references loop over the sampled RoIs of the original (only the real ones, as a list) and
use the literal formulas: softmax, CE = −log p_y, (1 − p_y)^γ, Detectron2's box encoding.
One torch test checks the same against `F.cross_entropy(weight=)` and autograd on the original's
`focal_loss` formula.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regionclip_jax.losses import box_regression_loss, fast_rcnn_classification_loss

K = 6  # foreground classes; background = K
N = 40
RTOL, ATOL = 1e-4, 1e-6


# ----------------------------------------------------------------------------- references


def ref_cls_loss(logits, labels, valid, mode, bg_weight, gamma=0.0):
    """Spec §5.3. coco: mean_i CE_i (1 − p_i,y)^γ w_i; lvis: Σ w_i CE_i / Σ w_i."""
    num, den = 0.0, 0.0
    for z, y, ok in zip(logits.astype(np.float64), labels, valid):
        if not ok or y < 0:
            continue
        e = np.exp(z - z.max())
        p = e / e.sum()
        ce = -np.log(p[y])
        w = bg_weight if y == len(z) - 1 else 1.0
        if mode == "coco":
            num += ce * (1.0 - p[y]) ** gamma * w
            den += 1.0
        else:
            num += w * ce
            den += w
    return num / den if den > 0 else 0.0


def ref_encode(src, tgt, weights=(10.0, 10.0, 5.0, 5.0)):
    """Detectron2 Box2BoxTransform.get_deltas for one pair of xyxy boxes."""
    wx, wy, ww, wh = weights
    sw, sh = src[2] - src[0], src[3] - src[1]
    tw, th = tgt[2] - tgt[0], tgt[3] - tgt[1]
    scx, scy = src[0] + 0.5 * sw, src[1] + 0.5 * sh
    tcx, tcy = tgt[0] + 0.5 * tw, tgt[1] + 0.5 * th
    return np.array(
        [wx * (tcx - scx) / sw, wy * (tcy - scy) / sh, ww * np.log(tw / sw), wh * np.log(th / sh)]
    )


def ref_box_loss(deltas, proposals, gt, labels, valid, num_classes, beta=0.0, weights=None):
    """Spec §5.4: Σ_fg smooth-L1(pred − target) / #sampled RoIs."""
    total, count = 0.0, 0
    for i in range(len(labels)):
        if not valid[i] or labels[i] < 0:
            continue
        count += 1
        if labels[i] >= num_classes:
            continue
        d = deltas[i].astype(np.float64)
        if d.shape[0] != 4:
            d = d.reshape(num_classes, 4)[labels[i]]
        w = (10.0, 10.0, 5.0, 5.0) if weights is None else weights
        diff = np.abs(d - ref_encode(proposals[i].astype(np.float64), gt[i].astype(np.float64), w))
        if beta > 0:
            diff = np.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
        total += diff.sum()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- data


def make_rois(seed=0, scale=3.0):
    """Logits (scale · N(0,1), like cosines/τ), labels: fg, bg (=K), padded (-1, or valid=False)."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(N, K + 1))).astype(np.float32)
    labels = rng.integers(0, K + 1, N).astype(np.int32)
    labels[rng.random(N) < 0.4] = K  # plenty of background
    labels[:3] = -1  # padded by label
    valid = np.ones(N, bool)
    valid[3:6] = False  # padded by mask (labels look real)
    logits[:6] = np.nan  # padded rows hold garbage
    return logits, labels, valid


cls_loss = jax.jit(fast_rcnn_classification_loss, static_argnames=("mode",))


# ----------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    "mode,bg_weight,gamma",
    [("coco", None, None), ("coco", 0.5, 1.5), ("lvis", None, None), ("lvis", 0.3, None)],
)
def test_classification_matches_reference(mode, bg_weight, gamma):
    logits, labels, valid = make_rois()
    ours = cls_loss(logits, labels, valid, mode=mode, bg_weight=bg_weight, focal_gamma=gamma)
    default_bg = {"coco": 0.2, "lvis": 0.8}[mode]
    ref = ref_cls_loss(
        logits,
        labels,
        valid,
        mode,
        default_bg if bg_weight is None else bg_weight,
        (0.5 if gamma is None else gamma) if mode == "coco" else 0.0,
    )
    assert ref > 0.1
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)


def test_gamma_zero_reduces_to_cross_entropy():
    """γ = 0: coco = Σ w_i CE_i / N (= plain CE mean for w = 1); lvis with w = 1 is plain CE."""
    logits, labels, valid = make_rois(1)
    ok = valid & (labels >= 0)
    z = logits[ok].astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    ce = lse - z[np.arange(z.shape[0]), labels[ok]]
    w = np.where(labels[ok] == K, 0.2, 1.0)
    plain = float(ce.mean())
    f = functools.partial(cls_loss, logits, labels, valid)
    np.testing.assert_allclose(float(f(mode="coco", bg_weight=1.0, focal_gamma=0.0)), plain, RTOL)
    np.testing.assert_allclose(float(f(mode="lvis", bg_weight=1.0)), plain, RTOL)
    np.testing.assert_allclose(
        float(f(mode="coco", bg_weight=0.2, focal_gamma=0.0)), (w * ce).mean(), RTOL
    )
    np.testing.assert_allclose(float(f(mode="lvis", bg_weight=0.2)), (w * ce).sum() / w.sum(), RTOL)


@pytest.mark.parametrize("overlap", [0.8, 0.7])
@pytest.mark.parametrize("seed", range(4))
def test_small_classification_loss_is_exact_to_float32_rounding(overlap, seed):
    """Cosine logits at τ = 0.01 of RoIs that are clearly their class (CE ~1e-4 and ~1e-6): the
    log_softmax form is off by less than one ulp of 1.0 (logsumexp − z_y of the unshifted ~100
    logits lost up to the ulp of 100)."""
    from test_losses_pretrain import F32_EPS, confident_pairs

    f, g = confident_pairs(overlap, seed)  # 7 RoIs, 6 classes + background
    f, g = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (f, g))
    logits = (f @ g.T / 0.01).astype(np.float32)
    labels, valid = np.arange(7, dtype=np.int32), np.ones(7, bool)
    for mode, gamma in (("lvis", None), ("coco", 0.0)):  # both the plain CE mean here
        ref = ref_cls_loss(logits, labels, valid, mode, 1.0)
        assert 1e-7 < ref < 1e-3
        ours = cls_loss(logits, labels, valid, mode=mode, bg_weight=1.0, focal_gamma=gamma)
        assert abs(float(ours) - ref) < F32_EPS, mode


def test_background_only_and_empty():
    logits, labels, valid = make_rois(2)
    labels = np.where(labels >= 0, K, labels)  # every real RoI is background
    ref_c = ref_cls_loss(logits, labels, valid, "coco", 0.2, 0.5)
    ref_l = ref_cls_loss(logits, labels, valid, "lvis", 0.8)
    np.testing.assert_allclose(float(cls_loss(logits, labels, valid, mode="coco")), ref_c, RTOL)
    # All weights equal: the LVIS weighted mean is the plain mean (bg weight cancels).
    np.testing.assert_allclose(float(cls_loss(logits, labels, valid, mode="lvis")), ref_l, RTOL)
    assert ref_l == pytest.approx(ref_cls_loss(logits, labels, valid, "lvis", 1.0))
    # No valid RoI at all: 0 with zero, finite gradients.
    for mode in ("coco", "lvis"):
        fn = jax.jit(
            jax.value_and_grad(functools.partial(fast_rcnn_classification_loss, mode=mode))
        )
        val, g = fn(logits, np.full(N, -1, np.int32), valid)
        assert float(val) == 0.0
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_batched_leading_dims_and_bf16():
    logits, labels, valid = make_rois(3)
    logits16 = jnp.asarray(logits, jnp.bfloat16)
    ours = cls_loss(
        logits16.reshape(4, N // 4, K + 1), labels.reshape(4, -1), valid.reshape(4, -1), mode="coco"
    )
    assert ours.dtype == jnp.float32
    rounded = np.asarray(logits16.astype(jnp.float32))
    ref = ref_cls_loss(rounded, labels, valid, "coco", 0.2, 0.5)
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)
    # valid=None: the labels alone define padding.
    ours = cls_loss(np.nan_to_num(logits), labels, None, mode="lvis")
    ref = ref_cls_loss(np.nan_to_num(logits), labels, np.ones(N, bool), "lvis", 0.8)
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL)


def test_focal_gradient_not_detached():
    """The focal factor carries gradient, as in the original: jax.grad matches central
    differences of the float64 reference, and differs from the detached-factor gradient."""
    logits, labels, valid = make_rois(4, scale=2.0)
    grad = np.asarray(
        jax.jit(jax.grad(functools.partial(fast_rcnn_classification_loss, mode="coco")))(
            logits, labels, valid
        )
    )
    ok = valid & (labels >= 0)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[~ok], 0.0)
    rng = np.random.default_rng(0)
    dz = np.where(ok[:, None], rng.normal(size=logits.shape), 0.0)
    z0 = np.where(ok[:, None], logits.astype(np.float64), 0.0)
    h = 1e-6

    def f(eps):
        return ref_cls_loss(z0 + eps * dz, labels, valid, "coco", 0.2, 0.5)

    fd = (f(h) - f(-h)) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * dz), fd, rtol=1e-3)

    # Detached factor: d/dz [CE · stop_grad((1-p)^γ) · w] — must not match.
    p = np.exp(z0 - z0.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(K + 1)[np.clip(labels, 0, K)]
    fac = (1 - (p * onehot).sum(1)) ** 0.5 * np.where(labels == K, 0.2, 1.0)
    g_det = np.where(ok[:, None], (p - onehot) * fac[:, None], 0.0) / ok.sum()
    assert abs(np.sum(g_det * dz) - fd) > 1e-2 * abs(fd)


def test_focal_confident_rois_have_finite_gradient():
    """p_y rounds to 1 in fp32 (margin 100 logits): the literal (1−p)^0.5 would give 0·∞ = nan."""
    logits = np.zeros((4, K + 1), np.float32)
    labels = np.array([0, 1, K, 2], np.int32)
    logits[np.arange(4), labels] = 100.0
    val, g = jax.jit(
        jax.value_and_grad(functools.partial(fast_rcnn_classification_loss, mode="coco"))
    )(logits, labels)
    assert np.isfinite(float(val)) and float(val) < 1e-20
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.torch_ref
def test_classification_vs_torch():
    """LVIS = torch F.cross_entropy(weight=); COCO value and gradient = autograd through the
    original's focal_loss formula (softmax p_t with gradient, CE, (1−p_t)^γ, bg weight, mean)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, labels, valid = make_rois(5)
    ok = valid & (labels >= 0)
    zt = torch.tensor(logits[ok], dtype=torch.float64, requires_grad=True)
    yt = torch.tensor(labels[ok], dtype=torch.long)
    w = torch.ones(K + 1, dtype=torch.float64)
    w[-1] = 0.8
    lvis = F.cross_entropy(zt, yt, weight=w)
    ours = cls_loss(logits, labels, valid, mode="lvis")
    np.testing.assert_allclose(float(ours), lvis.item(), rtol=RTOL)

    ce = F.cross_entropy(zt, yt, reduction="none")
    p_t = F.softmax(zt, dim=-1)[torch.arange(zt.shape[0]), yt]
    loss = ce * (1 - p_t) ** 0.5
    lw = torch.ones_like(loss)
    lw[yt == K] = 0.2
    coco = (loss * lw).mean()
    coco.backward()
    val, g = jax.jit(
        jax.value_and_grad(functools.partial(fast_rcnn_classification_loss, mode="coco"))
    )(logits, labels, valid)
    np.testing.assert_allclose(float(val), coco.item(), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(g)[ok], zt.grad.numpy(), rtol=1e-3, atol=1e-6)


def test_mode_validation():
    logits, labels, valid = make_rois()
    with pytest.raises(ValueError, match="mode"):
        fast_rcnn_classification_loss(logits, labels, valid, mode="voc")
    with pytest.raises(ValueError, match="focal_gamma"):
        fast_rcnn_classification_loss(logits, labels, valid, mode="lvis", focal_gamma=0.5)


# ----------------------------------------------------------------------------- box regression


def make_boxes(seed=0, n=N):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 500, (n, 2))
    wh = rng.uniform(8, 200, (n, 2))
    proposals = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    gt = proposals + rng.normal(0, 10, (n, 4)).astype(np.float32)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 2.0)
    labels = rng.integers(0, K + 1, n).astype(np.int32)
    labels[:3] = -1
    valid = np.ones(n, bool)
    valid[3:5] = False
    bg = labels == K
    gt[bg] = 0.0  # Detectron2 leaves placeholder boxes on background RoIs: degenerate here
    proposals[:3] = 0.0  # padded slots: zero-area boxes
    deltas = rng.normal(0, 0.5, (n, 4)).astype(np.float32)
    return deltas, proposals, gt, labels, valid


box_loss = jax.jit(
    box_regression_loss, static_argnames=("num_classes", "weights", "smooth_l1_beta")
)


@pytest.mark.parametrize("beta,weights", [(0.0, None), (0.5, (1.0, 2.0, 3.0, 4.0))])
def test_box_regression_matches_reference(beta, weights):
    deltas, proposals, gt, labels, valid = make_boxes()
    kw = {} if weights is None else {"weights": weights}
    ours = box_loss(deltas, proposals, gt, labels, valid, num_classes=K, smooth_l1_beta=beta, **kw)
    ref = ref_box_loss(deltas, proposals, gt, labels, valid, K, beta, weights)
    assert ref > 0.1
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)


def test_box_regression_class_specific_and_batched():
    deltas, proposals, gt, labels, valid = make_boxes(1)
    rng = np.random.default_rng(1)
    spec = rng.normal(0, 0.5, (N, 4 * K)).astype(np.float32)
    ours = box_loss(
        spec.reshape(2, N // 2, 4 * K),
        proposals.reshape(2, -1, 4),
        gt.reshape(2, -1, 4),
        labels.reshape(2, -1),
        valid.reshape(2, -1),
        num_classes=K,
    )
    np.testing.assert_allclose(
        float(ours), ref_box_loss(spec, proposals, gt, labels, valid, K), rtol=RTOL
    )


def test_box_regression_gradient_and_empty_foreground():
    deltas, proposals, gt, labels, valid = make_boxes(2)
    deltas[:5] = np.nan  # padded rows hold garbage
    fn = jax.jit(jax.value_and_grad(functools.partial(box_regression_loss, num_classes=K)))
    _, g = fn(deltas, proposals, gt, labels, valid)
    g = np.asarray(g)
    fg = valid & (labels >= 0) & (labels < K)
    n_sampled = (valid & (labels >= 0)).sum()
    target = np.stack([ref_encode(p, t) for p, t in zip(proposals[fg], gt[fg])])
    np.testing.assert_allclose(g[fg], np.sign(deltas[fg] - target) / n_sampled, rtol=1e-6)
    np.testing.assert_array_equal(g[~fg], 0.0)
    # No foreground: 0 with zero gradient (background / padded only).
    only_bg = np.where(labels >= 0, K, -1).astype(np.int32)
    val, g = fn(deltas, proposals, gt, only_bg, valid)
    assert float(val) == 0.0
    np.testing.assert_array_equal(np.asarray(g), 0.0)
