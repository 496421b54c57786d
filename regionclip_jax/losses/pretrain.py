"""RegionCLIP pretraining losses (spec §4): pseudo labels, distillation, concept contrastive, image-text.

Everything is a pure `jnp` function of padded arrays and masks, so it jits with static shapes
(spec §10). Statistics are float32 whatever the input dtype.

The original (`PretrainFastRCNN`, `clip_rcnn.py` L578-661) works on the variable-length list of
regions of one GPU (3 images) and lets DDP average the per-GPU losses' gradients. Here all regions
are a fixed [B, R] grid with a validity mask, and a *group* of `group_size` consecutive images
plays the role of one GPU:

- the pseudo-label fallback ("if no region is kept, keep all") is applied per group;
- the contrastive candidates (in-batch concept targets) come from the same group only;
- each region loss is the mean over a group's kept regions, then the mean over the groups that
  have at least one kept region. With DDP's gradient averaging this is what the original
  optimises (mean over GPUs of per-GPU means).

`group_size=None` makes the whole batch one group (a single-GPU original). Set it to the images
per device of the original run (96 / 32 = 3) to mimic its negatives exactly.

Deviations (numerics only, same function where the original is finite):
- `log(softmax(x))` is computed as `log_softmax(x)` and the MIL term as a `logsumexp` of
  `log_softmax` over the positives; the original's literal forms give -inf/nan when a probability
  underflows in fp32. Every cross-entropy is in this form (never `logsumexp(s) − s_y` of the
  unshifted logits of scale 1/τ, which cancels the low bits of a small loss).
- Normalisation uses `max(||x||, 1e-12)` so padded all-zero rows stay finite.
- Padded regions/images are dropped with masks; in the original they do not exist.
- The image-text loss is computed on the global batch (one `jit` over all devices, or all-gathered
  features); the original's `gather_tensors` truncates to the smallest per-GPU batch, which never
  happens with fixed shapes, and pads are masked out via `valid` instead. Whether the original's
  per-parameter gradient equals this single global loss's depends on `diffdist`'s backward
  (spec §11, open); the loss value is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from regionclip_jax.losses.common import NEG_INF, group_images, l2_normalize, masked_mean

_HI = jax.lax.Precision.HIGHEST


def _concept_log_probs(feats: jax.Array, concept_emb: jax.Array, temperature: float) -> jax.Array:
    """log softmax_c(f̂ · L̂_cᵀ / τ) for feats [..., D], concept_emb [C, D] -> [..., C] fp32."""
    logits = jnp.einsum(
        "...d,cd->...c", l2_normalize(feats), l2_normalize(concept_emb), precision=_HI
    )
    return jax.nn.log_softmax(logits / temperature, axis=-1)


def _mean_of_group_means(per_region: jax.Array, keep: jax.Array, group_size: int | None):
    """Mean over groups (with >= 1 kept region) of the mean over each group's kept regions.

    Args:
      per_region: [B, R] float32 per-region losses (garbage allowed where ~keep).
      keep: [B, R] bool.
    Returns:
      scalar float32; 0 when nothing is kept.
    """
    vals = group_images(jnp.where(keep, per_region, 0.0), group_size)  # [G, gR]
    kept = group_images(keep, group_size).astype(jnp.float32)
    n = jnp.sum(kept, axis=1)  # [G]
    group_mean = jnp.sum(vals, axis=1) / jnp.maximum(n, 1.0)
    return masked_mean(group_mean, n > 0)


def teacher_pseudo_labels(
    teacher_feats: jax.Array,
    region_mask: jax.Array,
    concept_emb: jax.Array,
    temperature: float = 0.01,
    threshold: float = 0.1,
    group_size: int | None = None,
) -> dict[str, jax.Array]:
    """Pseudo concept labels from the frozen teacher (spec §4.2, `get_psuedo_concept_labels`).

    q_i = softmax_c(û_i · L̂_cᵀ / τ); keep_i = valid_i ∧ max_c q_ic > θ. Fallback, as in the
    original: if a group keeps no region, all its valid regions are kept (the original tests
    `max_scores > 0.0`, true for every region, over one GPU's batch). The outputs carry no gradient.

    Args:
      teacher_feats: [B, R, D] teacher region features (not normalised), any float dtype.
      region_mask: [B, R] bool, True for real (non-padded) regions.
      concept_emb: [C, D] teacher concept embeddings (not necessarily normalised).
      temperature: τ of the teacher (hard-coded `s_temp=0.01` in the original).
      threshold: θ (`CONCEPT_THRES`, 0.1).
      group_size: images per group for the fallback (static); None = whole batch.
    Returns:
      dict with
        probs: [B, R, C] float32 teacher distribution q (all zeros on padded regions);
        labels: [B, R] int32 argmax_c q (first index on ties); -1 on padded regions (valid but
          not-kept regions keep their argmax label);
        keep: [B, R] bool, regions used by the region losses.
    """
    teacher_feats = jax.lax.stop_gradient(teacher_feats)
    concept_emb = jax.lax.stop_gradient(concept_emb)
    valid = region_mask.astype(bool)
    feats = jnp.where(valid[..., None], teacher_feats.astype(jnp.float32), 0.0)
    probs = jnp.exp(_concept_log_probs(feats, concept_emb, temperature))
    probs = jnp.where(valid[..., None], probs, 0.0)
    max_p = jnp.max(probs, axis=-1)
    labels = jnp.where(valid, jnp.argmax(probs, axis=-1), -1).astype(jnp.int32)

    keep = valid & (max_p > threshold)
    b, r = keep.shape
    keep_g = group_images(keep, group_size)
    valid_g = group_images(valid, group_size)
    none_kept = ~jnp.any(keep_g, axis=1, keepdims=True)  # [G, 1]
    keep = jnp.where(none_kept, valid_g, keep_g).reshape(b, r)
    return {"probs": probs, "labels": labels, "keep": keep}


def region_distillation_loss(
    student_feats: jax.Array,
    teacher_probs: jax.Array,
    concept_emb: jax.Array,
    keep: jax.Array,
    temperature: float = 0.01,
    group_size: int | None = None,
) -> jax.Array:
    """Region–concept distillation KL(q_t ‖ q_s) (spec §4.3, `loss_region_distill`).

    Per region: Σ_c q_t,c (log q_t,c − log q_s,c), with 0·log 0 = 0 and
    q_s = softmax_c(v̂ · L̂_cᵀ / τ). `F.kl_div(log q_s, q_t, 'batchmean')` over the kept regions
    of one GPU is their mean; here the mean over each group's kept regions, then over groups with
    at least one kept region (see module docstring). The target is a constant (the original
    computes it under `no_grad`).

    Args:
      student_feats: [B, R, D] student region features (not normalised), any float dtype.
      teacher_probs: [B, R, C] teacher distributions (`teacher_pseudo_labels(...)["probs"]`).
      concept_emb: [C, D] student concept embeddings (not necessarily normalised).
      keep: [B, R] bool, regions that enter the loss.
      temperature: τ (CLSS_TEMP, 0.01).
      group_size: images per group (static); None = whole batch (plain mean over kept regions).
    Returns:
      scalar float32; 0 when no region is kept.
    """
    keep = keep.astype(bool)
    feats = jnp.where(keep[..., None], student_feats.astype(jnp.float32), 0.0)
    q_t = jnp.where(keep[..., None], jax.lax.stop_gradient(teacher_probs).astype(jnp.float32), 0.0)
    log_q_s = _concept_log_probs(feats, concept_emb, temperature)
    kl = jnp.sum(jax.scipy.special.xlogy(q_t, q_t) - q_t * log_q_s, axis=-1)  # [B, R]
    return _mean_of_group_means(kl, keep, group_size)


def concept_contrastive_loss(
    student_feats: jax.Array,
    labels: jax.Array,
    keep: jax.Array,
    concept_emb: jax.Array,
    temperature: float = 0.01,
    group_size: int | None = None,
) -> jax.Array:
    """Multi-positive region–concept contrastive loss (spec §4.4, `MILCrossEntropy`).

    Within a group, for kept regions i, j: s_ij = v̂_i · t̂_jᵀ / τ with t_j = concept_emb[y_j];
    L_i = −log Σ_j M_ij softmax_j(s_ij), M_ij = [y_i = y_j] (positives summed, not averaged,
    `avg_positives=False`). Columns of non-kept regions and of other groups do not exist in the
    original and are masked. Computed as [G, gR, gR] blocks, never [BR, BR]. The loss is the mean
    over each group's kept regions, then over groups with at least one kept region.

    Args:
      student_feats: [B, R, D] student region features (not normalised), any float dtype.
      labels: [B, R] int32 concept ids (pseudo labels); ignored where ~keep (may be -1).
      keep: [B, R] bool, regions that enter the loss (rows and columns).
      concept_emb: [C, D] student concept embeddings (not necessarily normalised).
      temperature: τ (CLSS_TEMP, 0.01).
      group_size: images per group = one original GPU (static); None = whole batch.
    Returns:
      scalar float32; 0 when no region is kept.
    """
    keep = keep.astype(bool)
    labels = jnp.where(keep, labels, 0).astype(jnp.int32)
    feats = jnp.where(keep[..., None], student_feats.astype(jnp.float32), 0.0)
    v = group_images(l2_normalize(feats), group_size)  # [G, gR, D]
    t = group_images(jnp.take(l2_normalize(concept_emb), labels, axis=0), group_size)
    y = group_images(labels, group_size)  # [G, gR]
    col = group_images(keep, group_size)[:, None, :]  # [G, 1, gR]

    s = jnp.einsum("gid,gjd->gij", v, t, precision=_HI) / temperature
    pos = col & (y[:, :, None] == y[:, None, :])
    # The log_softmax form (logits shifted by the row max of the kept columns): a difference of two
    # logsumexps of logits of scale 1/τ would cancel the low bits of a small loss.
    log_p = jax.nn.log_softmax(jnp.where(col, s, NEG_INF), axis=-1)
    per_region = -jax.nn.logsumexp(jnp.where(pos, log_p, NEG_INF), axis=-1)  # −log Σ_j M_ij p_ij
    per_region = per_region.reshape(keep.shape)
    return _mean_of_group_means(per_region, keep, group_size)


def image_text_contrastive_loss(
    image_feats: jax.Array,
    text_feats: jax.Array,
    temperature: float = 0.01,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Symmetric CLIP loss between global-box features and captions (spec §4.5, `loss_img_txt_level`).

    S = Ĝ Êᵀ / τ; L = ½ (CE(S, arange) + CE(Sᵀ, arange)), each a mean over rows. Pass the global
    batch (all devices); padded samples (valid = False) are removed from rows and columns.

    Args:
      image_feats: [B, D] global-box region features (not normalised), any float dtype.
      text_feats: [B, D] caption EOT embeddings (not normalised), any float dtype.
      temperature: τ (CLSS_TEMP, 0.01).
      valid: optional [B] bool, False for padded samples.
    Returns:
      scalar float32; 0 when no sample is valid.
    """
    b = image_feats.shape[0]
    valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
    g = l2_normalize(jnp.where(valid[:, None], image_feats.astype(jnp.float32), 0.0))
    e = l2_normalize(jnp.where(valid[:, None], text_feats.astype(jnp.float32), 0.0))
    s = jnp.einsum("id,jd->ij", g, e, precision=_HI) / temperature
    pair = valid[:, None] & valid[None, :]
    s = jnp.where(pair, s, NEG_INF)
    # −log_softmax, not logsumexp(s) − s_ii: with logits of scale 1/τ the latter cancels the low bits
    # of a small loss (the original's cross_entropy is the log_softmax form too).
    row = -jnp.diagonal(jax.nn.log_softmax(s, axis=1))  # image -> text
    col = -jnp.diagonal(jax.nn.log_softmax(s, axis=0))  # text -> image
    return 0.5 * (masked_mean(row, valid) + masked_mean(col, valid))


def pretrain_losses(
    student_region_feats: jax.Array,
    teacher_region_feats: jax.Array,
    region_mask: jax.Array,
    concept_emb: jax.Array,
    global_feats: jax.Array,
    text_feats: jax.Array,
    *,
    teacher_concept_emb: jax.Array | None = None,
    image_valid: jax.Array | None = None,
    temperature: float = 0.01,
    teacher_temperature: float = 0.01,
    threshold: float = 0.1,
    group_size: int | None = None,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, jax.Array]:
    """All RegionCLIP pretraining losses (spec §4.6): distill + concept contrastive + image-text.

    Args:
      student_region_feats: [B, R, D] student region features.
      teacher_region_feats: [B, R, D] teacher region features (same proposals).
      region_mask: [B, R] bool, real regions. Should be False for every region of a padded image.
      concept_emb: [C, D] student concept pool embeddings (`CONCEPT_POOL_EMB`).
      global_feats: [B, D] student features of the global box.
      text_feats: [B, D] caption embeddings.
      teacher_concept_emb: [C, D] teacher concept pool (`TEACHER_CONCEPT_POOL_EMB`); default
        `concept_emb`, as in the original.
      image_valid: optional [B] bool, False for padded samples (image-text loss only).
      temperature: student τ (CLSS_TEMP). teacher_temperature: teacher τ. threshold: θ.
      group_size: images per original GPU (static), see the module docstring.
      weights: (distill, contrastive, image-text) loss weights; all 1 in the original.
    Returns:
      dict: loss_region_distill, loss_concept_contrastive, loss_img_txt_level (unweighted, scalar
      float32), total_loss (weighted sum), and num_kept_regions (float32 count, for logging).
    """
    if teacher_concept_emb is None:
        teacher_concept_emb = concept_emb
    pseudo = teacher_pseudo_labels(
        teacher_region_feats,
        region_mask,
        teacher_concept_emb,
        temperature=teacher_temperature,
        threshold=threshold,
        group_size=group_size,
    )
    keep = pseudo["keep"]
    distill = region_distillation_loss(
        student_region_feats, pseudo["probs"], concept_emb, keep, temperature, group_size
    )
    contrast = concept_contrastive_loss(
        student_region_feats, pseudo["labels"], keep, concept_emb, temperature, group_size
    )
    img_txt = image_text_contrastive_loss(global_feats, text_feats, temperature, image_valid)
    w_d, w_c, w_i = weights
    return {
        "loss_region_distill": distill,
        "loss_concept_contrastive": contrast,
        "loss_img_txt_level": img_txt,
        "total_loss": w_d * distill + w_c * contrast + w_i * img_txt,
        "num_kept_regions": jnp.sum(keep.astype(jnp.float32)),
    }
