"""Pretraining losses vs float64 NumPy references written from spec §4.2–4.5.

The references loop over the original's unit of work, one GPU = one group of images, and only
ever see the real regions of a group as a variable-length list (like the original), so padding,
masking and the static [G, gR, gR] layout of the code under test are checked, not re-used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regionclip_jax.losses import (
    concept_contrastive_loss,
    image_text_contrastive_loss,
    logits_with_background,
    pretrain_losses,
    region_distillation_loss,
    teacher_pseudo_labels,
)

TAU = 0.01
THETA = 0.1
B, R, D = 6, 5, 16
GROUP = 2  # 3 groups of 2 images
N_DISTINCT, N_DUP = 14, 20  # concepts: 14 distinct + 20 near-copies of one vector
C = N_DISTINCT + N_DUP
RTOL, ATOL = 2e-4, 2e-5


# ----------------------------------------------------------------------------- references


def _norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _groups(b, group_size):
    g = b if group_size is None else group_size
    return [list(range(s, s + g)) for s in range(0, b, g)]


def _group_regions(mask, images):
    """The real regions of a group's images, as (image, region) pairs in batch order."""
    return [(b, r) for b in images for r in range(mask.shape[1]) if mask[b, r]]


def ref_pseudo_labels(teacher, mask, concept, tau=TAU, theta=THETA, group_size=None):
    """Spec §4.2 per GPU: q = softmax(û L̂ᵀ/τ), keep = max q > θ, else keep all."""
    probs = np.zeros(mask.shape + (concept.shape[0],))
    labels = -np.ones(mask.shape, np.int64)
    keep = np.zeros(mask.shape, bool)
    for images in _groups(mask.shape[0], group_size):
        regs = _group_regions(mask, images)
        if not regs:
            continue
        u = np.stack([teacher[b, r] for b, r in regs]).astype(np.float64)
        q = _softmax(_norm(u) @ _norm(concept.astype(np.float64)).T / tau)
        k = q.max(1) > theta
        if not k.any():
            k = q.max(1) > 0.0
        for n, (b, r) in enumerate(regs):
            probs[b, r], labels[b, r], keep[b, r] = q[n], np.argmax(q[n]), k[n]
    return probs, labels, keep


def ref_distill(student, q_t, concept, keep, tau=TAU, group_size=None):
    """Spec §4.3: F.kl_div(log softmax_s, q_t, 'batchmean') per GPU, averaged over GPUs."""
    per_gpu = []
    for images in _groups(keep.shape[0], group_size):
        regs = _group_regions(keep, images)
        if not regs:
            continue
        v = np.stack([student[b, r] for b, r in regs]).astype(np.float64)
        t = np.stack([q_t[b, r] for b, r in regs]).astype(np.float64)
        log_qs = np.log(_softmax(_norm(v) @ _norm(concept.astype(np.float64)).T / tau))
        t_log_t = np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)
        per_gpu.append(np.sum(t_log_t - t * log_qs) / len(regs))
    return float(np.mean(per_gpu)) if per_gpu else 0.0


def ref_contrastive(student, labels, keep, concept, tau=TAU, group_size=None):
    """Spec §4.4: MIL CE over kept regions of one GPU, s_ij = v̂_i t̂_jᵀ/τ, M_ij = [y_i = y_j]."""
    per_gpu = []
    for images in _groups(keep.shape[0], group_size):
        regs = _group_regions(keep, images)
        if not regs:
            continue
        v = _norm(np.stack([student[b, r] for b, r in regs]).astype(np.float64))
        y = np.array([labels[b, r] for b, r in regs])
        t = _norm(concept.astype(np.float64)[y])
        p = _softmax(v @ t.T / tau)
        m = (y[:, None] == y[None, :]).astype(np.float64)
        per_gpu.append(np.mean(-np.log(np.sum(m * p, axis=1))))
    return float(np.mean(per_gpu)) if per_gpu else 0.0


def ref_img_txt(img, txt, tau=TAU, valid=None):
    """Spec §4.5: ½ (CE(S, arange) + CE(Sᵀ, arange)) over the real samples."""
    idx = np.arange(img.shape[0]) if valid is None else np.flatnonzero(valid)
    if idx.size == 0:
        return 0.0
    s = _norm(img[idx].astype(np.float64)) @ _norm(txt[idx].astype(np.float64)).T / tau
    n = np.arange(idx.size)
    row = -np.log(_softmax(s)[n, n]).mean()
    col = -np.log(_softmax(s.T)[n, n]).mean()
    return 0.5 * (row + col)


