"""detectron2 RPN training losses (`RPN.label_and_sample_anchors` + `RPN.losses`), static shapes.

Per image: IoU of every valid GT box with every anchor (all levels concatenated); `Matcher`
thresholds (0.3, 0.7), labels (0 below, -1 between, 1 above) with low-quality matches (each GT's
best anchors, ties included, become positive); no anchor is dropped for crossing the image
boundary (detectron2 `BOUNDARY_THRESH = -1`); an image without GT labels every anchor negative.
Then `subsample_labels` keeps at most `batch_size_per_image * positive_fraction` random positives
and fills up to `batch_size_per_image` with random negatives; the rest become -1.

  loss_rpn_cls = sum over sampled anchors of BCE-with-logits(logit, label) / (256 * B)
  loss_rpn_loc = sum over positive anchors of smooth-L1(beta)(delta, target) / (256 * B)

Targets are `Box2BoxTransform((1, 1, 1, 1)).get_deltas(anchor, matched GT)`. Padded GT rows (mask
False) never match. Sampling draws random priorities (see `ops.sampling`): the same distribution as
detectron2's `randperm`, not the same draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from regionclip_jax.ops import boxes as box_ops
from regionclip_jax.ops.matching import Matcher
from regionclip_jax.ops.sampling import subsample_labels


def label_anchors(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_mask: jax.Array,
    iou_thresholds: tuple[float, float] = (0.3, 0.7),
) -> tuple[jax.Array, jax.Array]:
    """Match one image's anchors to its GT (before sampling).

    Args:
      anchors: `[N, 4]` xyxy.
      gt_boxes: `[G, 4]` xyxy; gt_mask: `[G]` bool (False = padding).
      iou_thresholds: (negative below, positive at or above).

    Returns:
      labels: `[N]` int32 in {-1, 0, 1}.
      matched_gt_boxes: `[N, 4]` the matched GT box of each anchor (the anchor itself where no
        GT exists, so that targets stay finite; only positives use them).
    """
    matcher = Matcher(tuple(iou_thresholds), (0, -1, 1), allow_low_quality_matches=True)
    iou = box_ops.pairwise_iou(gt_boxes, anchors)
    matches, labels = matcher(iou, gt_mask)
    matched = jnp.where(gt_mask.any(), gt_boxes[matches], anchors)
    return labels, matched


def sample_anchor_labels(
    labels: jax.Array,
    key: jax.Array,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
) -> jax.Array:
    """detectron2 `RPN._subsample_labels`: `[N]` labels -> `[N]` labels with only the sampled
    anchors left at 0 / 1 and every other anchor -1."""
    idx, is_fg, ok = subsample_labels(labels, batch_size_per_image, positive_fraction, 0, key)
    new = jnp.full_like(labels, -1)
    # Invalid slots scatter out of bounds and are dropped.
    target = jnp.where(ok, idx, labels.shape[0])
    return new.at[target].set(jnp.where(is_fg, 1, 0).astype(labels.dtype), mode="drop")


def label_and_sample_anchors(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_mask: jax.Array,
    key: jax.Array,
    *,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    iou_thresholds: tuple[float, float] = (0.3, 0.7),
) -> tuple[jax.Array, jax.Array]:
    """Batched `label_anchors` + `sample_anchor_labels`.

    Args:
      anchors: `[N, 4]`; gt_boxes: `[B, G, 4]`; gt_mask: `[B, G]`; key: PRNG key.

    Returns:
      labels `[B, N]` int32 in {-1, 0, 1} (after sampling) and matched GT boxes `[B, N, 4]`.
    """
    b = gt_boxes.shape[0]

    def one(gt, mask, k):
        labels, matched = label_anchors(anchors, gt, mask, iou_thresholds)
        return sample_anchor_labels(labels, k, batch_size_per_image, positive_fraction), matched

    return jax.vmap(one)(gt_boxes, jnp.asarray(gt_mask, bool), jax.random.split(key, b))


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    """fvcore `smooth_l1_loss` elementwise: |x| when beta < 1e-5, else the Huber form / beta."""
    ax = jnp.abs(x)
    if beta < 1e-5:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def rpn_losses_from_labels(
    anchors: jax.Array,
    pred_logits: jax.Array,
    pred_deltas: jax.Array,
    labels: jax.Array,
    matched_gt_boxes: jax.Array,
    *,
    batch_size_per_image: int = 256,
    smooth_l1_beta: float = 0.0,
) -> dict[str, jax.Array]:
    """detectron2 `RPN.losses` given sampled labels.

    Args:
      anchors: `[N, 4]` xyxy.
      pred_logits: `[B, N]` objectness logits; pred_deltas: `[B, N, 4]`.
      labels: `[B, N]` in {-1, 0, 1} (sampled); matched_gt_boxes: `[B, N, 4]`.

    Returns:
      `{"loss_rpn_cls", "loss_rpn_loc"}` float32 scalars, each a sum / (batch_size_per_image * B).
    """
    logits = pred_logits.astype(jnp.float32)
    deltas = pred_deltas.astype(jnp.float32)
    pos = labels == 1
    valid = labels >= 0
    # Targets of non-positives are never used: keep them finite (anchor onto itself -> 0).
    gt = jnp.where(pos[..., None], matched_gt_boxes, anchors[None])
    targets = box_ops.Box2BoxTransform((1.0, 1.0, 1.0, 1.0)).get_deltas(anchors[None], gt)
    loc = jnp.where(pos[..., None], smooth_l1(deltas - targets, smooth_l1_beta), 0.0).sum()
    y = pos.astype(jnp.float32)
    bce = jnp.maximum(logits, 0.0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    cls = jnp.where(valid, bce, 0.0).sum()
    normalizer = float(batch_size_per_image * labels.shape[0])
    return {"loss_rpn_cls": cls / normalizer, "loss_rpn_loc": loc / normalizer}


def rpn_losses(
    anchors: jax.Array,
    pred_logits: jax.Array,
    pred_deltas: jax.Array,
    gt_boxes: jax.Array,
    gt_mask: jax.Array,
    key: jax.Array,
    *,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    iou_thresholds: tuple[float, float] = (0.3, 0.7),
    smooth_l1_beta: float = 0.0,
) -> dict[str, jax.Array]:
    """detectron2's RPN losses end to end (module docstring).

    Args:
      anchors: `[N, 4]` xyxy anchors of all levels, in head-output order.
      pred_logits: `[B, N]`; pred_deltas: `[B, N, 4]`.
      gt_boxes: `[B, G, 4]` xyxy; gt_mask: `[B, G]` bool.
      key: PRNG key for sampling.

    Returns:
      `{"loss_rpn_cls": [], "loss_rpn_loc": []}` float32.
    """
    labels, matched = label_and_sample_anchors(
        anchors,
        gt_boxes,
        gt_mask,
        key,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        iou_thresholds=iou_thresholds,
    )
    labels, matched = jax.lax.stop_gradient((labels, matched))
    return rpn_losses_from_labels(
        anchors,
        pred_logits,
        pred_deltas,
        labels,
        matched,
        batch_size_per_image=batch_size_per_image,
        smooth_l1_beta=smooth_l1_beta,
    )
