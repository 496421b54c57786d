"""RoIAlign with torchvision's exact semantics, as separable weight matrices (static shapes).

RegionCLIP pools region features with detectron2 `ROIAlignV2` (= torchvision `roi_align` with
`aligned=True`, `sampling_ratio=0`, scale 1/16; spec §2.3). torchvision's kernel, per RoI and
output bin (ph, pw), averages `grid_h x grid_w` bilinear samples, where the grid is
`ceil(roi_h / oh) x ceil(roi_w / ow)` when `sampling_ratio <= 0` ("adaptive": data-dependent, up
to hundreds of samples for large boxes). Bilinear interpolation is separable and the sample grid
is a product grid, so the average over all samples of a bin is exactly

    out[r, ph, pw, :] = sum_{h, w} Wy[r, ph, h] * Wx[r, pw, w] * F[b_r, h, w, :]

with `Wy[r, ph, h]` = (1 / grid_h) * sum over the bin's sample rows y of the 1-D bilinear weight
of y on feature row h (torchvision's boundary rules included: a sample with y < -1 or y > H, or
x < -1 or x > W, contributes 0; y <= 0 is clamped to 0; y >= H - 1 puts all weight on row H - 1).
The out-of-range rule zeroes a sample when *either* coordinate is out of range, which is the
product of the two 1-D indicators, so it stays separable. Any number of samples is absorbed into
fixed-shape weights: for a row h only samples with |y - h| < 1 contribute, and with adaptive
sampling the spacing of samples is > 0.5 px (bin / ceil(bin)), so at most 4 samples of a bin touch
a row; we evaluate 6 candidate samples per (bin, row) around the first one whose support reaches
the row (one spare on each side against rounding) and mask the rest. With a fixed
`sampling_ratio = s` all s samples are evaluated.

Float details that matter for matching torchvision to ~1e-7 rather than ~1e-5: XLA (i) turns a
division by a constant or by a broadcast into a multiplication by the reciprocal and (ii) fuses
`a + b * c` into one fused multiply-add. Both move sample positions by an ulp, which moves outputs
by up to |dF/dy| * ulp (1e-5 for unit-variance features near x = 128, 1e-4 for boxes thousands of
pixels long). Products and divisors therefore get a data-dependent zero added (`x * 0`, which XLA
cannot fold), so positions are computed in torchvision's order and rounding.

Implementations (`impl=`):
  - "gather": the CPU/GPU path. Each bin of an RoI reads only an `Sy x Sx` window of feature
    pixels (its support). RoIs are sorted by the window size they need and processed in chunks;
    each chunk runs the branch of `lax.switch` with the smallest static window from
    `_WINDOWS` that covers its largest RoI (one fused gather-multiply-add loop per branch), or
    the dense contraction when a bin spans more than `_WINDOWS[-1]` pixels. Exact for any box.
    Extra memory is a chunk's output plus small index/weight arrays (compiled temporaries 25 MiB
    on the C4 workload below). The backward pass is a custom VJP with the same windows
    (scatter-adds into the feature gradient).
    Under `jax.vmap` the switch turns into a select that runs every branch: pass batched
    arrays (`[B, ...]`) instead of vmapping when speed matters.
  - "einsum": the TPU (MXU) path: dense weights `Wy [R, oh, H]`, `Wx [R, ow, W]` contracted with
    the features by two matmuls per chunk of RoIs (`lax.map` over chunks). Peak extra memory is
    the chunk's first-stage product `[chunk, H, ow, C]` (or `[chunk, oh, W, C]`, whichever order
    is cheaper) in fp32 plus the weights, e.g. 16 RoIs x 50 x 14 x 1024 x 4 B = 46 MB for the
    C4 workload (one 50 x 84 x 1024 map, 1,000 boxes, 14 x 14) with the default chunk (see
    `_einsum_chunk`); XLA's compiled temporaries for that program are 55 MiB on CPU, next to the
    766 MiB output.
  - "pallas": a Pallas kernel (`roi_align_pallas.py`), the same separable contraction fused in
    one kernel (no HBM intermediate). Tested in interpret mode on CPU only.
  - "auto": "einsum" on TPU, "gather" on CPU and GPU.

All implementations are linear in `features`; gradients with respect to `features` are the
transposed maps (equal to torchvision's backward). Boxes get no gradient (as in torchvision, whose
backward returns none for `rois`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from regionclip_jax.ops.roi_align_common import (
    Axis,
    contract_dense,
    flatten_boxes,
    pair,
    roi_align_einsum,
)

# Window sizes (pixels per bin along each axis) of the "gather" branches. A bin with adaptive
# sampling touches at most ceil(bin) + 1 rows; bins of up to ~6 px (boxes up to 14 * 6 feature px
# = the whole 800 x 1333 image at stride 16 for 14 x 14 outputs) stay in the windowed branches.
_WINDOWS = (2, 3, 4, 6, 8)
# Windows with more pixels than this are visited by a loop instead of unrolled code.
_UNROLL_MAX = 16


class _GatherPlan:
    """Geometry shared by the forward and backward of the "gather" implementation.

    RoIs are flattened to `N = B * R` (padded to a multiple of the chunk), classified by the
    window their bins need, and visited in class order so each chunk runs a small branch.
    """

    def __init__(self, boxes, feature_shape, oh, ow, scale, sampling_ratio, aligned, chunk_size):
        b, h, w, c = feature_shape
        r = boxes.shape[1]
        flat, image = flatten_boxes(boxes)
        self.n = b * r
        self.chunk = int(min(chunk_size or 8, self.n))
        self.n_chunks = -(-self.n // self.chunk)
        pad = self.n_chunks * self.chunk - self.n
        flat = jnp.pad(flat, ((0, pad), (0, 0)))
        self.image = jnp.pad(image, (0, pad))
        self.ay = Axis(flat[:, 1], flat[:, 3], oh, h, scale, sampling_ratio, aligned)
        self.ax = Axis(flat[:, 0], flat[:, 2], ow, w, scale, sampling_ratio, aligned)
        self.lo_y, hi_y = self.ay.support()
        self.lo_x, hi_x = self.ax.support()
        need_y = (hi_y - self.lo_y + 1).max(axis=1)
        need_x = (hi_x - self.lo_x + 1).max(axis=1)
        windows = np.asarray(_WINDOWS)
        # Branch: the smallest window covering every bin along both axes; len(_WINDOWS) = dense.
        self.klass = jnp.maximum(
            jnp.searchsorted(windows, need_y, side="left"),
            jnp.searchsorted(windows, need_x, side="left"),
        ).astype(jnp.int32)
        self.order = jnp.argsort(self.klass, stable=True).astype(jnp.int32)
        self.shape = (b, h, w, c)
        self.oh, self.ow = oh, ow

    def chunk_ids(self, i):
        idx = jax.lax.dynamic_slice_in_dim(self.order, i * self.chunk, self.chunk)
        return idx, self.klass[idx].max()

    def window(self, idx, sy: int, sx: int):
        """Flat pixel index `[n, oh, ow, sy, sx]`-style pieces and weights of a chunk's windows.

        Returns:
          base_rows: `[n, oh, sy]` int32 flat index of (image, row, 0); cols: `[n, ow, sx]` int32;
          wy: `[n, oh, sy]`, wx: `[n, ow, sx]` float32 weights.
        """
        _, h, w, _ = self.shape
        cy, cx = self.ay.take(idx), self.ax.take(idx)
        # Window origin: the bin's first row, moved up so that the window stays inside the map.
        rows = jnp.minimum(self.lo_y[idx], h - sy)[..., None] + jnp.arange(sy, dtype=jnp.int32)
        cols = jnp.minimum(self.lo_x[idx], w - sx)[..., None] + jnp.arange(sx, dtype=jnp.int32)
        wy = jax.lax.stop_gradient(cy.weights(rows))
        wx = jax.lax.stop_gradient(cx.weights(cols))
        base_rows = (self.image[idx] * (h * w))[:, None, None] + rows * w
        return base_rows, cols, wy, wx

    def dense(self, idx):
        cy, cx = self.ay.take(idx), self.ax.take(idx)
        return (
            jax.lax.stop_gradient(cy.dense_weights()),
            jax.lax.stop_gradient(cx.dense_weights()),
        )

    def window_sizes(self):
        _, h, w, _ = self.shape
        return [(min(s, h), min(s, w)) for s in _WINDOWS]


def _gather_forward(features, plan: _GatherPlan):
    b, h, w, c = plan.shape
    oh, ow = plan.oh, plan.ow
    flat_feat = features.reshape(b * h * w, c)
    f32 = jnp.float32

    def windowed(sy: int, sx: int, idx):
        base_rows, cols, wy, wx = plan.window(idx, sy, sx)

        def term(i, j):
            pix = base_rows[:, :, None, i] + cols[:, None, :, j]  # [n, oh, ow]
            wt = wy[:, :, None, i] * wx[:, None, :, j]
            return wt[..., None] * flat_feat[pix].astype(f32)

        acc = jnp.zeros((idx.shape[0], oh, ow, c), f32)
        if sy * sx <= _UNROLL_MAX:
            # Unrolled: XLA fuses all gathers and the weighted sum into one pass over the output.
            for i in range(sy):
                for j in range(sx):
                    acc = acc + term(i, j)
            return acc
        # Large windows (rare: bins over ~4 px): a loop keeps compile time small.
        return jax.lax.fori_loop(0, sy * sx, lambda t, a: a + term(t // sx, t % sx), acc)

    def dense(idx):
        wy, wx = plan.dense(idx)

        def one(args):
            img, wy1, wx1 = args
            out = contract_dense(features[img], wy1[None], wx1[None], jax.lax.Precision.HIGHEST)
            return out[0]

        return jax.lax.map(one, (plan.image[idx], wy, wx))

    branches = [functools.partial(windowed, sy, sx) for sy, sx in plan.window_sizes()] + [dense]

    def step(i, out):
        idx, k = plan.chunk_ids(i)
        res = jax.lax.switch(k, branches, idx)
        return out.at[idx].set(res.astype(out.dtype), unique_indices=True)

    out = jnp.zeros((plan.n_chunks * plan.chunk, oh, ow, c), features.dtype)
    return jax.lax.fori_loop(0, plan.n_chunks, step, out)


def _gather_backward(cotangent, plan: _GatherPlan, dtype):
    """Transpose of `_gather_forward`: scatter-adds weighted output cotangents into `[B,H,W,C]`."""
    b, h, w, c = plan.shape
    f32 = jnp.float32
    cotangent = cotangent.astype(f32)

    def windowed(sy: int, sx: int, idx, grad):
        base_rows, cols, wy, wx = plan.window(idx, sy, sx)
        g = cotangent[idx]  # [n, oh, ow, C]

        def term(t, grad):
            i, j = t // sx, t % sx
            pix = base_rows[:, :, None, i] + cols[:, None, :, j]
            wt = wy[:, :, None, i] * wx[:, None, :, j]
            return grad.at[pix].add(wt[..., None] * g)

        if sy * sx <= _UNROLL_MAX:
            for t in range(sy * sx):
                grad = term(t, grad)
            return grad
        return jax.lax.fori_loop(0, sy * sx, term, grad)

    def dense(idx, grad):
        wy, wx = plan.dense(idx)
        grad = grad.reshape(b, h, w, c)

        def one(j, grad):
            img = plan.image[idx[j]]
            g = cotangent[idx[j]]  # [oh, ow, C]
            t = jnp.einsum("ph,pqc->hqc", wy[j], g, precision=jax.lax.Precision.HIGHEST)
            d = jnp.einsum("qw,hqc->hwc", wx[j], t, precision=jax.lax.Precision.HIGHEST)
            return grad.at[img].add(d)

        grad = jax.lax.fori_loop(0, idx.shape[0], one, grad)
        return grad.reshape(b * h * w, c)

    branches = [functools.partial(windowed, sy, sx) for sy, sx in plan.window_sizes()] + [dense]

    def step(i, grad):
        idx, k = plan.chunk_ids(i)
        return jax.lax.switch(k, branches, idx, grad)

    grad = jnp.zeros((b * h * w, c), f32)
    grad = jax.lax.fori_loop(0, plan.n_chunks, step, grad)
    return grad.reshape(b, h, w, c).astype(dtype)


def _roi_align_gather(features, boxes, oh, ow, scale, sampling_ratio, aligned, chunk_size):
    b, r = boxes.shape[:2]
    c = features.shape[-1]
    statics = (oh, ow, scale, sampling_ratio, aligned, chunk_size)

    @jax.custom_vjp
    def pool(features, boxes):
        plan = _GatherPlan(boxes, features.shape, *statics)
        return _gather_forward(features, plan)

    def pool_fwd(features, boxes):
        return pool(features, boxes), (boxes, jnp.zeros((0,), features.dtype))

    def pool_bwd(res, cotangent):
        boxes, dtype_carrier = res
        plan = _GatherPlan(boxes, features.shape, *statics)
        grad = _gather_backward(cotangent, plan, dtype_carrier.dtype)
        # Boxes get no gradient (torchvision returns none for rois either).
        return grad, jnp.zeros_like(boxes)

    pool.defvjp(pool_fwd, pool_bwd)
    out = pool(features, boxes)
    return out[: b * r].reshape(b, r, oh, ow, c)


def _default_impl() -> str:
    return "einsum" if jax.default_backend() == "tpu" else "gather"


@functools.partial(
    jax.jit,
    static_argnames=(
        "output_size",
        "spatial_scale",
        "sampling_ratio",
        "aligned",
        "impl",
        "chunk_size",
    ),
)
def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> jax.Array:
    """RoIAlign, torchvision `roi_align` semantics, NHWC.

    Args:
      features: `[B, H, W, C]` feature maps (fp32 or bf16).
      boxes: `[B, R, 4]` float boxes, absolute `xyxy` in input-image pixels (the frame that
        `spatial_scale` maps onto the feature map). Padded slots may hold any finite box (e.g.
        zeros: with `aligned=True` an empty box pools to zeros); mask them downstream.
      output_size: `oh` or `(oh, ow)`.
      spatial_scale: feature pixels per input pixel (1/16 for res4).
      sampling_ratio: samples per bin along each axis; `<= 0` = adaptive `ceil(roi / bins)`.
      aligned: subtract half a pixel from the scaled box (detectron2 `ROIAlignV2`).
      impl: "gather", "einsum", "pallas" or "auto" (module docstring).
      chunk_size: RoIs per step of the gather/einsum loops (None: 8 for gather; for einsum the
        largest chunk whose first-stage product fits in 48 MB, capped at R).

    Returns:
      `[B, R, oh, ow, C]` pooled features in `features.dtype` (accumulated in fp32).

    Jitted with the configuration arguments static (one compile per configuration when called
    eagerly; inlined when called under an outer `jit`). `output_size` must be hashable (an int
    or a tuple).
    """
    oh, ow = pair(output_size)
    if features.ndim != 4 or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"want features [B,H,W,C], boxes [B,R,4]; got {features.shape}, {boxes.shape}"
        )
    if boxes.shape[0] != features.shape[0]:
        raise ValueError(f"batch mismatch: features {features.shape}, boxes {boxes.shape}")
    impl = _default_impl() if impl == "auto" else impl
    args = (features, boxes, oh, ow, float(spatial_scale), int(sampling_ratio), bool(aligned))
    if impl == "gather":
        return _roi_align_gather(*args, chunk_size)
    if impl == "einsum":
        return roi_align_einsum(*args, chunk_size)
    if impl == "pallas":
        # lazy: Pallas is only imported when the Pallas kernel is asked for
        from regionclip_jax.ops.roi_align_pallas import roi_align_pallas

        return roi_align_pallas(*args)
    raise ValueError(f"unknown impl {impl!r}; want 'auto', 'gather', 'einsum' or 'pallas'")


def roi_align_weights(
    boxes: jax.Array,
    feature_hw: tuple[int, int],
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Dense separable RoIAlign weights: `out = einsum('nph,nqw,nhwc->npqc', wy, wx, F[b_n])`.

    Args:
      boxes: `[N, 4]` absolute xyxy input pixels.
      feature_hw: `(H, W)` of the feature map.

    Returns:
      wy: `[N, oh, H]` float32 row weights; wx: `[N, ow, W]` float32 column weights. Each already
      averages the bilinear weights of all samples of a bin (torchvision semantics).
    """
    oh, ow = pair(output_size)
    h, w = feature_hw
    ay = Axis(boxes[:, 1], boxes[:, 3], oh, h, spatial_scale, sampling_ratio, aligned)
    ax = Axis(boxes[:, 0], boxes[:, 2], ow, w, spatial_scale, sampling_ratio, aligned)
    return ay.dense_weights(), ax.dense_weights()
