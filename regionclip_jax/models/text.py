"""CLIP's text tower as reusable pieces.

OpenAI's CLIP keeps the text modules directly on the model (`token_embedding`,
`positional_embedding`, `transformer`, `ln_final`, `text_projection`), and RegionCLIP keeps the same
names under `lang_encoder.`. So the pieces are built by `text_modules` and run by `encode_text`;
`CLIP` stores them as its own attributes and `TextEncoder` is the stand-alone (lang_encoder) form.

    tokens int[N, L] -> token_embedding + positional_embedding[:L] -> causal transformer
    -> ln_final -> token at argmax(tokens) (the EOT token, id 49407 is the largest id)
    -> @ text_projection -> [N, E]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from regionclip_jax.models.layers import TOKEN_AXES, Dtype, LayerNorm, Transformer, partitioned
from regionclip_jax.models.presets import CLIPConfig
from regionclip_jax.parallel import shard_act

TEXT_MODULE_NAMES = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "ln_final",
    "text_projection",
)


def causal_mask(length: int) -> jax.Array:
    """bool `[L, L]`, True on and below the diagonal (query i may attend keys j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))


def text_modules(
    config: CLIPConfig,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> dict[str, Any]:
    """Builds the text-tower variables and modules, keyed by `TEXT_MODULE_NAMES`.

    Returns:
      dict with `token_embedding` (nnx.Embed, `embedding [V, W]`), `positional_embedding`
      (nnx.Param `[context_length, W]`), `transformer` (`Transformer`), `ln_final` (`LayerNorm`),
      `text_projection` (nnx.Param `[W, E]`). Init as OpenAI's `initialize_parameters`.
    """
    width = config.transformer_width
    token_embedding = nnx.Embed(
        config.vocab_size,
        width,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs,
    )
    positional_embedding = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (config.context_length, width), param_dtype),
        out_sharding=("pos", "embed"),
    )
    transformer = Transformer(
        width,
        config.transformer_layers,
        config.transformer_heads,
        activation=config.activation,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    ln_final = LayerNorm(width, param_dtype=param_dtype)
    text_projection = nnx.Param(
        width**-0.5 * jax.random.normal(rngs.params(), (width, config.embed_dim), param_dtype),
        out_sharding=("embed", "proj"),
    )
    return dict(
        token_embedding=token_embedding,
        positional_embedding=positional_embedding,
        transformer=transformer,
        ln_final=ln_final,
        text_projection=text_projection,
    )


def encode_text(
    tokens: jax.Array,
    *,
    token_embedding: nnx.Embed,
    positional_embedding: nnx.Param,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: nnx.Param,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """Text embeddings, un-normalised (like OpenAI's `encode_text`).

    Args:
      tokens: int `[N, L]` BPE ids, zero-padded, with L <= context_length (usually 77). The
        pooled position is `argmax(tokens)`, i.e. the EOT token (or, for a caption truncated
        without EOT, its largest id, as in RegionCLIP). Because attention is causal, dropping
        trailing padding (L < 77) leaves the result unchanged.
      dtype: compute dtype.

    Returns:
      `[N, E]` in `dtype`.
    """
    n, length = tokens.shape
    pos = positional_embedding[...]
    if length > pos.shape[0]:
        raise ValueError(f"tokens have length {length} > context_length {pos.shape[0]}")
    x = token_embedding(tokens).astype(dtype) + pos[:length].astype(dtype)[None]
    x = shard_act(x, TOKEN_AXES)
    x = transformer(x, causal_mask(length)[None, None])
    x = ln_final(x)
    eot = jnp.argmax(tokens, axis=-1)
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return x @ text_projection[...].astype(dtype)


class TextEncoder(nnx.Module):
    """The text tower as its own module (RegionCLIP's `lang_encoder`), same variable names."""

    def __init__(
        self,
        config: CLIPConfig,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in text_modules(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        ).items():
            setattr(self, name, value)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int `[N, L]` -> `[N, E]` (un-normalised)."""
        return encode_text(
            tokens, dtype=self.dtype, **{k: getattr(self, k) for k in TEXT_MODULE_NAMES}
        )
