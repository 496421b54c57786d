"""Balanced foreground/background sampling, detectron2 `subsample_labels`, fixed output size.

detectron2 takes `num_pos = min(#fg, int(num_samples * positive_fraction))` random foreground
and `num_neg = min(#bg, num_samples - num_pos)` random background indices (`torch.randperm`).
Here each candidate draws an i.i.d. uniform priority from an explicit key and `lax.top_k` keeps
the highest priorities in each group: a uniformly random subset in uniformly random order, the
same distribution as `randperm(...)[:k]`, with static shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def subsample_labels(
    labels: jax.Array,
    num_samples: int,
    positive_fraction: float,
    bg_label: int,
    key: jax.Array,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sample foreground (label not in {-1, bg}) and background (label == bg) entries.

    Args:
      labels: `[N]` int; -1 = ignore, `bg_label` = background, anything else = foreground.
      num_samples: static total number of samples (e.g. 512 RoIs or 256 anchors per image).
      positive_fraction: target foreground share (e.g. 0.25 RoIs, 0.5 anchors).
      bg_label: background label (K for RoI heads, 0 for RPN).
      key: PRNG key.
      valid: optional `[N]` bool; False entries are never sampled (padding).

    Returns:
      indices: `[num_samples]` int32: the sampled foreground first, then background; -1 padding.
      is_foreground: `[num_samples]` bool.
      valid: `[num_samples]` bool; `valid.sum() = num_pos + num_neg` as in detectron2.
    """
    labels = jnp.asarray(labels)
    n = labels.shape[0]
    ok = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid)
    fg = ok & (labels != -1) & (labels != bg_label)
    bg = ok & (labels == bg_label)
    max_pos = int(num_samples * positive_fraction)
    num_pos = jnp.minimum(fg.sum(), max_pos)
    num_neg = jnp.minimum(bg.sum(), num_samples - num_pos)
    priority = jax.random.uniform(key, (n,))
    k_pos = min(max_pos, n)
    k_neg = min(num_samples, n)
    _, pos_idx = jax.lax.top_k(jnp.where(fg, priority, -1.0), k_pos)
    _, neg_idx = jax.lax.top_k(jnp.where(bg, priority, -1.0), k_neg)
    pos_idx = jnp.pad(pos_idx, (0, num_samples - k_pos))
    neg_idx = jnp.pad(neg_idx, (0, num_samples - k_neg))
    slot = jnp.arange(num_samples)
    is_fg = slot < num_pos
    neg_slot = jnp.clip(slot - num_pos, 0, num_samples - 1)
    is_bg = ~is_fg & (slot - num_pos < num_neg)
    indices = jnp.where(is_fg, pos_idx[jnp.minimum(slot, num_samples - 1)], neg_idx[neg_slot])
    out_valid = is_fg | is_bg
    indices = jnp.where(out_valid, indices, -1).astype(jnp.int32)
    return indices, is_fg, out_valid
