"""CLIP's input normalisation: its constants, and the device-side form for padded canvases.

The host-side form of whole images is `data.transforms.normalize_image`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# OpenAI CLIP's per-channel RGB mean and standard deviation (of 0..1 pixels).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_normalize(images: jax.Array, image_hw: jax.Array) -> jax.Array:
    """CLIP's normalisation of padded canvases, zero in the padding.

    Args:
      images: uint8 or float `[B, Hc, Wc, 3]` RGB in 0..255 (images at the top-left, padding after).
      image_hw: int32 `[B, 2]` (h, w) of each image on its canvas.

    Returns:
      float32 `[B, Hc, Wc, 3]`: (x / 255 - mean) / std inside each image, 0 in the padding.
    """
    x = (images.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    hc, wc = images.shape[1:3]
    inside = (jnp.arange(hc)[None, :, None] < image_hw[:, 0, None, None]) & (
        jnp.arange(wc)[None, None, :] < image_hw[:, 1, None, None]
    )
    return jnp.where(inside[..., None], x, 0.0)
