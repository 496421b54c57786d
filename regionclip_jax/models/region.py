"""Region encoder: RoI features from a CLIP image tower (RegionCLIP's C4 RoI head, spec §2.3-2.5).

ResNet towers (the released RegionCLIP models):

    images [B, Hc, Wc, 3] --visual.trunk--> res4 [B, Hc/16, Wc/16, 16w]          (stride 16)
    res4, boxes [B, R, 4] --roi_align(P, 1/16, sampling_ratio=0, aligned=True)--> [B*R, P, P, 16w]
    --visual.res5 (layer4)--> [B*R, P/2, P/2, 32w] --visual.attnpool--> [B, R, D]

with P = 2 * input_resolution / 32 (14 for RN50, 18 for RN50x4), so layer4's stride-2 pool yields
exactly the attnpool's S x S grid and no positional-embedding interpolation is needed (spec §2.2).

ViT towers (RegionCLIP's `zero-shot` branch design, spec §2.5; no released RegionCLIP weights):

    images --patchify + class token + interpolated positions + transformer--> patch grid
    [B, Hc/p, Wc/p, W] --roi_align(P, 1/p, 0, True)--> mean over the P x P bins --ln_post--> @ proj

The positional embedding is resampled to the canvas' patch grid with PyTorch's bicubic kernel
(`F.interpolate(mode='bicubic', align_corners=False)`, a = -0.75, border taps clamped), as the
zero-shot branch does; the class-token row is kept as is.

Boxes are absolute xyxy in canvas pixels. Padded box slots (any box with x2 <= x1 or y2 <= y1, or a
False entry of a given mask) are still computed, so shapes stay static; `box_mask` reports which
slots are real. The "global box" of an image (pretraining's image-level feature, spec §1.2) is
`global_boxes(image_hw)`: [0, 0, w, h] of each image's true size. The original uses the padded
*batch* size instead; on a fixed canvas that would include padding, so this is a documented
deviation (spec §10); pass the canvas size as `image_hw` to get the original behaviour.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.models.resnet import ModifiedResNet
from regionclip_jax.models.vit import VisionTransformer
from regionclip_jax.ops import roi_align
from regionclip_jax.parallel import shard_act


def default_pooler_resolution(visual: ModifiedResNet | VisionTransformer) -> int:
    """RoIAlign output side P: 2 * res/32 for a ResNet (14 RN50, 18 RN50x4), res/patch for a ViT."""
    if isinstance(visual, ModifiedResNet):
        return 2 * (visual.input_resolution // 32)
    return visual.input_resolution // visual.patch_size


def box_mask(boxes: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Which box slots are real: finite, positive width and height (and `mask` if given).

    Args:
      boxes: `[B, R, 4]` xyxy.
      mask: optional bool `[B, R]`.

    Returns:
      bool `[B, R]`.
    """
    finite = jnp.all(jnp.isfinite(boxes), axis=-1)
    valid = finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return valid if mask is None else valid & mask


def global_boxes(image_hw: jax.Array) -> jax.Array:
    """The whole-image box `[0, 0, w, h]` of each image.

    Args:
      image_hw: int/float `[B, 2]` true (h, w) per image (or the canvas size for every image,
        which reproduces the original's padded-batch box).

    Returns:
      float32 `[B, 1, 4]` xyxy.
    """
    hw = jnp.asarray(image_hw, jnp.float32)
    zeros = jnp.zeros_like(hw[:, 0])
    return jnp.stack([zeros, zeros, hw[:, 1], hw[:, 0]], axis=-1)[:, None, :]


# ------------------------------------------------------------------------------------------- ViT


