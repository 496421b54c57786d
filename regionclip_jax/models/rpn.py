"""detectron2's region proposal network: ResNet (C4 / FPN) backbone + StandardRPNHead (spec §1.1, §1.3,
§5.2 "Proposals", §7), NHWC, Flax NNX.

The original's offline RPNs are plain detectron2 models: `rpn_coco_48.pth` is an R50-C4 RPN,
`rpn_lvis_866*.pth` R50-FPN ones (the `_lsj` file with BN in the backbone and FPN and a 2-conv head),
`rpn_lvis_1203_clipbackbone` an RPN head on a CLIP ResNet trunk. This module rebuilds them:

    images [B, H, W, 3] RGB 0..255 --normalize--> BGR - PIXEL_MEAN (0 in the padding)
      --Detectron2ResNet--> res4 (C4, stride 16) | res2..res5 --FPN--> p2..p6 (strides 4..64)
      --RPNHead--> per level logits [B, H*W*A], deltas [B, H*W*A, 4]
      --Box2BoxTransform(1,1,1,1) on the anchors, find_top_rpn_proposals--> proposals

Kind "features" skips the first two steps: the caller hands over feature maps (e.g. the res4 of a
CLIP ModifiedResNet), so an RPN head can sit on another backbone.

Variable names follow the detectron2 state-dict keys with our leaf names (`kernel` HWIO for
`weight` OIHW; norm `scale`, `bias`, `mean`, `var` for `weight`, `bias`, `running_mean`,
`running_var`): `backbone.stem.conv1.kernel`, `backbone.res2.0.conv1.norm.scale`,
`backbone.res2.0.shortcut.kernel`, `fpn.fpn_lateral2.kernel`, `rpn_head.conv.kernel`
(`rpn_head.conv.conv0.kernel`, `.conv1.` for a 2-conv head), `rpn_head.objectness_logits.kernel`,
`rpn_head.anchor_deltas.bias`. `regionclip_jax.convert.detectron2_rpn` maps the keys.

Anchor order equals detectron2's: levels in order, and within a level (H, W, A) flattened with A
fastest, which is the NHWC head output reshaped (detectron2 permutes its NCHW output to the same).

Differences from the original (all consequences of static shapes, documented where they act):
  - Images sit on a fixed canvas, so feature maps (and anchors) cover the whole canvas, not the
    batch's largest image. Anchors in the padding still produce candidates; clipping to the true
    image size (as detectron2 does) turns them into thin or empty boxes, and empty ones are
    masked. detectron2 has the same effect for every image smaller than its batch's largest.
  - Proposals come in `post_nms_topk` fixed slots with a validity mask (see `ops.nms`).
  - Randomly initialised weights (training from scratch, tests) zero the last norm scale of each
    bottleneck so deep FrozenBN stacks start near the identity; detectron2 always starts from
    ImageNet weights, where the init does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.losses.rpn import rpn_losses
from regionclip_jax.models.layers import CONV_AXES, Dtype, FrozenBatchNorm
from regionclip_jax.ops import boxes as box_ops
from regionclip_jax.ops.anchors import AnchorGenerator
from regionclip_jax.ops.nms import find_top_rpn_proposals
from regionclip_jax.parallel import shard_act

MAP_AXES = ("act_batch", "act_height", "act_width", "act_channels")

# detectron2 `_C.MODEL.PIXEL_MEAN` / `PIXEL_STD` of the MSRA (caffe) models, BGR order.
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (1.0, 1.0, 1.0)

RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGES = ("res2", "res3", "res4", "res5")

# Defaults of the original's RPNs (detectron2 configs; spec §5.2).
C4_DEFAULTS = dict(strides=(16,), anchor_sizes=((32, 64, 128, 256, 512),), pre_nms_topk=6000)
FPN_DEFAULTS = dict(
    strides=(4, 8, 16, 32, 64),
    anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
    pre_nms_topk=1000,
)

_msra = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # c2_msra_fill
_xavier = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")  # c2_xavier_fill


class ConvNorm(nnx.Module):
    """detectron2's `Conv2d` wrapper: a convolution, an optional bias, an optional frozen norm.

    Variables: `kernel [kh, kw, I, O]` (PyTorch `weight [O, I, kh, kw]`), `bias [O]` or None,
    `norm` (`FrozenBatchNorm`: detectron2 FrozenBN, or BN/SyncBN in eval mode) or None.
    Activations are applied by the caller.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        use_bias: bool = False,
        norm: bool = True,
        kernel_init: Any = _msra,
        axes: tuple[str | None, ...] = CONV_AXES,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype), out_sharding=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(axes[-1],))
            if use_bias
            else None
        )
        self.norm = (
            FrozenBatchNorm(out_features, param_dtype=param_dtype, rngs=rngs) if norm else None
        )
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[N, H, W, I]` -> `[N, H', W', O]` (PyTorch `Conv2d` output size, symmetric padding)."""
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if kernel.shape[:2] == (1, 1) and self.stride == 1 and self.padding == 0:
            # A 1x1 conv as a matmul: same result, faster on XLA:CPU (see layers.Conv).
            y = jnp.einsum("...c,co->...o", x, kernel[0, 0])
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=((p, p), (p, p)),
                rhs_dilation=(self.dilation, self.dilation),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.norm is not None:
            y = self.norm(y)
        return y


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`F.max_pool2d(x, kernel_size=3, stride=2, padding=1)` on NHWC (padding never wins)."""
    # A Python scalar init (not an array) lets JAX pick its differentiable max-pool primitive.
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )


class BasicStem(nnx.Module):
    """conv1 7x7 stride 2 pad 3 (no bias) + FrozenBN + relu + max-pool 3x3 stride 2 pad 1."""

    def __init__(self, out_channels: int, **kw):
        self.conv1 = ConvNorm(
            3,
            out_channels,
            7,
            stride=2,
            padding=3,
            axes=("kernel", "kernel", None, "conv_out"),
            **kw,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[N, H, W, 3]` -> `[N, ~H/4, ~W/4, C]`."""
        return max_pool_3x3_s2(jax.nn.relu(self.conv1(x)))


class BottleneckBlock(nnx.Module):
    """detectron2 `BottleneckBlock` (one group): conv1 1x1 -> conv2 3x3 -> conv3 1x1, each with a
    norm, relu after the first two and after the residual sum; `shortcut` (1x1 conv + norm, at
    the block's stride) when the channel count changes. `stride_in_1x1=True` (MSRA) puts the
    stride in conv1, False (torchvision) in conv2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        *,
        stride: int = 1,
        stride_in_1x1: bool = True,
        dilation: int = 1,
        zero_init_last: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride, **kw)
            if in_channels != out_channels
            else None
        )
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride=s1, **kw)
        self.conv2 = ConvNorm(
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=s3,
            padding=dilation,
            dilation=dilation,
            **kw,
        )
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, **kw)
        if zero_init_last:
            self.conv3.norm.scale[...] = jnp.zeros_like(self.conv3.norm.scale[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.conv1(x))
        out = jax.nn.relu(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return shard_act(jax.nn.relu(out + identity.astype(out.dtype)), MAP_AXES)


class Detectron2ResNet(nnx.Module):
    """detectron2 `build_resnet_backbone` (ResNet-50/101/152, one group, FrozenBN).

    Attributes: `stem` (`BasicStem`), `res2` .. `res<k>` (`nnx.List` of `BottleneckBlock`), built
    up to the deepest of `out_features` as in detectron2 (a C4 RPN backbone has no res5).
    Widths: stem `base_width`, stage i (0-based) bottleneck `base_width * 2**i`, output
    `4 * base_width * 2**i` (RES2_OUT_CHANNELS = 256 for base_width 64).
    """

    def __init__(
        self,
        depth: int = 50,
        base_width: int = 64,
        out_features: Sequence[str] = ("res4",),
        *,
        stride_in_1x1: bool = True,
        res5_dilation: int = 1,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
        bad = [f for f in out_features if f not in STAGES]
        if bad:
            raise ValueError(f"unknown out_features {bad}; expected some of {STAGES}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_features = tuple(out_features)
        self.dtype = dtype
        self.stem = BasicStem(base_width, **kw)
        n_stages = max(STAGES.index(f) for f in out_features) + 1
        in_ch = base_width
        for i in range(n_stages):
            bottleneck = base_width * 2**i
            out_ch = 4 * bottleneck
            dilation = res5_dilation if i == 3 else 1
            first_stride = 1 if i == 0 or (i == 3 and dilation == 2) else 2
            blocks = []
            for j in range(RESNET_BLOCKS[depth][i]):
                blocks.append(
                    BottleneckBlock(
                        in_ch,
                        out_ch,
                        bottleneck,
                        stride=first_stride if j == 0 else 1,
                        stride_in_1x1=stride_in_1x1,
                        dilation=dilation,
                        **kw,
                    )
                )
                in_ch = out_ch
            setattr(self, STAGES[i], nnx.List(blocks))
        self.n_stages = n_stages

    def output_channels(self, name: str) -> int:
        return int(self.stem.conv1.kernel.shape[-1]) * 4 * 2 ** STAGES.index(name)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """Stage features.

        Args:
          x: `[N, H, W, 3]` normalised BGR images.

        Returns:
          `{name: [N, h, w, C]}` for `out_features`: res2 stride 4, res3 8, res4 16, res5 32
          (PyTorch conv output sizes, e.g. 64 -> 16, 8, 4, 2).
        """
        x = shard_act(self.stem(shard_act(x.astype(self.dtype), MAP_AXES)), MAP_AXES)
        out = {}
        for name in STAGES[: self.n_stages]:
            for block in getattr(self, name):
                x = block(x)
            if name in self.out_features:
                out[name] = x
        return out


class FPN(nnx.Module):
    """detectron2 `FPN` on res2..res5 with `LastLevelMaxPool` (`build_resnet_fpn_backbone`).

    Attributes: `fpn_lateral{2..5}` (1x1), `fpn_output{2..5}` (3x3 pad 1); with bias when
    `norm=False` (the default), with a norm and no bias when `norm=True` (the LSJ RPN's BN).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        *,
        norm: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(
            use_bias=not norm,
            norm=norm,
            kernel_init=_xavier,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        for level, c in zip(range(2, 6), in_channels):
            setattr(self, f"fpn_lateral{level}", ConvNorm(c, out_channels, 1, **kw))
            setattr(
                self, f"fpn_output{level}", ConvNorm(out_channels, out_channels, 3, padding=1, **kw)
            )

    def __call__(self, feats: dict[str, jax.Array]) -> list[jax.Array]:
        """`{res2..res5}` -> `[p2, p3, p4, p5, p6]`, each `[N, h_l, w_l, out_channels]`.

        Top-down: nearest 2x upsampling of the coarser merged map plus the lateral 1x1; each
        sum goes through its 3x3 output conv; p6 = p5[:, ::2, ::2] (max-pool k=1 s=2). The
        upsampled map must match the lateral's size: canvases divisible by 32 (detectron2's FPN
        `size_divisibility`).
        """
        prev = self.fpn_lateral5(feats["res5"])
        outs = [self.fpn_output5(prev)]
        for level in (4, 3, 2):
            lateral = getattr(self, f"fpn_lateral{level}")(feats[f"res{level}"])
            up = jnp.repeat(jnp.repeat(prev, 2, axis=1), 2, axis=2)
            if up.shape[1:3] != lateral.shape[1:3]:
                raise ValueError(
                    f"FPN: res{level} is {lateral.shape[1:3]} but the upsampled res{level + 1} is "
                    f"{up.shape[1:3]}; pad images to a multiple of 32"
                )
            prev = lateral + up
            outs.insert(0, getattr(self, f"fpn_output{level}")(prev))
        outs.append(outs[-1][:, ::2, ::2])
        return [shard_act(o, MAP_AXES) for o in outs]


class _Convs(nnx.Module):
    """detectron2's `nn.Sequential` of RPN convs: children `conv0`, `conv1`, ... (each + relu)."""

    def __init__(self, convs: Sequence[ConvNorm]):
        for i, c in enumerate(convs):
            setattr(self, f"conv{i}", c)
        self.n = len(convs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.n):
            x = jax.nn.relu(getattr(self, f"conv{i}")(x))
        return x


class RPNHead(nnx.Module):
    """detectron2 `StandardRPNHead`, shared over levels.

    Attributes: `conv` (3x3 pad 1 with bias, relu) when `num_convs == 1`; for `CONV_DIMS
    [-1, -1]` (the LSJ RPN) an `nn.Sequential` whose state-dict keys are
    `rpn_head.conv.conv0.{weight,bias}`, `rpn_head.conv.conv1.{weight,bias}` (detectron2 names
    the children `conv{k}`); `objectness_logits` (1x1 -> A), `anchor_deltas` (1x1 -> 4A).
    Init as detectron2: normal(0.01) kernels, zero biases.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        *,
        num_convs: int = 1,
        box_dim: int = 4,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        kw = dict(
            use_bias=True,
            norm=False,
            kernel_init=nnx.initializers.normal(0.01),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        convs = [ConvNorm(in_channels, in_channels, 3, padding=1, **kw) for _ in range(num_convs)]
        self.conv = convs[0] if num_convs == 1 else _Convs(convs)
        self.num_convs = num_convs
        self.objectness_logits = ConvNorm(in_channels, num_anchors, 1, **kw)
        self.anchor_deltas = ConvNorm(in_channels, num_anchors * box_dim, 1, **kw)
        self.box_dim = box_dim

    def __call__(self, features: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """Per level logits and deltas in anchor order.

        Args:
          features: per level `[B, H_l, W_l, C]`.

        Returns:
          logits: per level `[B, H_l * W_l * A]` float32.
          deltas: per level `[B, H_l * W_l * A, box_dim]` float32.
        """
        logits, deltas = [], []
        for x in features:
            t = self.conv(x) if self.num_convs > 1 else jax.nn.relu(self.conv(x))
            b = x.shape[0]
            logits.append(self.objectness_logits(t).astype(jnp.float32).reshape(b, -1))
            deltas.append(self.anchor_deltas(t).astype(jnp.float32).reshape(b, -1, self.box_dim))
        return logits, deltas


def _per_level_sizes(anchor_sizes, n_levels: int):
    """Flat sizes -> one size per level (multi-level) or all sizes on the level (one level)."""
    sizes = list(anchor_sizes)
    if all(isinstance(s, (Sequence, np.ndarray)) for s in sizes):
        return tuple(tuple(float(x) for x in s) for s in sizes)
    sizes = [float(s) for s in sizes]
    if n_levels == 1:
        return (tuple(sizes),)
    if len(sizes) != n_levels:
        raise ValueError(
            f"{len(sizes)} flat anchor sizes for {n_levels} levels; pass one per level"
        )
    return tuple((s,) for s in sizes)


class RPN(nnx.Module):
    """A detectron2 RPN: backbone ("c4" | "fpn") or given features ("features") + `RPNHead`.

    Attributes: `backbone` (`Detectron2ResNet`; None for "features"), `fpn` (`FPN`; "fpn"
    only), `rpn_head` (`RPNHead`), plus the static settings below.

    Args:
      kind: "c4" (res4, stride 16), "fpn" (p2..p6, strides 4..64) or "features" (the caller
        passes feature maps to `from_features` / `losses_from_features`).
      depth, base_width, stride_in_1x1, fpn_norm, fpn_channels: backbone shape ("c4"/"fpn").
      in_channels, strides: feature channels and per-level strides ("features" only).
      anchor_sizes: per level sizes, or a flat list (one size per level when several levels,
        all sizes on the level when one). Default: detectron2's for the kind.
      aspect_ratios: h / w ratios (all levels).
      anchor_offset: detectron2 `ANCHOR_GENERATOR.OFFSET` (0.0).
      num_convs: 3x3 convs in the head (LSJ RPN: 2).
      pre_nms_topk: candidates per level (default C4 6000, FPN 1000: the test settings).
      post_nms_topk, nms_thresh, min_box_size: detectron2 test settings (1000, 0.7, 0).
      pixel_mean, pixel_std, input_format: the detectron2 model's normalisation; RGB 0..255 input
        is flipped to BGR for "BGR"; with sum(pixel_mean) < 3 pixels are divided by 255 first
        (RegionCLIP's `offline_div_pixel`).
      batch_size_per_image, positive_fraction, iou_thresholds, smooth_l1_beta: training
        (detectron2 defaults 256, 0.5, (0.3, 0.7), 0.0).
    """

    def __init__(
        self,
        kind: str = "c4",
        *,
        depth: int = 50,
        base_width: int = 64,
        stride_in_1x1: bool = True,
        fpn_norm: bool = False,
        fpn_channels: int = 256,
        in_channels: int | None = None,
        strides: Sequence[int] | None = None,
        anchor_sizes: Sequence[Any] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_offset: float = 0.0,
        num_convs: int = 1,
        pre_nms_topk: int | None = None,
        post_nms_topk: int = 1000,
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        pixel_mean: Sequence[float] = PIXEL_MEAN_BGR,
        pixel_std: Sequence[float] = PIXEL_STD_BGR,
        input_format: str = "BGR",
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
        smooth_l1_beta: float = 0.0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if kind == "c4":
            defaults = C4_DEFAULTS
            self.backbone = Detectron2ResNet(
                depth, base_width, ("res4",), stride_in_1x1=stride_in_1x1, **kw
            )
            self.fpn = None
            channels = self.backbone.output_channels("res4")
        elif kind == "fpn":
            defaults = FPN_DEFAULTS
            self.backbone = Detectron2ResNet(
                depth, base_width, STAGES, stride_in_1x1=stride_in_1x1, **kw
            )
            self.fpn = FPN(
                [self.backbone.output_channels(s) for s in STAGES],
                fpn_channels,
                norm=fpn_norm,
                **kw,
            )
            channels = fpn_channels
        elif kind == "features":
            if in_channels is None or strides is None:
                raise ValueError("kind='features' needs in_channels and strides")
            defaults = dict(C4_DEFAULTS, strides=tuple(strides))
            self.backbone = None
            self.fpn = None
            channels = int(in_channels)
        else:
            raise ValueError(f"kind must be 'c4', 'fpn' or 'features', got {kind!r}")
        if strides is not None and kind != "features" and tuple(strides) != defaults["strides"]:
            raise ValueError(f"kind {kind!r} has strides {defaults['strides']}, got {strides}")
        self.kind = kind
        self.strides = tuple(int(s) for s in defaults["strides"])
        sizes = defaults["anchor_sizes"] if anchor_sizes is None else anchor_sizes
        self.anchor_generator = AnchorGenerator(
            sizes=_per_level_sizes(sizes, len(self.strides)),
            aspect_ratios=(tuple(float(r) for r in aspect_ratios),),
            strides=self.strides,
            offset=float(anchor_offset),
        )
        num_anchors = set(self.anchor_generator.num_anchors)
        if len(num_anchors) != 1:
            raise ValueError(f"every level needs the same number of anchors, got {num_anchors}")
        self.rpn_head = RPNHead(channels, num_anchors.pop(), num_convs=num_convs, **kw)
        self.pre_nms_topk = int(defaults["pre_nms_topk"] if pre_nms_topk is None else pre_nms_topk)
        self.post_nms_topk = int(post_nms_topk)
        self.nms_thresh = float(nms_thresh)
        self.min_box_size = float(min_box_size)
        self.pixel_mean = tuple(float(x) for x in pixel_mean)
        self.pixel_std = tuple(float(x) for x in pixel_std)
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")
        self.input_format = input_format
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.iou_thresholds = tuple(float(x) for x in iou_thresholds)
        self.smooth_l1_beta = float(smooth_l1_beta)

    # -- inputs and features ------------------------------------------------------------------

    def normalize(self, images: jax.Array, image_hw: jax.Array) -> jax.Array:
        """RGB 0..255 `[B, H, W, 3]` -> the detectron2 model's input, float32, 0 in the padding.

        detectron2 (and RegionCLIP's `offline_preprocess_image`) normalises each image, then
        zero-pads the batch: padding is 0 *after* normalisation.
        """
        x = images.astype(jnp.float32)
        if self.input_format == "BGR":
            x = x[..., ::-1]
        if sum(self.pixel_mean) < 3.0:
            x = x / 255.0
        x = (x - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
        hc, wc = images.shape[1:3]
        hw = jnp.asarray(image_hw)
        inside = (jnp.arange(hc)[None, :, None] < hw[:, 0, None, None]) & (
            jnp.arange(wc)[None, None, :] < hw[:, 1, None, None]
        )
        return jnp.where(inside[..., None], x, 0.0)

    def features(self, images: jax.Array, image_hw: jax.Array) -> list[jax.Array]:
        """Per-level maps the head sees: `[res4]` (C4) or `[p2..p6]` (FPN).

        Args:
          images: `[B, H, W, 3]` RGB 0..255 floats (zero padding beyond `image_hw`).
          image_hw: `[B, 2]` int true (h, w).
        """
        if self.backbone is None:
            raise ValueError("kind='features': call from_features / losses_from_features")
        feats = self.backbone(self.normalize(images, image_hw))
        if self.fpn is None:
            return [feats["res4"]]
        return self.fpn(feats)

    def anchors(self, features: Sequence[jax.Array]) -> list[np.ndarray]:
        """Per level `[H_l * W_l * A, 4]` float32 xyxy anchors (constants of the static shapes)."""
        return self.anchor_generator([tuple(f.shape[1:3]) for f in features])

    def _check_levels(self, features: Sequence[jax.Array]) -> None:
        if len(features) != len(self.strides):
            raise ValueError(f"{len(features)} feature maps for strides {self.strides}")

    # -- inference -----------------------------------------------------------------------------

    def from_features(
        self, features: Sequence[jax.Array], image_hw: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Proposals from per-level features (detectron2 `RPN.forward` in eval mode).

        Args:
          features: per level `[B, H_l, W_l, C]` (strides `self.strides`).
          image_hw: `[B, 2]` true (h, w) of each image (clip target).

        Returns:
          boxes: `[B, post_nms_topk, 4]` xyxy in canvas pixels, 0 in padding slots.
          objectness_logits: `[B, post_nms_topk]` raw logits, decreasing, -inf in padding.
          valid: `[B, post_nms_topk]` bool.
        """
        self._check_levels(features)
        logits, deltas = self.rpn_head(features)
        transform = box_ops.Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
        proposals = [
            transform.apply_deltas(d, jnp.asarray(a))
            for d, a in zip(deltas, self.anchors(features))
        ]
        return find_top_rpn_proposals(
            proposals,
            logits,
            image_hw,
            self.nms_thresh,
            self.pre_nms_topk,
            self.post_nms_topk,
            self.min_box_size,
        )

    def __call__(
        self, images: jax.Array, image_hw: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Proposals for RGB 0..255 images `[B, H, W, 3]`; returns as `from_features`."""
        image_hw = jnp.asarray(image_hw)
        return self.from_features(self.features(images, image_hw), image_hw)

    # -- training ------------------------------------------------------------------------------

    def losses_from_features(
        self,
        features: Sequence[jax.Array],
        image_hw: jax.Array,
        gt_boxes: jax.Array,
        gt_mask: jax.Array,
        key: jax.Array,
    ) -> dict[str, jax.Array]:
        """detectron2 `RPN.losses` on per-level features (see `losses.rpn.rpn_losses`).

        Args:
          features: per level `[B, H_l, W_l, C]`.
          image_hw: `[B, 2]` (unused by the loss: detectron2 keeps boundary-crossing anchors).
          gt_boxes: `[B, G, 4]` xyxy canvas pixels; gt_mask: `[B, G]` bool.
          key: PRNG key for anchor sampling.

        Returns:
          `{"loss_rpn_cls": [], "loss_rpn_loc": []}` float32.
        """
        del image_hw
        self._check_levels(features)
        logits, deltas = self.rpn_head(features)
        anchors = np.concatenate(self.anchors(features), axis=0)
        return rpn_losses(
            jnp.asarray(anchors),
            jnp.concatenate(logits, axis=1),
            jnp.concatenate(deltas, axis=1),
            gt_boxes,
            gt_mask,
            key,
            batch_size_per_image=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
            iou_thresholds=self.iou_thresholds,
            smooth_l1_beta=self.smooth_l1_beta,
        )

    def losses(
        self,
        images: jax.Array,
        image_hw: jax.Array,
        gt_boxes: jax.Array,
        gt_mask: jax.Array,
        key: jax.Array,
    ) -> dict[str, jax.Array]:
        """RPN training losses for RGB 0..255 images `[B, H, W, 3]`; see `losses_from_features`."""
        image_hw = jnp.asarray(image_hw)
        return self.losses_from_features(
            self.features(images, image_hw), image_hw, gt_boxes, gt_mask, key
        )