# ----------------------------------------------------------------------------- data


def make_batch(seed=0):
    """A [6, 5] region grid in 3 groups of 2 images that hits every masking case.

    Regions are "clear" (teacher feature near one distinct concept: max q ≈ 1, kept) or
    "ambiguous" (near the vector copied 20 times: max q < θ, not kept).
    - image 0: mixed clear/ambiguous + 1 padded; image 1: all ambiguous + 2 padded, but its
      group keeps image 0's regions, so image 1 has no kept region and no fallback (per group);
    - images 2, 3 (group 1): all ambiguous -> fallback keeps all their valid regions;
    - images 4, 5 (group 2): fully padded.
    Clear regions use concepts 0, 1, 0, so labels repeat (multiple positives).
    Padded slots hold NaN features (never read by the references).
    """
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(N_DISTINCT, D))
    dup = rng.normal(size=(1, D))
    # Slightly different copies: ambiguous regions still split q over ~20 concepts, without
    # exact ties (whose argmax would be implementation-defined).
    copies = dup + 0.08 * rng.normal(size=(N_DUP, D))
    concept = np.concatenate([distinct, copies]).astype(np.float32)
    mask = np.zeros((B, R), bool)
    mask[0, :4] = True
    mask[1, :3] = True
    mask[2, :5] = True
    mask[3, :2] = True
    clear = np.zeros((B, R), bool)
    clear[0, [0, 1, 3]] = True
    clear_concepts = iter([0, 1, 0])  # a repeated label and a distinct one
    teacher = np.full((B, R, D), np.nan, np.float32)
    for b in range(B):
        for r in range(R):
            if not mask[b, r]:
                continue
            base = distinct[next(clear_concepts)] if clear[b, r] else dup[0]
            teacher[b, r] = base + 0.05 * rng.normal(size=D)
    # Sanity of the data: no near-ties in the teacher's argmax (fp32 vs fp64 would disagree).
    logits = np.sort(_norm(teacher[mask].astype(np.float64)) @ _norm(concept).T / TAU, axis=1)
    assert (logits[:, -1] - logits[:, -2]).min() > 2e-4
    student = np.where(mask[..., None], 0.3 * teacher + rng.normal(size=(B, R, D)), np.nan).astype(
        np.float32
    )
    return dict(teacher=teacher, student=student, mask=mask, concept=concept, rng=rng)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


def _random_keep_labels(rng, mask, n_labels=4):
    keep = mask & (rng.random(mask.shape) < 0.7)
    labels = np.where(keep, rng.integers(0, n_labels, mask.shape), -1).astype(np.int32)
    return keep, labels


jit_pseudo = jax.jit(teacher_pseudo_labels, static_argnames="group_size")
jit_distill = jax.jit(region_distillation_loss, static_argnames="group_size")
jit_contrast = jax.jit(concept_contrastive_loss, static_argnames="group_size")
jit_img_txt = jax.jit(image_text_contrastive_loss)


# ----------------------------------------------------------------------------- pseudo labels


@pytest.mark.parametrize("group_size", [GROUP, None])
def test_pseudo_labels_match_reference(batch, group_size):
    out = jit_pseudo(
        batch["teacher"], batch["mask"], batch["concept"], TAU, THETA, group_size=group_size
    )
    probs, labels, keep = ref_pseudo_labels(
        batch["teacher"], batch["mask"], batch["concept"], group_size=group_size
    )
    np.testing.assert_array_equal(np.asarray(out["keep"]), keep)
    np.testing.assert_array_equal(np.asarray(out["labels"]), labels)
    np.testing.assert_allclose(np.asarray(out["probs"]), probs, rtol=RTOL, atol=ATOL)
    assert out["labels"].dtype == jnp.int32 and out["keep"].dtype == jnp.bool_


