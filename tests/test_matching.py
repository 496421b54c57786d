"""detectron2 `Matcher` and `subsample_labels` against NumPy references of their definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regionclip_jax.ops import Matcher, subsample_labels


def _np_matcher(q, thresholds, labels, low_quality):
    """detectron2 Matcher.__call__ on an unpadded [G, N] matrix."""
    g, n = q.shape
    if g == 0:
        return np.zeros(n, np.int64), np.full(n, labels[0])
    vals, matches = q.max(0), q.argmax(0)
    out = np.ones(n, np.int64)
    edges = [-np.inf, *thresholds, np.inf]
    for lab, lo, hi in zip(labels, edges[:-1], edges[1:]):
        out[(vals >= lo) & (vals < hi)] = lab
    if low_quality:
        best = q.max(1)
        _, preds = np.nonzero(q == best[:, None])
        out[preds] = 1
    return matches, out


@pytest.mark.parametrize(
    "thresholds,labels,low",
    [((0.5,), (0, 1), False), ((0.3, 0.7), (0, -1, 1), True), ((0.4, 0.5), (0, -1, 1), False)],
)
def test_matcher_matches_detectron2_on_padded_gt(thresholds, labels, low):
    rng = np.random.default_rng(0)
    matcher = Matcher(thresholds, labels, low)
    fn = jax.jit(matcher.__call__)
    for g_true in (0, 1, 5):
        q = rng.uniform(0, 1, (g_true, 60)) ** 2
        if g_true:
            q[:, :10] = 0.0  # zero-quality columns (ties at 0)
            q[0, 20] = q[0, 21] = q[0].max()  # tied best prediction of a GT
        if g_true == 1:
            q[0] = 0.0  # a GT that overlaps nothing: detectron2 marks every prediction positive
        padded = np.full((8, 60), 0.9)  # padding rows hold garbage that must be ignored
        padded[:g_true] = q
        valid = np.arange(8) < g_true
        matches, lab = fn(jnp.asarray(padded, jnp.float32), jnp.asarray(valid))
        want_m, want_l = _np_matcher(q.astype(np.float32), thresholds, labels, low)
        np.testing.assert_array_equal(np.asarray(lab), want_l, err_msg=str(g_true))
        np.testing.assert_array_equal(np.asarray(matches), want_m, err_msg=str(g_true))


def test_subsample_labels_counts_membership_and_randomness():
    n, num, frac, bg = 300, 64, 0.25, 5
    fn = jax.jit(subsample_labels, static_argnums=(1, 2, 3))
    rng = np.random.default_rng(1)
    seen = np.zeros(n, int)
    for n_fg, n_bg in ((40, 200), (7, 200), (40, 20), (0, 0)):
        labels = np.full(n, -1)
        perm = rng.permutation(n)
        labels[perm[:n_fg]] = rng.integers(0, bg, n_fg)
        labels[perm[n_fg : n_fg + n_bg]] = bg
        valid = np.ones(n, bool)
        valid[perm[:3]] = False  # masked foreground never sampled
        for seed in range(5):
            idx, is_fg, ok = map(np.asarray, fn(labels, num, frac, bg, jax.random.key(seed), valid))
            fg = np.flatnonzero(valid & (labels != -1) & (labels != bg))
            bgs = np.flatnonzero(valid & (labels == bg))
            want_pos = min(len(fg), int(num * frac))  # detectron2's counts
            want_neg = min(len(bgs), num - want_pos)
            assert is_fg.sum() == want_pos and (ok & ~is_fg).sum() == want_neg
            assert set(idx[is_fg]) <= set(fg) and set(idx[ok & ~is_fg]) <= set(bgs)
            assert len(set(idx[ok])) == ok.sum()  # no repeats
            assert (idx[~ok] == -1).all() and ok[: want_pos + want_neg].all()
            if n_fg == 40 and n_bg == 200:
                seen[idx[ok]] += 1
    # Random subsets: over 5 keys the 16 of 37 foreground picks must not repeat the same set.
    assert (seen[seen > 0]).size > int(num * frac) + (num - int(num * frac))


def test_matcher_and_sampling_vmap_over_images():
    rng = np.random.default_rng(2)
    q = rng.uniform(0, 1, (2, 6, 50)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
    matcher = Matcher((0.3, 0.7), (0, -1, 1), True)
    m, lab = jax.jit(jax.vmap(matcher.__call__))(q, valid)
    labels = rng.integers(-1, 4, (2, 50))
    keys = jax.random.split(jax.random.key(0), 2)
    sample_one = jax.jit(lambda lb, k: subsample_labels(lb, 16, 0.25, 3, k))
    samp = jax.jit(jax.vmap(sample_one))(labels, keys)
    for i in range(2):
        want_m, want_l = _np_matcher(q[i][valid[i]], (0.3, 0.7), (0, -1, 1), True)
        np.testing.assert_array_equal(np.asarray(m[i]), want_m)
        np.testing.assert_array_equal(np.asarray(lab[i]), want_l)
        for got, want in zip(samp, sample_one(labels[i], keys[i])):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
