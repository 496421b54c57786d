"""RoIAlign as a Pallas kernel: separable weights, one fused program per (RoI, channel block).

Status: tested only in interpret mode on CPU (no GPU or TPU was available while writing it);
compiled performance on GPU (Triton) and TPU (Mosaic) is not measured yet.

Design. With the separable weights of `roi_align.py` (`Wy [N, oh, H]`, `Wx [N, ow, W]`, which
already average all samples of each bin, torchvision semantics), one RoI's output is

    out[p, q, :] = sum_h Wy[p, h] * (Wx @ F[h])[q, :]          F[h]: [W, C]

Each program handles one RoI and one block of `block_channels` channels:

  for h in the RoI's row span (a data-dependent loop, usually a few rows):
      t = Wx @ F[image, h, :, cblock]           # [ow_pad, W_pad] x [W_pad, cb]: MXU / tensor cores
      acc[p] += Wy[p, h] * t   for p < oh       # oh scalar x tile updates (VPU)
  out[p] = acc[p]

so nothing but the output leaves the kernel (the einsum path writes a `[chunk, H, ow, C]`
intermediate to HBM), and rows outside the RoI are never read. Scalars (image, first row, row
count) come through scalar prefetch on TPU, so the feature block `[H, W_pad, cb]` of the RoI's
image is DMA'd by the pipeline (grid order (channel block, RoI): consecutive RoIs of one image
reuse the block); `Wy` sits in SMEM for the scalar reads. On GPU (Triton) every block dimension must be a power of two, so `ow`,
`W` and `oh` are padded to powers of two (>= 16 for `tl.dot`), and the features are read
row by row from global memory (no BlockSpec). The backward pass (a custom VJP) is the transposed
dense contraction of `roi_align.py` ("einsum" path), exact like the forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from regionclip_jax.ops.roi_align_common import Axis, flatten_boxes, roi_align_einsum


def _next_pow2(x: int, at_least: int = 1) -> int:
    return max(at_least, 1 << (max(int(x), 1) - 1).bit_length())


def _kernel(image_ref, lo_ref, cnt_ref, wy_ref, wx_ref, f_ref, o_ref, *, oh, tpu, cb):
    """One RoI x one channel block.

    Refs (TPU layout; on GPU the three scalars are `(1,)` blocks and `f_ref` is the whole
    `[B, H, W_pad, C]` array):
      wy_ref: `[1, H_pad, oh_pad]` row weights, transposed so that row h is `wy_ref[0, h]`.
      wx_ref: `[1, ow_pad, W_pad]` column weights.
      f_ref: `[1, H, W_pad, cb]` feature block of the RoI's image.
      o_ref: `[1, oh_pad, ow_pad, cb]`.
    """
    if tpu:
        n = pl.program_id(1)
        lo, cnt = lo_ref[n], cnt_ref[n]
    else:
        lo, cnt = lo_ref[0], cnt_ref[0]
        img = image_ref[0]
        c0 = pl.program_id(0) * cb
    wx = wx_ref[0]
    ow_pad = wx.shape[0]

    def row(h):
        if tpu:
            return f_ref[0, h]
        return f_ref[img, h, :, pl.ds(c0, cb)]

    def body(t, acc):
        h = lo + t
        th = jnp.dot(wx, row(h), preferred_element_type=jnp.float32)  # [ow_pad, cb]
        return tuple(acc[p] + wy_ref[0, h, p] * th for p in range(oh))

    zeros = jnp.zeros((ow_pad, cb), jnp.float32)
    acc = jax.lax.fori_loop(0, cnt, body, tuple(zeros for _ in range(oh)))
    for p in range(o_ref.shape[1]):
        o_ref[0, p] = (acc[p] if p < oh else zeros).astype(o_ref.dtype)


def _pallas_forward(
    features, flat, image, oh, ow, scale, sampling_ratio, aligned, *, block_channels, interpret, tpu
):
    b, h, w, c = features.shape
    n = flat.shape[0]
    ay = Axis(flat[:, 1], flat[:, 3], oh, h, scale, sampling_ratio, aligned)
    ax = Axis(flat[:, 0], flat[:, 2], ow, w, scale, sampling_ratio, aligned)
    lo, hi = ay.support()
    # Row span of the whole RoI; bins with no support report lo = hi = 0, which is harmless.
    first = lo.min(axis=1).astype(jnp.int32)
    count = (hi.max(axis=1) - first + 1).astype(jnp.int32)
    wy = ay.dense_weights()  # [N, oh, H]
    wx = ax.dense_weights()  # [N, ow, W]

    ow_pad = _next_pow2(ow, 16)
    oh_pad = _next_pow2(oh)
    w_pad = _next_pow2(w, 16)
    h_pad = _next_pow2(h)
    cb = min(block_channels, c)
    if c % cb:
        raise ValueError(f"channels {c} must be a multiple of block_channels {cb}")
    wy_t = jnp.pad(jnp.swapaxes(wy, 1, 2), ((0, 0), (0, h_pad - h), (0, oh_pad - oh)))
    wx_p = jnp.pad(wx, ((0, 0), (0, ow_pad - ow), (0, w_pad - w))).astype(features.dtype)
    feat = jnp.pad(features, ((0, 0), (0, 0), (0, w_pad - w), (0, 0)))
    # Channel blocks outer, RoIs inner: consecutive programs of one image keep the same feature
    # block index, so the TPU pipeline does not re-fetch it.
    grid = (c // cb, n)
    out_shape = jax.ShapeDtypeStruct((n, oh_pad, ow_pad, c), features.dtype)
    kernel = functools.partial(_kernel, oh=oh, tpu=tpu, cb=cb)
    if tpu:
        # lazy: the TPU Pallas backend, only on TPU
        from jax.experimental.pallas import tpu as pltpu

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=grid,
            in_specs=[
                pl.BlockSpec(
                    (1, h_pad, oh_pad), lambda k, i, *_: (i, 0, 0), memory_space=pltpu.SMEM
                ),
                pl.BlockSpec((1, ow_pad, w_pad), lambda k, i, *_: (i, 0, 0)),
                pl.BlockSpec((1, h, w_pad, cb), lambda k, i, img, *_: (img[i], 0, 0, k)),
            ],
            out_specs=pl.BlockSpec((1, oh_pad, ow_pad, cb), lambda k, i, *_: (i, 0, 0, k)),
        )
        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec, interpret=interpret or False
        )(image, first, count, wy_t, wx_p, feat)
    else:
        scalar = pl.BlockSpec((1,), lambda k, i: (i,))
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=grid,
            in_specs=[
                scalar,
                scalar,
                scalar,
                pl.BlockSpec((1, h_pad, oh_pad), lambda k, i: (i, 0, 0)),
                pl.BlockSpec((1, ow_pad, w_pad), lambda k, i: (i, 0, 0)),
                pl.no_block_spec,  # whole array, read row by row in the kernel
            ],
            out_specs=pl.BlockSpec((1, oh_pad, ow_pad, cb), lambda k, i: (i, 0, 0, k)),
            interpret=interpret,
        )(image, first, count, wy_t, wx_p, feat)
    return out[:, :oh, :ow]


def roi_align_pallas(
    features,
    boxes,
    oh: int,
    ow: int,
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    *,
    block_channels: int = 128,
    interpret: bool | None = None,
    tpu_layout: bool | None = None,
):
    """Pallas RoIAlign; same contract as `roi_align.roi_align` (`[B,H,W,C]`, `[B,R,4]` xyxy).

    Args:
      block_channels: channels per program (a divisor of C; 128 fills TPU lanes; use 32-64 on
        GPU to keep the accumulators in registers).
      interpret: run the kernel in the Pallas interpreter (default: on CPU, where Pallas has no
        compiler). Also accepts `pltpu.InterpretParams()` (TPU semantics on CPU).
      tpu_layout: use the TPU grid spec (scalar prefetch, SMEM weights, blocked features);
        default: on TPU, or when `interpret` is a `pltpu.InterpretParams`.

    Returns:
      `[B, R, oh, ow, C]` in `features.dtype`.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if tpu_layout is None:
        tpu_layout = jax.default_backend() == "tpu" or not isinstance(interpret, bool)
    b, r = boxes.shape[:2]
    c = features.shape[-1]
    statics = (oh, ow, scale, sampling_ratio, aligned)
    feature_shape = features.shape

    @jax.custom_vjp
    def pool(features, boxes):
        flat, image = flatten_boxes(boxes)
        return _pallas_forward(
            features,
            flat,
            image,
            *statics,
            block_channels=block_channels,
            interpret=interpret,
            tpu=tpu_layout,
        )

    def pool_fwd(features, boxes):
        return pool(features, boxes), (boxes, jnp.zeros((0,), features.dtype))

    def pool_bwd(res, cotangent):
        boxes, dtype_carrier = res
        # The forward is linear in the features: its transpose is the transposed dense
        # contraction of the einsum path, evaluated without the forward.
        spec = jax.ShapeDtypeStruct(feature_shape, dtype_carrier.dtype)
        transpose = jax.linear_transpose(
            lambda f: roi_align_einsum(f, boxes, *statics, None).reshape(b * r, oh, ow, c),
            spec,
        )
        return transpose(cotangent)[0], jnp.zeros_like(boxes)

    pool.defvjp(pool_fwd, pool_bwd)
    return pool(features, boxes).reshape(b, r, oh, ow, c)
