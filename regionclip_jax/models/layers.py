"""Building blocks shared by the CLIP towers (OpenAI CLIP semantics, Flax NNX).

Numerics: parameters are stored in `param_dtype` (fp32); matmuls and convolutions run in the
compute `dtype` (fp32 or bf16); LayerNorm, softmax and frozen-BN affine factors are computed in
fp32 and cast back to the compute dtype, like OpenAI's fp16-safe `LayerNorm` subclass.

Every variable carries logical axis names (`out_sharding` metadata, see `regionclip_jax.parallel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from regionclip_jax.parallel import shard_act

Dtype = Any
# Names of the compute dtypes a config may ask for (`model.dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Initializer = Any


class Frozen(nnx.Variable):
    """A constant array carried in the model state (`rest`, not `nnx.Param`): checkpointed and
    sharded with the model, never trained (class / concept text embeddings)."""


CONV_AXES = ("kernel", "kernel", "conv_in", "conv_out")
TOKEN_AXES = ("act_batch", "act_len", "act_embed")
HEAD_AXES = ("act_batch", "act_len", "act_heads", None)

zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


def normal(std: float) -> Initializer:
    return nnx.initializers.normal(stddev=std)


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """`init` whose variables carry the logical axis names `names`."""
    return nnx.with_partitioning(init, tuple(names))


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str, str],
    std: float | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """An `nnx.Linear` (kernel `[in, out]`, bias `[out]`) with logical axes `axes=(in, out)`.

    Args:
      std: normal init std of the kernel (default: `in_features ** -0.5`).
    """
    std = in_features**-0.5 if std is None else std
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(normal(std), axes),
        bias_init=partitioned(zeros, (axes[1],)),
        rngs=rngs,
    )


class Conv(nnx.Conv):
    """`nnx.Conv` whose 1x1, stride-1, unpadded case runs as a matmul (same kernel and result).

    Two thirds of a ResNet bottleneck's convolutions are 1x1. XLA:CPU runs them as generic
    convolutions, measurably slower than the equivalent dot (see BENCHMARKS.md); on GPU/TPU XLA
    lowers both forms to the same matmul, so nothing is lost there.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        pointwise = (
            tuple(self.kernel_size) == (1, 1)
            and self.strides in (1, (1, 1), None)
            and self.padding in (0, "VALID", "SAME", ((0, 0), (0, 0)))
            and self.bias is None
            and out_sharding is None
        )
        if not pointwise:
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(inputs, kernel)
        inputs, kernel = inputs.astype(dtype), kernel.astype(dtype)
        return jnp.einsum("...c,co->...o", inputs, kernel[0, 0], precision=self.precision)


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | str = 0,
    axes: tuple[str, ...] = CONV_AXES,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> Conv:
    """A bias-free `Conv` (kernel `[kh, kw, in, out]`) with PyTorch-style symmetric padding.

    `padding` is an int p (explicit `((p, p), (p, p))`, which equals `nn.Conv2d(padding=p)`; 'SAME'
    would pad asymmetrically for the stride-2 stem conv) or 'VALID'.
    """
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    # He-normal keeps activations O(1) through the randomly initialised ResNet.
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
    return Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pad,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(init, axes),
        rngs=rngs,
    )


