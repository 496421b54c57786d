"""The RoIAlign geometry and the dense ("einsum") implementation, shared by `ops.roi_align` and
`ops.roi_align_pallas` (torchvision `roi_align` semantics; the arithmetic is described in
`ops.roi_align`'s module docstring).

- `Axis`: per-RoI sampling geometry along one axis (bin edges, sample counts, bilinear weights).
- `roi_align_einsum`: the separable dense contraction `Wy [R, oh, H]`, `Wx [R, ow, W]` x features
  (the TPU path; also the Pallas kernel's backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Candidate samples per (bin, row) under adaptive sampling (`ops.roi_align`'s module docstring).
ADAPTIVE_CANDIDATES = 6
# Budget (bytes) for the first-stage product of a chunk in the dense contraction.
EINSUM_CHUNK_BYTES = 48 * 2**20


def pair(output_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(output_size, int | np.integer):
        return int(output_size), int(output_size)
    oh, ow = output_size
    return int(oh), int(ow)


def exact_div(x, d):
    """`x / d` with `d` broadcast to `x`, rounded as a true division.

    XLA rewrites a division by a broadcast into a multiplication by the broadcast reciprocal,
    which is off by an ulp; a divisor that is not a broadcast op (here `d + x * 0`) is left alone.
    """
    return x / (d + x * 0.0)


class Axis:
    """Per-RoI sampling geometry along one axis (rows or columns), torchvision's arithmetic.

    Attributes (all `[N]` float32): `start` (first bin edge, feature pixels), `bin` (bin size,
    negative for degenerate boxes with aligned=True), `count` (samples per bin, an integer value;
    0 or negative means no samples), `zero` (a data-dependent 0.0, see the module docstring).
    """

    def __init__(self, lo, hi, bins: int, length: int, scale: float, sampling_ratio: int, aligned):
        lo = lo.astype(jnp.float32)
        hi = hi.astype(jnp.float32)
        self.zero = lo * 0.0
        offset = 0.5 if aligned else 0.0
        self.start = (lo * scale + self.zero) - offset
        end = (hi * scale + self.zero) - offset
        size = end - self.start
        if not aligned:
            size = jnp.maximum(size, 1.0)
        divisor = bins + self.zero
        self.bin = size / divisor
        if sampling_ratio > 0:
            self.count = sampling_ratio + self.zero
        else:
            self.count = jnp.ceil(size / divisor)
        self.bins = bins
        self.length = length
        self.sampling_ratio = sampling_ratio

    def take(self, idx) -> Axis:
        new = object.__new__(Axis)
        new.__dict__.update(self.__dict__)
        for name in ("zero", "start", "bin", "count"):
            setattr(new, name, getattr(self, name)[idx])
        return new

    def bin_starts(self):
        """`[N, bins]` first edge of each bin: start + p * bin, rounded like torchvision."""
        p = jnp.arange(self.bins, dtype=jnp.float32)
        return self.start[:, None] + (p * self.bin[:, None] + self.zero[:, None])

    def support(self):
        """Rows that can carry weight, per bin.

        Returns:
          lo: `[N, bins]` int32, the lowest row with (possibly) nonzero weight in each bin.
          hi: `[N, bins]` int32, the highest such row (`hi >= lo`; bins without samples, or with
            all samples outside [-1, length], get lo = hi = 0 and zero weights).
        """
        a = self.bin_starts()
        count = jnp.maximum(self.count, 1.0)[:, None]
        binsz = self.bin[:, None]
        # Same expressions as in `weights` for i = 0 and i = count - 1: identical rounding.
        first = a + exact_div((0.0 + 0.5) * binsz, count)
        last = a + exact_div((count - 1.0 + 0.5) * binsz, count)
        ymin = jnp.minimum(first, last)
        ymax = jnp.maximum(first, last)
        top = float(self.length - 1)
        lo = jnp.floor(jnp.clip(ymin, 0.0, top))
        hi = jnp.minimum(jnp.floor(jnp.clip(ymax, 0.0, top)) + 1.0, top)
        empty = (self.count[:, None] < 1.0) | (ymax < -1.0) | (ymin > self.length)
        lo = jnp.where(empty, 0.0, lo).astype(jnp.int32)
        hi = jnp.where(empty, 0.0, hi).astype(jnp.int32)
        return lo, hi

    def weights(self, rows):
        """Averaged bilinear weights of each bin on the given rows.

        Args:
          rows: `[N, bins, S]` int32 feature rows (any values; rows outside [0, length) get 0).

        Returns:
          `[N, bins, S]` float32: (1 / count) * sum over the bin's samples of their weight on row.
        """
        a = self.bin_starts()[:, :, None, None]  # [N, P, 1, 1]
        binsz = self.bin[:, None, None, None]
        count = self.count[:, None, None, None]
        safe_count = jnp.maximum(count, 1.0)
        h = rows.astype(jnp.float32)[..., None]  # [N, P, S, 1]
        if self.sampling_ratio > 0:
            i = jnp.arange(self.sampling_ratio, dtype=jnp.float32)
            i = jnp.broadcast_to(i, (*rows.shape, self.sampling_ratio))
        else:
            step = binsz / safe_count
            # floor(x) + 1 is the first sample with y > h - 1 (the first that can reach row h);
            # starting at floor(x) and taking 6 leaves one spare on each side of the <= 4 needed.
            i0 = jnp.floor((h - 1.0 - a) / step - 0.5)
            i0 = jnp.clip(i0, 0.0, jnp.maximum(count, 0.0))
            i = i0 + jnp.arange(ADAPTIVE_CANDIDATES, dtype=jnp.float32)
        y = a + exact_div((i + 0.5) * binsz, safe_count)
        valid = (i < count) & (y >= -1.0) & (y <= self.length)
        y = jnp.maximum(y, 0.0)
        low = jnp.floor(y)
        top = float(self.length - 1)
        at_end = low >= top
        low = jnp.where(at_end, top, low)
        frac = jnp.where(at_end, 0.0, y - low)
        w = jnp.where(h == low, 1.0 - frac, 0.0) + jnp.where(h == low + 1.0, frac, 0.0)
        w = jnp.where(valid, w, 0.0).sum(axis=-1)
        return w / safe_count[..., 0]

    def dense_weights(self):
        """`[N, bins, length]` weights on every row."""
        n = self.start.shape[0]
        rows = jnp.broadcast_to(
            jnp.arange(self.length, dtype=jnp.int32), (n, self.bins, self.length)
        )
        return self.weights(rows)


def flatten_boxes(boxes):
    b, r = boxes.shape[:2]
    flat = boxes.reshape(b * r, 4)
    image = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    return flat, image


def contract_dense(features, wy, wx, precision):
    """One image: `features [H, W, C]`, `wy [n, oh, H]`, `wx [n, ow, W]` -> `[n, oh, ow, C]` fp32.

    The cheaper contraction order is chosen statically; weights are cast to the feature dtype
    (bf16 runs on the MXU natively), products accumulate in fp32.
    """
    h, w, _ = features.shape
    oh, ow = wy.shape[1], wx.shape[1]
    dt = features.dtype
    cost_x_first = ow * w * h + oh * h * ow
    cost_y_first = oh * h * w + ow * oh * w
    f32 = jnp.float32
    if cost_x_first <= cost_y_first:
        t = jnp.einsum(
            "nqw,hwc->nhqc",
            wx.astype(dt),
            features,
            precision=precision,
            preferred_element_type=f32,
        )
        return jnp.einsum("nph,nhqc->npqc", wy, t, precision=precision, preferred_element_type=f32)
    t = jnp.einsum(
        "nph,hwc->npwc", wy.astype(dt), features, precision=precision, preferred_element_type=f32
    )
    return jnp.einsum("nqw,npwc->npqc", wx, t, precision=precision, preferred_element_type=f32)


def einsum_chunk(h: int, w: int, c: int, oh: int, ow: int, r: int) -> int:
    per_roi = max(h * ow, oh * w) * c * 4
    return int(max(1, min(r, EINSUM_CHUNK_BYTES // per_roi)))


def roi_align_einsum(features, boxes, oh, ow, scale, sampling_ratio, aligned, chunk_size):
    b, h, w, c = features.shape
    r = boxes.shape[1]
    chunk = chunk_size or einsum_chunk(h, w, c, oh, ow, r)
    n_chunks = -(-r // chunk)
    pad = n_chunks * chunk - r
    # Padded RoIs are empty boxes (zero weights); their outputs are sliced off.
    boxes = jnp.pad(boxes, ((0, 0), (0, pad), (0, 0)))
    precision = jax.lax.Precision.HIGHEST if features.dtype == jnp.float32 else None

    def one_image(args):
        feat, bx = args

        def one_chunk(bc):
            ay = Axis(bc[:, 1], bc[:, 3], oh, h, scale, sampling_ratio, aligned)
            ax = Axis(bc[:, 0], bc[:, 2], ow, w, scale, sampling_ratio, aligned)
            wy = jax.lax.stop_gradient(ay.dense_weights())
            wx = jax.lax.stop_gradient(ax.dense_weights())
            return contract_dense(feat, wy, wx, precision).astype(features.dtype)

        out = jax.lax.map(one_chunk, bx.reshape(n_chunks, chunk, 4))
        return out.reshape(n_chunks * chunk, oh, ow, c)[:r]

    return jax.lax.map(one_image, (features, boxes))
