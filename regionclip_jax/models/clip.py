"""The two-tower CLIP model (OpenAI `clip/model.py` semantics) in Flax NNX.

Variable paths joined with '.' equal OpenAI's state-dict keys up to leaf renames (conv/linear
`weight` -> `kernel`, norm `weight` -> `scale`, BN `running_mean/var` -> `mean/var`,
`token_embedding.weight` -> `token_embedding.embedding`, `attn.in_proj_weight/bias` ->
`attn.in_proj.kernel/bias`); `regionclip_jax.convert.state_dict` maps between the two.

Precision: parameters in `param_dtype` (fp32); matmuls/convs in `dtype` (fp32 default, bf16 on
accelerators); LayerNorm, softmax, frozen-BN factors and the final logits in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from regionclip_jax.models.layers import Dtype
from regionclip_jax.models.presets import CLIPConfig, get_preset
from regionclip_jax.models.resnet import ModifiedResNet
from regionclip_jax.models.text import TEXT_MODULE_NAMES, encode_text, text_modules
from regionclip_jax.models.vit import VisionTransformer


def build_visual(
    config: CLIPConfig,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> ModifiedResNet | VisionTransformer:
    """The image tower that `config` describes (ModifiedResNet or VisionTransformer)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if config.is_resnet:
        return ModifiedResNet(
            config.vision_layers,
            config.embed_dim,
            config.vision_heads,
            config.image_resolution,
            config.vision_width,
            **kw,
        )
    return VisionTransformer(
        config.image_resolution,
        config.vision_patch_size,
        config.vision_width,
        config.vision_layers,
        config.vision_heads,
        config.embed_dim,
        activation=config.activation,
        **kw,
    )


class CLIP(nnx.Module):
    """CLIP: `visual` image tower + text tower + `logit_scale`.

    Attributes: `visual`, `token_embedding`, `positional_embedding [77, W]`, `transformer`,
    `ln_final`, `text_projection [W, E]`, `logit_scale` (scalar, init log(1/0.07)), `config`.
    """

    def __init__(
        self,
        config: CLIPConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.visual = build_visual(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for name, value in text_modules(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        ).items():
            setattr(self, name, value)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), param_dtype), out_sharding=())

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        **overrides: Any,
    ) -> CLIP:
        """A randomly initialised preset ('RN50', 'ViT-B/16', ...); `overrides` replace config
        fields (e.g. `image_resolution=448`)."""
        config = get_preset(name)
        if overrides:
            config = config.replace(**overrides)
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images: `[N, R, R, 3]` CLIP-normalised, R = image_resolution -> `[N, E]` (un-normalised,
        compute dtype)."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens: int `[N, L]`, L <= context_length -> `[N, E]` (un-normalised, compute dtype)."""
        return encode_text(
            tokens, dtype=self.dtype, **{k: getattr(self, k) for k in TEXT_MODULE_NAMES}
        )

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scaled cosine similarities, like OpenAI's `CLIP.forward`.

        Args:
          images: `[N, R, R, 3]` CLIP-normalised images.
          tokens: int `[M, L]` BPE ids.

        Returns:
          `(logits_per_image [N, M], logits_per_text [M, N])`, float32.
        """
        img = self.encode_image(images).astype(jnp.float32)
        txt = self.encode_text(tokens).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits = jnp.exp(self.logit_scale[...].astype(jnp.float32)) * img @ txt.T
        return logits, logits.T