def avg_pool(x: jax.Array, stride: int) -> jax.Array:
    """`nn.AvgPool2d(stride)` on NHWC: window = stride, VALID, floor (extra rows/cols dropped).

    Args:
      x: `[N, H, W, C]`.

    Returns:
      `[N, H // stride, W // stride, C]`.
    """
    if stride == 1:
        return x
    _, h, w, _ = x.shape
    ho, wo = h // stride, w // stride
    # A sum of stride^2 strided slices, in fp32 so bf16 pooling does not lose precision. Not a
    # reshape + mean or reduce_window: on jax 0.12.0.1's CPU backend, bf16 conv -> f32 reduce ->
    # conv under jit returns garbage (inf/NaN); strided slices compile correctly everywhere.
    total = None
    for i in range(stride):
        for j in range(stride):
            part = x[:, i : ho * stride : stride, j : wo * stride : stride].astype(jnp.float32)
            total = part if total is None else total + part
    return (total * (1.0 / stride**2)).astype(x.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def activation_fn(name: str):
    """The MLP activation named in `CLIPConfig.activation` ("quick_gelu" or exact "gelu")."""
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu' or 'gelu'")


class FrozenBatchNorm(nnx.Module):
    """Detectron2 `FrozenBatchNorm2d`: a fixed per-channel affine map, never updated.

    y = x * scale / sqrt(var + eps) + (bias - mean * scale / sqrt(var + eps)).

    Variables: `scale`, `bias` (nnx.Param), `mean`, `var` (nnx.BatchStat), all `[C]`.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        scale_init: Initializer = ones,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        key = rngs.params()
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(key, shape, param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype), out_sharding=("norm",))
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32), out_sharding=("norm",))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[..., C]` -> same shape and dtype."""
        f32 = jnp.float32
        a = self.scale[...].astype(f32) * jax.lax.rsqrt(self.var[...].astype(f32) + self.eps)
        b = self.bias[...].astype(f32) - self.mean[...].astype(f32) * a
        return x * a.astype(x.dtype) + b.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in fp32 and cast back to the input dtype.

    Variables: `scale`, `bias` `[C]` (PyTorch `weight`, `bias`).
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        shape = (num_features,)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[..., C]` -> same shape and dtype."""
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Scaled dot-product attention with fp32 softmax statistics.

    Args:
      q: `[B, Lq, H, D]` queries (unscaled).
      k: `[B, Lk, H, D]` keys.
      v: `[B, Lk, H, D]` values.
      mask: optional bool, broadcastable to `[B, H, Lq, Lk]`; True = may attend.

    Returns:
      `[B, Lq, H, D]` in the dtype of `v`.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    logits = logits.astype(jnp.float32)
    if mask is not None:
        # finfo.min rather than -inf: a fully masked row gives uniform weights instead of NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MultiHeadAttention(nnx.Module):
    """`nn.MultiheadAttention` self-attention with a fused `in_proj` (q, k, v rows in that order).

    Variables: `in_proj.kernel [W, 3W]`, `in_proj.bias [3W]`, `out_proj.kernel [W, W]`,
    `out_proj.bias [W]` (PyTorch: `in_proj_weight [3W, W]`, `in_proj_bias`, `out_proj.*`).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        attn_std: float | None = None,
        proj_std: float | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = linear(width, 3 * width, axes=("embed", "heads"), std=attn_std, **kw)
        self.out_proj = linear(width, width, axes=("heads", "embed"), std=proj_std, **kw)
        self.heads = heads

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: `[B, L, W]`; mask: bool broadcastable to `[B, H, L, L]` -> `[B, L, W]`."""
        b, n, w = x.shape
        qkv = self.in_proj(x).reshape(b, n, 3, self.heads, w // self.heads)
        q, k, v = (shard_act(qkv[:, :, i], HEAD_AXES) for i in range(3))
        out = dot_product_attention(q, k, v, mask).reshape(b, n, w)
        return self.out_proj(out)


class MLP(nnx.Module):
    """`c_fc` (W -> hidden), activation (QuickGELU by default), `c_proj` (hidden -> W)."""

    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        fc_std: float | None = None,
        proj_std: float | None = None,
        activation: str = "quick_gelu",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation_fn(activation)
        self.c_fc = linear(width, hidden, axes=("embed", "mlp"), std=fc_std, **kw)
        self.c_proj = linear(hidden, width, axes=("mlp", "embed"), std=proj_std, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[B, L, W]` -> `[B, L, W]`."""
        h = shard_act(self.activation(self.c_fc(x)), ("act_batch", "act_len", "act_mlp"))
        return self.c_proj(h)


class ResidualAttentionBlock(nnx.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)). Submodules `ln_1`, `attn`, `ln_2`, `mlp`."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        mlp_ratio: int = 4,
        attn_std: float | None = None,
        proj_std: float | None = None,
        fc_std: float | None = None,
        activation: str = "quick_gelu",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = LayerNorm(width, param_dtype=param_dtype)
        self.attn = MultiHeadAttention(width, heads, attn_std=attn_std, proj_std=proj_std, **kw)
        self.ln_2 = LayerNorm(width, param_dtype=param_dtype)
        self.mlp = MLP(
            width, width * mlp_ratio, fc_std=fc_std, proj_std=proj_std, activation=activation, **kw
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: `[B, L, W]` -> `[B, L, W]`."""
        x = x + self.attn(self.ln_1(x), mask)
        x = x + self.mlp(self.ln_2(x))
        return shard_act(x, TOKEN_AXES)


class Transformer(nnx.Module):
    """A stack of `ResidualAttentionBlock`s in `resblocks` (an nnx.List, indices 0..layers-1).

    Initialised like OpenAI's text transformer: in_proj ~ N(0, W^-1/2), out_proj and c_proj
    ~ N(0, W^-1/2 (2 layers)^-1/2), c_fc ~ N(0, (2W)^-1/2), biases 0.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        *,
        activation: str = "quick_gelu",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        self.resblocks = nnx.List(
            [
                ResidualAttentionBlock(
                    width,
                    heads,
                    attn_std=attn_std,
                    proj_std=proj_std,
                    fc_std=fc_std,
                    activation=activation,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(layers)
            ]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: `[B, L, W]`; mask: bool broadcastable to `[B, H, L, L]` -> `[B, L, W]`."""
        x = shard_act(x, TOKEN_AXES)
        for block in self.resblocks:
            x = block(x, mask)
        return x