def test_pseudo_label_fallback_scope(batch):
    """The fallback is per group: group 1 keeps all its valid regions, image 1 (group 0) none."""
    keep = np.asarray(
        jit_pseudo(batch["teacher"], batch["mask"], batch["concept"], group_size=GROUP)["keep"]
    )
    mask = batch["mask"]
    assert keep[0].sum() == 3 and not keep[1].any()  # no fallback for image 1 alone
    np.testing.assert_array_equal(keep[2:4], mask[2:4])  # fallback in group 1
    assert not keep[4:].any()  # fully padded group
    # One group for the whole batch: image 0's kept regions prevent any fallback.
    keep_all = np.asarray(jit_pseudo(batch["teacher"], batch["mask"], batch["concept"])["keep"])
    assert keep_all.sum() == 3 and keep_all[0].sum() == 3


# ----------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("group_size", [GROUP, None])
def test_distillation_matches_reference(batch, group_size):
    probs, _, keep = ref_pseudo_labels(
        batch["teacher"], batch["mask"], batch["concept"], group_size=group_size
    )
    ours = jit_distill(
        batch["student"], probs.astype(np.float32), batch["concept"], keep, group_size=group_size
    )
    ref = ref_distill(batch["student"], probs, batch["concept"], keep, group_size=group_size)
    assert ref > 0.1
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)


def test_distillation_zero_when_student_equals_teacher(batch):
    probs, _, keep = ref_pseudo_labels(batch["teacher"], batch["mask"], batch["concept"])
    ours = jit_distill(batch["teacher"], probs.astype(np.float32), batch["concept"], keep)
    assert abs(float(ours)) < 1e-4


# ----------------------------------------------------------------------------- contrastive


@pytest.mark.parametrize("group_size", [GROUP, 3, None])
def test_contrastive_matches_reference(batch, group_size):
    keep, labels = _random_keep_labels(batch["rng"], batch["mask"])
    ours = jit_contrast(batch["student"], labels, keep, batch["concept"], group_size=group_size)
    ref = ref_contrastive(batch["student"], labels, keep, batch["concept"], group_size=group_size)
    assert ref > 0.1
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)


def test_contrastive_with_pseudo_labels_and_duplicates(batch):
    """Labels from the teacher: repeated concepts are multiple positives; fallback group included."""
    _, labels, keep = ref_pseudo_labels(
        batch["teacher"], batch["mask"], batch["concept"], group_size=GROUP
    )
    ys = labels[keep]
    assert len(set(ys.tolist())) < len(ys)  # duplicates present
    ours = jit_contrast(batch["student"], labels, keep, batch["concept"], group_size=GROUP)
    ref = ref_contrastive(batch["student"], labels, keep, batch["concept"], group_size=GROUP)
    np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)


def test_contrastive_all_same_label_is_zero(batch):
    keep = batch["mask"]
    labels = np.where(keep, 5, -1).astype(np.int32)
    ours = jit_contrast(batch["student"], labels, keep, batch["concept"], group_size=GROUP)
    ref = ref_contrastive(batch["student"], labels, keep, batch["concept"], group_size=GROUP)
    assert ref == pytest.approx(0.0, abs=1e-12)
    assert abs(float(ours)) < 1e-5


def test_contrastive_nothing_kept_is_zero(batch):
    keep = np.zeros((B, R), bool)
    labels = -np.ones((B, R), np.int32)
    fn = functools.partial(concept_contrastive_loss, group_size=GROUP)
    loss, grad = jax.jit(jax.value_and_grad(fn))(batch["student"], labels, keep, batch["concept"])
    assert float(loss) == 0.0
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


# ----------------------------------------------------------------------------- image-text


def test_image_text_matches_reference():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(7, D)).astype(np.float32)
    txt = (0.2 * img + rng.normal(size=(7, D))).astype(np.float32)
    ref = ref_img_txt(img, txt)
    assert ref > 0.5
    np.testing.assert_allclose(float(jit_img_txt(img, txt, TAU)), ref, rtol=RTOL, atol=ATOL)
    valid = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    img[~valid] = np.nan
    txt[~valid] = np.inf
    ours = jit_img_txt(img, txt, TAU, valid)
    np.testing.assert_allclose(float(ours), ref_img_txt(img, txt, valid=valid), rtol=RTOL)
    grads = jax.jit(jax.grad(image_text_contrastive_loss, argnums=(0, 1)))(img, txt, TAU, valid)
    for g in grads:
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g[valid]).max() > 0
        np.testing.assert_array_equal(g[~valid], 0.0)
    assert float(jit_img_txt(img, txt, TAU, np.zeros(7, bool))) == 0.0


