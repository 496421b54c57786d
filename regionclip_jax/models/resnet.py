"""OpenAI CLIP's ModifiedResNet image tower (spec §2.1-2.2), NHWC, with frozen BatchNorm.

Differences from a torchvision ResNet: a 3-conv stem with a 2x2 average pool, anti-aliased strided
blocks (stride-1 convs followed by a 2x2 average pool) and an attention pool instead of the global
average pool. All normalisation is `FrozenBatchNorm` (RegionCLIP's `NORM: FrozenBN`).

The forward pass splits into parts that the region encoder recombines:

    images [N, H, W, 3] --trunk--> res4 [N, H/16, W/16, 16w]      (stem + layer1..layer3)
    res4 (or RoIAlign'ed res4 crops) --res5--> [N', h/2, w/2, 32w]  (layer4)
    res5 --attnpool--> [N', E]                                      (needs h/2 = res/32)

`__call__(images) == attnpool(res5(trunk(images)))`. w is the stem width (64 for RN50).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from regionclip_jax.models.layers import (
    Dtype,
    FrozenBatchNorm,
    avg_pool,
    conv,
    dot_product_attention,
    linear,
)
from regionclip_jax.parallel import shard_act

MAP_AXES = ("act_batch", "act_height", "act_width", "act_channels")


class Bottleneck(nnx.Module):
    """CLIP's anti-aliased bottleneck (expansion 4).

    conv1 1x1 -> bn1 -> relu -> conv2 3x3 (pad 1) -> bn2 -> relu -> avgpool(stride) -> conv3 1x1 ->
    bn3, plus the identity branch (`downsample` = avgpool(stride) -> [0] conv 1x1 -> [1] BN when the
    stride or the channel count changes), then relu.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out = planes * self.expansion
        self.conv1 = conv(inplanes, planes, 1, **kw)
        self.bn1 = FrozenBatchNorm(planes, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, padding=1, **kw)
        self.bn2 = FrozenBatchNorm(planes, param_dtype=param_dtype, rngs=rngs)
        self.conv3 = conv(planes, out, 1, **kw)
        # Zero-init of the last BN scale makes each random block start as the identity (OpenAI).
        self.bn3 = FrozenBatchNorm(
            out, scale_init=nnx.initializers.zeros, param_dtype=param_dtype, rngs=rngs
        )
        self.stride = stride
        if stride > 1 or inplanes != out:
            # PyTorch's Sequential{"-1": AvgPool2d, "0": conv, "1": BN}: the pool has no
            # parameters, so only the conv and BN are stored, at indices 0 and 1.
            self.downsample = nnx.List(
                [
                    conv(inplanes, out, 1, **kw),
                    FrozenBatchNorm(out, param_dtype=param_dtype, rngs=rngs),
                ]
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[N, H, W, inplanes]` -> `[N, H/stride, W/stride, 4 planes]`."""
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = avg_pool(out, self.stride)
        out = self.bn3(self.conv3(out))
        identity = x
        if self.downsample is not None:
            ds_conv, ds_bn = self.downsample
            identity = ds_bn(ds_conv(avg_pool(x, self.stride)))
        return shard_act(jax.nn.relu(out + identity), MAP_AXES)


class AttentionPool2d(nnx.Module):
    """CLIP's attention pool: mean token prepended, learned positions, token-0 attention output.

    Variables: `positional_embedding [S*S+1, C]`, `q_proj`, `k_proj`, `v_proj` (C -> C, with bias),
    `c_proj` (C -> output_dim).
    """

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_heads: int,
        output_dim: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        pos = jax.random.normal(rngs.params(), (spacial_dim**2 + 1, embed_dim), param_dtype)
        self.positional_embedding = nnx.Param(pos / embed_dim**0.5, out_sharding=("pos", "embed"))
        kw = dict(std=embed_dim**-0.5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = linear(embed_dim, embed_dim, axes=("embed", "heads"), **kw)
        self.q_proj = linear(embed_dim, embed_dim, axes=("embed", "heads"), **kw)
        self.v_proj = linear(embed_dim, embed_dim, axes=("embed", "heads"), **kw)
        self.c_proj = linear(embed_dim, output_dim, axes=("heads", "proj"), **kw)
        self.num_heads = num_heads
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pools a feature map to one embedding per image.

        Args:
          x: `[N, S, S, C]` (res5 map; S*S + 1 must equal the positional-embedding length,
            there is no interpolation, spec §2.2).

        Returns:
          `[N, output_dim]` in the compute dtype.
        """
        n, h, w, c = x.shape
        pos = self.positional_embedding[...]
        if h * w + 1 != pos.shape[0]:
            raise ValueError(
                f"attnpool input {h}x{w} needs {h * w + 1} positions, but positional_embedding "
                f"has {pos.shape[0]} (= S*S+1 with S = input_resolution/32)"
            )
        tokens = x.reshape(n, h * w, c).astype(self.dtype)
        mean = tokens.astype(jnp.float32).mean(axis=1, keepdims=True).astype(self.dtype)
        tokens = jnp.concatenate([mean, tokens], axis=1) + pos.astype(self.dtype)[None]
        tokens = shard_act(tokens, ("act_batch", "act_len", "act_embed"))
        d = c // self.num_heads
        # Only token 0 is returned, so only its query is needed (OpenAI's current query=x[:1]).
        q = self.q_proj(tokens[:, :1]).reshape(n, 1, self.num_heads, d)
        k = self.k_proj(tokens).reshape(n, h * w + 1, self.num_heads, d)
        v = self.v_proj(tokens).reshape(n, h * w + 1, self.num_heads, d)
        out = dot_product_attention(q, k, v).reshape(n, c)
        return self.c_proj(out)


class ModifiedResNet(nnx.Module):
    """CLIP's ModifiedResNet image tower. Inputs are NHWC, CLIP-normalised float images.

    Attributes (OpenAI names): `conv1, bn1, conv2, bn2, conv3, bn3` (stem), `layer1..layer4`
    (nnx.List of `Bottleneck`), `attnpool` (`AttentionPool2d`).
    """

    def __init__(
        self,
        layers: Sequence[int],
        output_dim: int,
        heads: int,
        input_resolution: int = 224,
        width: int = 64,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.width = width
        self.dtype = dtype
        # The first conv sees 3 RGB channels: never shard its input axis.
        stem_axes = ("kernel", "kernel", None, "conv_out")
        self.conv1 = conv(3, width // 2, 3, stride=2, padding=1, axes=stem_axes, **kw)
        self.bn1 = FrozenBatchNorm(width // 2, **bn)
        self.conv2 = conv(width // 2, width // 2, 3, padding=1, **kw)
        self.bn2 = FrozenBatchNorm(width // 2, **bn)
        self.conv3 = conv(width // 2, width, 3, padding=1, **kw)
        self.bn3 = FrozenBatchNorm(width, **bn)

        inplanes = width
        stages = []
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride, **kw)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes, **kw) for _ in range(1, blocks)]
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim, **kw)

    def stem(self, x: jax.Array) -> jax.Array:
        """x: `[N, H, W, 3]` -> `[N, H/4, W/4, w]` (3 convs, then a 2x2 average pool)."""
        x = shard_act(x.astype(self.dtype), MAP_AXES)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        return shard_act(avg_pool(x, 2), MAP_AXES)

    @staticmethod
    def _stage(blocks: nnx.List, x: jax.Array) -> jax.Array:
        for block in blocks:
            x = block(x)
        return x

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """All stage outputs (the backbone of a detector; layer4 included).

        Args:
          x: `[N, H, W, 3]` images.

        Returns:
          dict with `res2 [N, H/4, W/4, 4w]`, `res3 [N, H/8, W/8, 8w]`,
          `res4 [N, H/16, W/16, 16w]`, `res5 [N, H/32, W/32, 32w]` (floor division at each pool).
        """
        res2 = self._stage(self.layer1, self.stem(x))
        res3 = self._stage(self.layer2, res2)
        res4 = self._stage(self.layer3, res3)
        res5 = self._stage(self.layer4, res4)
        return dict(res2=res2, res3=res3, res4=res4, res5=res5)

    def trunk(self, x: jax.Array, freeze_at: int = 0) -> jax.Array:
        """Stem + layer1..layer3 (RegionCLIP's C4 backbone).

        Args:
          x: `[N, H, W, 3]` images.
          freeze_at: detectron2 FREEZE_AT: no gradient flows into the stem (>= 1) and into
            layer1..layer(freeze_at - 1) (RegionCLIP: 2), which also skips their backward pass.
            The optimizer must still exclude their parameters (weight decay would move them).

        Returns:
          res4 `[N, H/16, W/16, 16w]` (1024 channels for RN50), stride 16.
        """
        x = self.stem(x)
        if freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3), start=2):
            x = self._stage(stage, x)
            if freeze_at >= i:
                x = jax.lax.stop_gradient(x)
        return x

    def res5(self, x: jax.Array) -> jax.Array:
        """layer4 alone (RegionCLIP's res5 RoI head).

        Args:
          x: `[N, h, w, 16w]` res4 features or RoIAlign'ed crops of them.

        Returns:
          `[N, h/2, w/2, 32w]` (2048 channels for RN50).
        """
        return self._stage(self.layer4, x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[N, res, res, 3]` CLIP-normalised images -> `[N, output_dim]` (un-normalised)."""
        return self.attnpool(self.res5(self.trunk(x)))
