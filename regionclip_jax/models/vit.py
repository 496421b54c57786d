"""OpenAI CLIP's VisionTransformer image tower, NHWC inputs.

    images [N, R, R, 3] --conv1 (patchify)--> [N, g, g, W] --> g*g patch tokens (row-major)
    prepend class_embedding, + positional_embedding, ln_pre, transformer  -> tokens [N, g*g+1, W]
    ln_post(token 0) @ proj                                               -> [N, E]

with g = R / patch. `tokens(x)` exposes the post-transformer tokens for region pooling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from regionclip_jax.models.layers import TOKEN_AXES, Dtype, LayerNorm, Transformer, conv
from regionclip_jax.parallel import shard_act


class VisionTransformer(nnx.Module):
    """CLIP ViT. Attributes (OpenAI names): `conv1` (no bias), `class_embedding [W]`,
    `positional_embedding [g*g+1, W]`, `ln_pre`, `transformer`, `ln_post`, `proj [W, E]`."""

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        *,
        activation: str = "quick_gelu",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.dtype = dtype
        grid = input_resolution // patch_size
        self.conv1 = conv(
            3,
            width,
            patch_size,
            stride=patch_size,
            padding="VALID",
            axes=("kernel", "kernel", None, "embed"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        scale = width**-0.5
        normal = jax.random.normal
        self.class_embedding = nnx.Param(
            scale * normal(rngs.params(), (width,), param_dtype), out_sharding=("embed",)
        )
        self.positional_embedding = nnx.Param(
            scale * normal(rngs.params(), (grid * grid + 1, width), param_dtype),
            out_sharding=("pos", "embed"),
        )
        self.ln_pre = LayerNorm(width, param_dtype=param_dtype)
        self.transformer = Transformer(
            width,
            layers,
            heads,
            activation=activation,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.ln_post = LayerNorm(width, param_dtype=param_dtype)
        self.proj = nnx.Param(
            scale * normal(rngs.params(), (width, output_dim), param_dtype),
            out_sharding=("embed", "proj"),
        )

    def tokens(self, x: jax.Array) -> jax.Array:
        """Post-transformer tokens (before `ln_post`).

        Args:
          x: `[N, R, R, 3]` CLIP-normalised images; (R/patch)^2 + 1 must equal the length of
            `positional_embedding` (no interpolation).

        Returns:
          `[N, g*g + 1, W]`: token 0 is the class token, then patches in row-major order. Apply
          `ln_post` and `@ proj` to map tokens to the joint embedding space.
        """
        x = self.conv1(x.astype(self.dtype))
        n, gh, gw, w = x.shape
        pos = self.positional_embedding[...]
        if gh * gw + 1 != pos.shape[0]:
            raise ValueError(
                f"a {gh}x{gw} patch grid needs {gh * gw + 1} positions, but "
                f"positional_embedding has {pos.shape[0]}"
            )
        x = x.reshape(n, gh * gw, w)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, w))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)[None]
        x = shard_act(self.ln_pre(x), TOKEN_AXES)
        return self.transformer(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[N, R, R, 3]` CLIP-normalised images -> `[N, E]` (un-normalised)."""
        cls = self.ln_post(self.tokens(x)[:, 0])
        return cls @ self.proj[...].astype(self.dtype)