# ----------------------------------------------------------------------------- small losses

F32_EPS = float(np.finfo(np.float32).eps)  # one ulp of 1.0


def confident_pairs(overlap: float, seed: int, n: int = 7, d: int = 16):
    """[n, d] float32 features f (orthonormal) and g_i = f_i + overlap·Σ_{j≠i} f_j (+ 1e-3 noise).

    cos(f_i, g_i) − cos(f_i, g_j) is 0.09 for overlap 0.8 and 0.14 for 0.7, so at τ = 0.01 every
    cross-entropy of the pair is small (~1e-4 and ~2e-7): the low bits a loss form can lose."""
    rng = np.random.default_rng(seed)
    f = np.linalg.qr(rng.normal(size=(d, d)))[0][:n]
    g = f + overlap * (f.sum(0, keepdims=True) - f) + 1e-3 * rng.normal(size=f.shape)
    return f.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize("overlap", [0.8, 0.7])
@pytest.mark.parametrize("seed", range(4))
def test_small_losses_are_exact_to_float32_rounding(overlap, seed):
    """At τ = 0.01 a loss near 1e-4 or 1e-6 keeps its digits: the log_softmax form's only error is
    the rounding of Σ exp(s − max) ≈ 1 + ε, under one ulp of 1.0. (logsumexp(s) − s_y of unshifted
    logits ~100 was off by up to 7e-7, the ulp of 100.)"""
    img, txt = confident_pairs(overlap, seed)
    ref = ref_img_txt(img, txt)
    assert 1e-7 < ref < 1e-3
    assert abs(float(jit_img_txt(img, txt, TAU)) - ref) < F32_EPS
    # Concept contrastive: region i's concept is caption i, so the loss is image -> text's.
    labels, keep = np.arange(7)[None], np.ones((1, 7), bool)
    ref = ref_contrastive(img[None], labels, keep, txt)
    assert 1e-7 < ref < 1e-3
    assert abs(float(jit_contrast(img[None], labels, keep, txt)) - ref) < F32_EPS


# ----------------------------------------------------------------------------- combined + dtypes


