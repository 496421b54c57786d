"""Fast R-CNN losses of RegionCLIP's open-vocabulary transfer (spec §5.3–5.4, `fast_rcnn.py`).

Inputs are the sampled RoIs of a batch, flattened or not: any leading shape [...] works (e.g.
[B, 512] or [B·512]); `valid` marks real RoIs and labels -1 mark padded/ignored ones. In the
original every sampled RoI is real, so "mean over all sampled RoIs" becomes "mean over valid
RoIs" here; with no padding the two are identical.

Labels follow Detectron2: 0..K-1 foreground classes, K = background, -1 = padding (ours).

The classifier logits come from `regionclip_jax.losses.common.logits_with_background` (re-exported
by `regionclip_jax.losses`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from regionclip_jax.losses.common import NEG_INF

# Detectron2's defaults for the fast R-CNN box head (spec §5.4).
BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)  # used by decoding only; encoding does not clamp

# Per-mode defaults (spec §5.1, §5.3): COCO = FOCAL_SCALED_LOSS 0.5, BG_CLS_LOSS_WEIGHT 0.2;
# LVIS = no focal scaling, BG_CLS_LOSS_WEIGHT 0.8.
_MODE_DEFAULTS = {"coco": {"bg_weight": 0.2, "focal_gamma": 0.5}, "lvis": {"bg_weight": 0.8}}


def _valid_rois(labels: jax.Array, valid: jax.Array | None) -> jax.Array:
    ok = labels >= 0
    return ok if valid is None else ok & valid.astype(bool)


def fast_rcnn_classification_loss(
    logits: jax.Array,
    labels: jax.Array,
    valid: jax.Array | None = None,
    *,
    mode: str = "coco",
    bg_weight: float | None = None,
    focal_gamma: float | None = None,
) -> jax.Array:
    """RegionCLIP's RoI classification loss (spec §5.3, `FastRCNNOutputLayers.losses/focal_loss`).

    mode="coco" (the original's `FOCAL_SCALED_LOSS` path, `focal_loss`):
      ℓ_i = CE_i · (1 − p_{i,y_i})^γ · w_i, w_i = bg_weight if y_i = K else 1;
      loss = Σ_valid ℓ_i / N_valid (plain mean; the bg weight does not enter the denominator).
      The focal factor is NOT detached: the original computes `p = F.softmax(inputs)` with
      gradient (RegionCLIP `fast_rcnn.py`, `focal_loss`), so gradients flow through it too.
      Defaults γ = 0.5, bg_weight = 0.2.
    mode="lvis" (no focal scaling; `F.cross_entropy(weight=w)`):
      loss = Σ_valid w_{y_i} CE_i / Σ_valid w_{y_i}, w = [1, …, 1, bg_weight]. Default
      bg_weight = 0.8; bg_weight=1 gives the plain mean CE. Returns 0 where Σ w = 0 (PyTorch: nan).

    (1 − p_y)^γ is evaluated as exp(γ · logsumexp_{k≠y} log p_k): the same value,
    but with finite gradients when p_y rounds to 1 in fp32, where the literal form's
    γ(1 − p)^(γ−1) = ∞ times a zero CE gives nan.

    Args:
      logits: [..., K + 1] class logits, background last; any float dtype (computed in fp32).
      labels: [...] int32 in [0, K]; -1 = padded / ignored.
      valid: optional [...] bool; RoIs enter the loss where valid ∧ labels ≥ 0.
      mode: "coco" (focal-scaled, plain mean) or "lvis" (weighted CE, weighted mean).
      bg_weight: loss weight of background RoIs (None: the mode's default).
      focal_gamma: γ, "coco" only (None: 0.5). γ = 0 gives Σ w_i CE_i / N_valid.
    Returns:
      scalar float32; 0 when no RoI is valid.
    """
    if mode not in _MODE_DEFAULTS:
        raise ValueError(f"mode must be 'coco' or 'lvis', got {mode!r}")
    if mode == "lvis" and focal_gamma is not None:
        raise ValueError("focal_gamma applies to mode='coco' only (LVIS has no focal scaling)")
    bg_weight = _MODE_DEFAULTS[mode]["bg_weight"] if bg_weight is None else bg_weight
    num_bg = logits.shape[-1] - 1  # background index K
    z = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1).astype(jnp.int32)
    ok = _valid_rois(y, None if valid is None else valid.reshape(-1))
    z = jnp.where(ok[:, None], z.astype(jnp.float32), 0.0)
    y = jnp.where(ok, y, 0)

    onehot = jax.nn.one_hot(y, z.shape[-1], dtype=bool)
    # The log_softmax form: logsumexp(z) − z_y of logits of scale 1/τ would cancel the low bits of
    # a small loss.
    log_p = jax.nn.log_softmax(z, axis=-1)
    ce = -jnp.sum(jnp.where(onehot, log_p, 0.0), axis=-1)
    w = jnp.where(y == num_bg, jnp.float32(bg_weight), 1.0)
    okf = ok.astype(jnp.float32)

    if mode == "lvis":
        wv = jnp.where(ok, w, 0.0)
        return jnp.sum(jnp.where(ok, wv * ce, 0.0)) / jnp.where(jnp.sum(wv) > 0, jnp.sum(wv), 1.0)

    gamma = _MODE_DEFAULTS["coco"]["focal_gamma"] if focal_gamma is None else focal_gamma
    log_one_minus_p = jax.nn.logsumexp(jnp.where(onehot, NEG_INF, log_p), axis=-1)
    loss = ce * jnp.exp(gamma * log_one_minus_p) * w
    return jnp.sum(jnp.where(ok, loss, 0.0)) / jnp.maximum(jnp.sum(okf), 1.0)


def _encode_deltas(src: jax.Array, tgt: jax.Array, weights: Sequence[float]) -> jax.Array:
    """Detectron2 `Box2BoxTransform.get_deltas`: (dx, dy, dw, dh) taking `src` onto `tgt`.

    dx = wx (x̄_t − x̄_s) / w_s, dy likewise, dw = ww log(w_t / w_s), dh likewise; centres are
    x1 + w/2, no clamping on encoding.

    Args:
      src, tgt: [N, 4] absolute xyxy float32 boxes with positive width and height.
    Returns:
      [N, 4] float32 deltas.
    """
    wx, wy, ww, wh = weights
    sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    tw, th = tgt[:, 2] - tgt[:, 0], tgt[:, 3] - tgt[:, 1]
    sx, sy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
    tx, ty = tgt[:, 0] + 0.5 * tw, tgt[:, 1] + 0.5 * th
    return jnp.stack(
        [wx * (tx - sx) / sw, wy * (ty - sy) / sh, ww * jnp.log(tw / sw), wh * jnp.log(th / sh)],
        axis=-1,
    )


def box_regression_loss(
    pred_deltas: jax.Array,
    proposals: jax.Array,
    gt_boxes: jax.Array,
    labels: jax.Array,
    valid: jax.Array | None = None,
    *,
    num_classes: int,
    weights: Sequence[float] = BBOX_REG_WEIGHTS,
    smooth_l1_beta: float = 0.0,
) -> jax.Array:
    """Fast R-CNN box regression loss (spec §5.4, `FastRCNNOutputLayers.box_reg_loss`).

    Smooth-L1 (β = 0: L1) between predicted and encoded target deltas, summed over foreground
    RoIs (0 ≤ y < K) and divided by the number of valid sampled RoIs (max(·, 1)): Detectron2
    normalises by all sampled RoIs, not by the foreground count. Targets are constants.

    Args:
      pred_deltas: [..., 4] class-agnostic deltas (RegionCLIP's `CLS_AGNOSTIC_BBOX_REG`), or
        [..., 4·K] class-specific ones (the label's slice is used), any float dtype.
      proposals: [..., 4] absolute xyxy proposal boxes.
      gt_boxes: [..., 4] absolute xyxy matched GT boxes (anything on background/padded RoIs).
      labels: [...] int32, 0..K-1 fg, K bg, -1 padded.
      valid: optional [...] bool; a RoI counts where valid ∧ labels ≥ 0.
      num_classes: K.
      weights: Box2BoxTransform weights (10, 10, 5, 5).
      smooth_l1_beta: β of smooth L1 (`SMOOTH_L1_BETA`, 0 in RegionCLIP).
    Returns:
      scalar float32; 0 when there is no foreground RoI.
    """
    y = labels.reshape(-1).astype(jnp.int32)
    ok = _valid_rois(y, None if valid is None else valid.reshape(-1))
    fg = ok & (y < num_classes)
    d = pred_deltas.reshape(y.shape[0], -1).astype(jnp.float32)
    if d.shape[1] != 4:  # class-specific: pick the label's 4 deltas
        d = d.reshape(y.shape[0], num_classes, 4)
        d = jnp.take_along_axis(d, jnp.clip(y, 0, num_classes - 1)[:, None, None], axis=1)[:, 0]
    d = jnp.where(fg[:, None], d, 0.0)

    # Non-foreground rows may hold placeholder/degenerate boxes: a unit box keeps log() finite.
    unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
    src = jnp.where(fg[:, None], proposals.reshape(-1, 4).astype(jnp.float32), unit)
    tgt = jnp.where(fg[:, None], gt_boxes.reshape(-1, 4).astype(jnp.float32), unit)
    target = jax.lax.stop_gradient(_encode_deltas(src, tgt, weights))

    diff = jnp.abs(d - target)
    if smooth_l1_beta < 1e-5:  # fvcore: beta below 1e-5 means pure L1
        per = diff
    else:
        per = jnp.where(
            diff < smooth_l1_beta, 0.5 * diff * diff / smooth_l1_beta, diff - 0.5 * smooth_l1_beta
        )
    total = jnp.sum(jnp.where(fg[:, None], per, 0.0))
    return total / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise `F.binary_cross_entropy_with_logits` (stable form, float32)."""
    z = logits.astype(jnp.float32)
    return jnp.maximum(z, 0.0) - z * targets.astype(jnp.float32) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def mask_rcnn_loss(mask_logits: jax.Array, targets: jax.Array, fg: jax.Array) -> jax.Array:
    """detectron2 `mask_rcnn_loss`, class-agnostic (`CLS_AGNOSTIC_MASK`, RegionCLIP's LVIS head).

    loss = mean over the pixels of every RoI with `fg` of BCE-with-logits(logit, target), i.e.
    `F.binary_cross_entropy_with_logits(logits[fg], targets[fg], reduction="mean")`: each RoI
    weighs M·M pixels, the total is divided by N_fg·M·M. detectron2 returns `logits.sum() * 0`
    when no RoI has a mask; so does this (0, zero gradient).

    In detectron2 the foreground RoIs are exactly those given to the mask head; here `fg` is the
    set of foreground sampled RoIs whose matched GT carries a mask (instances without one are
    left out of the mean, rather than trained towards an empty mask).

    Args:
      mask_logits: `[..., M, M]` predicted logits, any float dtype (computed in float32).
      targets: `[..., M, M]` in {0, 1} (`BitMasks.crop_and_resize` / box-filled).
      fg: `[...]` bool, the RoIs that enter the loss.
    Returns:
      scalar float32.
    """
    m2 = mask_logits.shape[-1] * mask_logits.shape[-2]
    fg = fg.astype(bool)
    per = jnp.where(fg[..., None, None], bce_with_logits(mask_logits, targets), 0.0)
    return jnp.sum(per) / jnp.maximum(jnp.sum(fg.astype(jnp.float32)) * m2, 1.0)
