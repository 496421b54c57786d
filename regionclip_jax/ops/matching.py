"""detectron2 `Matcher` on a padded `[G, N]` quality (IoU) matrix.

Each prediction (column) is matched to the ground truth (row) of highest quality; its label is
`labels[i]` for the threshold interval `[thresholds[i-1], thresholds[i])` (with -inf and +inf
added at the ends) that contains the best quality. With `allow_low_quality_matches`, every
prediction whose quality equals some GT's best quality (ties included, even when that best is 0)
is labelled 1, as detectron2 does. Padded GT rows (mask False) never match; with no valid GT
every prediction gets `labels[0]` and match index 0, detectron2's empty-GT rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Matcher:
    """Attributes:
    thresholds: increasing interval edges, e.g. `(0.5,)` (Fast R-CNN) or `(0.3, 0.7)` (RPN).
    labels: one per interval, each in {-1 (ignore), 0 (negative), 1 (positive)}.
    allow_low_quality_matches: also make each GT's best predictions positive.
    """

    thresholds: Sequence[float]
    labels: Sequence[int]
    allow_low_quality_matches: bool = False

    def __post_init__(self):
        edges = [-float("inf"), *self.thresholds, float("inf")]
        if any(lo > hi for lo, hi in zip(edges[:-1], edges[1:])):
            raise ValueError(f"thresholds must increase: {self.thresholds}")
        if len(self.labels) != len(edges) - 1 or any(x not in (-1, 0, 1) for x in self.labels):
            raise ValueError(f"want {len(edges) - 1} labels in {{-1, 0, 1}}, got {self.labels}")

    def __call__(
        self, quality: jax.Array, gt_valid: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Match predictions to ground truth.

        Args:
          quality: `[G, N]` non-negative match quality (IoU) of each GT with each prediction.
          gt_valid: `[G]` bool; False rows are padding.

        Returns:
          matches: `[N]` int32 index of the best GT for each prediction (ties: lowest index).
          match_labels: `[N]` int32 in {-1, 0, 1}.
        """
        quality = jnp.asarray(quality)
        g, _ = quality.shape
        gt_valid = jnp.ones((g,), bool) if gt_valid is None else jnp.asarray(gt_valid)
        q = jnp.where(gt_valid[:, None], quality, -1.0)
        best = q.max(axis=0)
        matches = jnp.argmax(q, axis=0).astype(jnp.int32)
        edges = [-float("inf"), *self.thresholds, float("inf")]
        match_labels = jnp.ones(best.shape, jnp.int32)
        for label, lo, hi in zip(self.labels, edges[:-1], edges[1:]):
            match_labels = jnp.where((best >= lo) & (best < hi), label, match_labels)
        if self.allow_low_quality_matches:
            best_per_gt = q.max(axis=1, keepdims=True)
            low_quality = ((q == best_per_gt) & gt_valid[:, None]).any(axis=0)
            match_labels = jnp.where(low_quality, 1, match_labels)
        any_gt = gt_valid.any()
        matches = jnp.where(any_gt, matches, 0)
        match_labels = jnp.where(any_gt, match_labels, self.labels[0])
        return matches, match_labels