def _ref_all(batch, group_size, img, txt):
    probs, labels, keep = ref_pseudo_labels(
        batch["teacher"], batch["mask"], batch["concept"], group_size=group_size
    )
    return {
        "loss_region_distill": ref_distill(
            batch["student"], probs, batch["concept"], keep, group_size=group_size
        ),
        "loss_concept_contrastive": ref_contrastive(
            batch["student"], labels, keep, batch["concept"], group_size=group_size
        ),
        "loss_img_txt_level": ref_img_txt(img, txt),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pretrain_losses_end_to_end(batch, dtype):
    """All three terms and the weighted total; bf16 inputs give fp32 statistics.

    For bf16 the reference runs in float64 on the bf16-rounded inputs, so the tolerance is the
    same as for fp32 (2e-4 relative): fp32 internals, not bf16 arithmetic.
    """
    rng = np.random.default_rng(5)
    img = rng.normal(size=(B, D)).astype(np.float32)
    txt = (0.2 * img + rng.normal(size=(B, D))).astype(np.float32)
    cast = {k: jnp.asarray(batch[k], dtype) for k in ("teacher", "student")}
    img_c, txt_c = jnp.asarray(img, dtype), jnp.asarray(txt, dtype)
    fn = jax.jit(functools.partial(pretrain_losses, group_size=GROUP, weights=(1.0, 0.5, 2.0)))
    out = fn(cast["student"], cast["teacher"], batch["mask"], batch["concept"], img_c, txt_c)
    rounded = dict(batch, **{k: np.asarray(v.astype(jnp.float32)) for k, v in cast.items()})
    ref = _ref_all(
        rounded, GROUP, np.asarray(img_c.astype(jnp.float32)), np.asarray(txt_c.astype(jnp.float32))
    )
    for k, v in ref.items():
        assert v > 0.1, k  # informative values
        assert out[k].dtype == jnp.float32
        np.testing.assert_allclose(float(out[k]), v, rtol=RTOL, atol=ATOL, err_msg=k)
    total = ref["loss_region_distill"] + 0.5 * ref["loss_concept_contrastive"]
    total += 2.0 * ref["loss_img_txt_level"]
    np.testing.assert_allclose(float(out["total_loss"]), total, rtol=RTOL)
    assert float(out["num_kept_regions"]) == 3 + 7


def test_gradients_masked_and_match_finite_differences(batch):
    """jax.grad through the total: finite; zero on padded and on valid-but-not-kept regions;
    its directional derivative matches central differences of the float64 references."""
    rng = np.random.default_rng(7)
    img = rng.normal(size=(B, D)).astype(np.float32)
    txt = rng.normal(size=(B, D)).astype(np.float32)
    fn = functools.partial(pretrain_losses, group_size=GROUP)

    def total(student, img):
        return fn(student, batch["teacher"], batch["mask"], batch["concept"], img, txt)[
            "total_loss"
        ]

    g_s, g_i = jax.jit(jax.grad(total, argnums=(0, 1)))(batch["student"], img)
    g_s, g_i = np.asarray(g_s), np.asarray(g_i)
    _, _, keep = ref_pseudo_labels(
        batch["teacher"], batch["mask"], batch["concept"], group_size=GROUP
    )
    assert np.isfinite(g_s).all() and np.isfinite(g_i).all()
    np.testing.assert_array_equal(g_s[~keep], 0.0)  # padded (NaN inputs) and not-kept
    assert (np.abs(g_s[keep]).max(axis=-1) > 0).all()

    dv = np.where(batch["mask"][..., None], rng.normal(size=(B, R, D)), 0.0)
    di = rng.normal(size=(B, D))
    base = dict(batch, student=np.where(batch["mask"][..., None], batch["student"], 0.0))
    h = 1e-5

    def ref_total(eps):
        b = dict(base, student=base["student"] + eps * dv)
        return sum(_ref_all(b, GROUP, img + eps * di, txt).values())

    fd = (ref_total(h) - ref_total(-h)) / (2 * h)
    ours = np.sum(np.where(batch["mask"][..., None], g_s, 0.0) * dv) + np.sum(g_i * di)
    np.testing.assert_allclose(ours, fd, rtol=2e-3)


def test_whole_group_padded_is_excluded(batch):
    """Per-group means are averaged over groups with kept regions only (padded group 2 ignored)."""
    _, labels, keep = ref_pseudo_labels(
        batch["teacher"], batch["mask"], batch["concept"], group_size=GROUP
    )
    per_group = [
        float(
            jit_contrast(
                batch["student"][s : s + GROUP],
                labels[s : s + GROUP],
                keep[s : s + GROUP],
                batch["concept"],
            )
        )
        for s in (0, 2)
    ]
    ours = float(jit_contrast(batch["student"], labels, keep, batch["concept"], group_size=GROUP))
    np.testing.assert_allclose(ours, np.mean(per_group), rtol=1e-5)


def test_group_size_must_divide_batch(batch):
    with pytest.raises(ValueError, match="group_size"):
        concept_contrastive_loss(
            batch["student"],
            np.zeros((B, R), np.int32),
            batch["mask"],
            batch["concept"],
            group_size=4,
        )


# ----------------------------------------------------------------------------- classifier logits


def test_logits_with_background():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, D)).astype(np.float32)
    w = rng.normal(size=(5, D)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 0], bool)
    ours = np.asarray(jax.jit(logits_with_background)(jnp.asarray(x, jnp.bfloat16), w, TAU, valid))
    xr = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    ref = _norm(xr) @ _norm(w.astype(np.float64)).T / TAU
    assert ours.shape == (2, 3, 6) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[..., -1], 0.0)  # background is the last column, 0
    np.testing.assert_allclose(ours[..., :5][..., valid], ref[..., valid], rtol=1e-4, atol=1e-3)
    assert (ours[..., :5][..., ~valid] < -1e29).all()
    full = np.asarray(logits_with_background(x, w))
    np.testing.assert_allclose(
        full[..., :5], _norm(x.astype(np.float64)) @ _norm(w).T / TAU, rtol=1e-4, atol=1e-3
    )