@functools.cache
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` weights of PyTorch's 1-D bicubic resize (align_corners=False, a=-0.75).

    Output sample j reads input coordinate (j + 0.5) * n_in / n_out - 0.5 from the four taps
    around it; taps past the border are clamped to the edge pixel (PyTorch's behaviour).
    """
    a = -0.75

    def k(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for j in range(n_out):
        src = (j + 0.5) * scale - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        for off in range(-1, 3):
            idx = min(max(i0 + off, 0), n_in - 1)
            m[j, idx] += k(off - t)
    return m


def interpolate_pos_embed(pos: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Resizes a ViT positional embedding to another patch grid (bicubic, PyTorch semantics).

    Args:
      pos: `[1 + g*g, W]`: class-token row, then a square g x g grid in row-major order.
      grid_hw: target (gh, gw).

    Returns:
      `[1 + gh*gw, W]` (unchanged if the grid already matches).
    """
    g = round((pos.shape[0] - 1) ** 0.5)
    gh, gw = grid_hw
    if (gh, gw) == (g, g):
        return pos
    grid = pos[1:].reshape(g, g, -1).astype(jnp.float32)
    mh = jnp.asarray(_bicubic_matrix(g, gh), jnp.float32)
    mw = jnp.asarray(_bicubic_matrix(g, gw), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("hi,iwc->hwc", mh, grid, precision=hi)
    grid = jnp.einsum("wj,hjc->hwc", mw, grid, precision=hi)
    return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(gh * gw, -1)]).astype(
        pos.dtype
    )


def vit_patch_grid(visual: VisionTransformer, images: jax.Array) -> jax.Array:
    """Post-transformer patch tokens of a ViT on any canvas, as a feature map.

    Same computation as `VisionTransformer.tokens`, except that the positional embedding is
    interpolated to the canvas' patch grid (so non-square and larger canvases work).

    Args:
      images: `[B, Hc, Wc, 3]` CLIP-normalised; Hc, Wc multiples of the patch size.

    Returns:
      `[B, Hc/p, Wc/p, W]` (before `ln_post`).
    """
    x = visual.conv1(images.astype(visual.dtype))
    n, gh, gw, w = x.shape
    pos = interpolate_pos_embed(visual.positional_embedding[...], (gh, gw))
    x = x.reshape(n, gh * gw, w)
    cls = jnp.broadcast_to(visual.class_embedding[...].astype(visual.dtype), (n, 1, w))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(visual.dtype)[None]
    x = visual.transformer(visual.ln_pre(x))
    return x[:, 1:].reshape(n, gh, gw, w)


# --------------------------------------------------------------------------------------- encoder


class RegionEncoder(nnx.Module):
    """Region embeddings from a CLIP image tower (holds the tower; adds no parameters).

    Attributes:
      visual: a `ModifiedResNet` (RegionCLIP's backbone + RoI head) or a `VisionTransformer`.
      pooler_resolution: RoIAlign output side P.
      box_chunk: if set, the RoI head (res5 + attnpool) runs over the B*R crops in chunks of this
        many (`lax.map`), bounding memory for thousands of boxes; B*R must be a multiple.
    """

    def __init__(
        self,
        visual: ModifiedResNet | VisionTransformer,
        *,
        pooler_resolution: int | None = None,
        box_chunk: int | None = None,
    ):
        self.visual = visual
        if pooler_resolution is None:
            pooler_resolution = default_pooler_resolution(visual)
        self.pooler_resolution = pooler_resolution
        self.box_chunk = box_chunk
        self.is_resnet = isinstance(visual, ModifiedResNet)

    @property
    def stride(self) -> int:
        """Stride of the pooled feature map (16 for a ResNet's res4, the patch size for a ViT)."""
        return 16 if self.is_resnet else self.visual.patch_size

    def feature_map(self, images: jax.Array) -> jax.Array:
        """images `[B, Hc, Wc, 3]` CLIP-normalised canvas -> pooled map `[B, Hc/s, Wc/s, C]`."""
        if self.is_resnet:
            return self.visual.trunk(images)
        return vit_patch_grid(self.visual, images)

    def _head(self, crops: jax.Array) -> jax.Array:
        """crops `[N, P, P, C]` -> `[N, D]`."""
        if self.is_resnet:
            return self.visual.attnpool(self.visual.res5(crops))
        v = self.visual
        pooled = crops.astype(jnp.float32).mean(axis=(1, 2)).astype(v.dtype)
        return v.ln_post(pooled) @ v.proj[...].astype(v.dtype)

    def pool(self, feature_map: jax.Array, boxes: jax.Array) -> jax.Array:
        """Region embeddings from a precomputed `feature_map`.

        Args:
          feature_map: `[B, H, W, C]` output of `feature_map`.
          boxes: float32 `[B, R, 4]` absolute xyxy in canvas pixels.

        Returns:
          `[B, R, D]` un-normalised region embeddings (attnpool output for a ResNet), compute
          dtype.
        """
        b, r = boxes.shape[:2]
        p = self.pooler_resolution
        n, chunk = b * r, self.box_chunk
        if chunk is not None and chunk < n and n % chunk:
            raise ValueError(f"B*R = {n} boxes is not a multiple of box_chunk = {chunk}")
        crops = roi_align(
            feature_map,
            boxes.astype(jnp.float32),
            output_size=(p, p),
            spatial_scale=1.0 / self.stride,
            sampling_ratio=0,
            aligned=True,
        )
        crops = crops.reshape(b * r, p, p, feature_map.shape[-1]).astype(feature_map.dtype)
        crops = shard_act(crops, ("act_batch", "act_height", "act_width", "act_channels"))
        if chunk is None or chunk >= n:
            out = self._head(crops)
        else:
            out = jax.lax.map(self._head, crops.reshape(n // chunk, chunk, p, p, -1))
            out = out.reshape(n, -1)
        return out.reshape(b, r, -1)

    def __call__(self, images: jax.Array, boxes: jax.Array) -> jax.Array:
        """Region embeddings of `boxes` in `images`.

        Args:
          images: `[B, Hc, Wc, 3]` CLIP-normalised canvases (zero padding bottom/right).
          boxes: float32 `[B, R, 4]` absolute xyxy in canvas pixels; padded slots may hold any
            finite box (their rows are computed and should be ignored, see `box_mask`).

        Returns:
          `[B, R, D]` un-normalised region embeddings.
        """
        return self.pool(self.feature_map(images), boxes)

    def with_global(
        self, images: jax.Array, boxes: jax.Array, image_hw: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Region embeddings and the whole-image ("global box") embedding in one pass.

        Args:
          images: `[B, Hc, Wc, 3]`; boxes: `[B, R, 4]`; image_hw: `[B, 2]` true (h, w).

        Returns:
          (`[B, R, D]` region embeddings, `[B, D]` global-box embeddings).
        """
        all_boxes = jnp.concatenate([boxes.astype(jnp.float32), global_boxes(image_hw)], axis=1)
        feats = self.pool(self.feature_map(images), all_boxes)
        return feats[:, :-1], feats[:, -1]
