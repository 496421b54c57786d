"""Helpers shared by the pretraining and detection losses, and the zero-background classifier.

All functions are pure `jnp` functions with static shapes. Statistics are computed in float32
whatever the input dtype (bf16 activations are upcast first): with a temperature of 0.01 the
cosine similarities are multiplied by 100, and bf16 rounding of a cosine (~4e-3) would move a
logit by ~0.4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite stand-in for -inf in masked logits. With -inf a row whose entries are all masked gives
# -inf - (-inf) = nan in `logsumexp` and nan gradients even where the row is discarded by
# `jnp.where`; with -1e30 such a row stays finite and `exp(-1e30 - max)` is exactly 0 elsewhere.
NEG_INF = -1e30


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||_2, eps)` in float32 (PyTorch `F.normalize` semantics).

    The eps keeps all-zero (padded) rows at 0 with finite gradients, where the original's
    `x / x.norm()` would give nan (it never sees padded rows).

    Args:
      x: [..., D] any float dtype.
    Returns:
      [..., D] float32.
    """
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over `mask`; 0 when the mask is empty.

    `jnp.where` (not a product) drops masked entries, so nan/inf there cannot leak into the
    value or into gradients.

    Args:
      values: [...] float.
      mask: [...] bool, same shape.
    Returns:
      scalar float32.
    """
    values = jnp.where(mask, values.astype(jnp.float32), 0.0)
    count = jnp.sum(mask.astype(jnp.float32))
    return jnp.sum(values) / jnp.maximum(count, 1.0)


def group_images(x: jax.Array, group_size: int | None) -> jax.Array:
    """Reshapes per-image arrays [B, R, ...] into groups of images [G, group_size * R, ...].

    A group stands for the images one GPU saw in the original (3 per GPU in pretraining): the
    pseudo-label fallback, the in-batch negatives and the loss averaging are per group.

    Args:
      x: [B, R, ...].
      group_size: images per group (static); None = the whole batch is one group.
    Returns:
      [G, group_size * R, ...] with G = B // group_size, images in batch order.
    """
    b, r = x.shape[:2]
    g = b if group_size is None else int(group_size)
    if g <= 0 or b % g:
        raise ValueError(f"group_size={group_size} must divide the batch size {b}")
    return x.reshape((b // g, g * r) + x.shape[2:])


def logits_with_background(
    region_feats: jax.Array,
    class_emb: jax.Array,
    temperature: float = 0.01,
    class_valid: jax.Array | None = None,
) -> jax.Array:
    """Cosine-similarity class logits with a zero background logit as the LAST column.

    RegionCLIP's predictor (spec §2.4): scores = cat(x̂ · normalize(W)ᵀ, x̂ · 0) / τ. The
    background embedding is all-zero and frozen, so its logit is exactly 0.

    Args:
      region_feats: [..., D] region embeddings (attnpool output, not normalised), any float dtype.
      class_emb: [K, D] class text embeddings (not necessarily normalised).
      temperature: τ (CLSS_TEMP, 0.01).
      class_valid: optional bool [K]; False marks padded class slots (e.g. a class list padded
        to a fixed K), whose logits are set to -1e30 so they get zero probability. Not in the
        original, which has no padded classes.
    Returns:
      [..., K + 1] float32 logits; column K is the background.
    """
    x = l2_normalize(region_feats)
    w = l2_normalize(class_emb)
    cls = jnp.einsum("...d,kd->...k", x, w, precision=jax.lax.Precision.HIGHEST) / temperature
    if class_valid is not None:
        cls = jnp.where(class_valid, cls, NEG_INF)
    bg = jnp.zeros(cls.shape[:-1] + (1,), jnp.float32)
    return jnp.concatenate([cls, bg], axis=-1)
