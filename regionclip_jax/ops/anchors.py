"""Anchors with detectron2 `DefaultAnchorGenerator` semantics, computed once per static canvas.

Cell anchors: for each size s (outer loop) and aspect ratio a (inner loop), a box of area s^2
with h / w = a centred on 0: w = sqrt(s^2 / a), h = a * w, (-w/2, -h/2, w/2, h/2); computed in
float64 and stored as float32, like detectron2's `torch.tensor(anchors)`.
Grid: shifts `offset * stride + i * stride` along x (i < W) and y (i < H); anchors are ordered
location-major (row-major over (y, x)) and then by cell anchor, i.e. `[H * W * A, 4]` matching the
RPN head's `[H, W, A]` output layout. Sums are done in float32 like detectron2.

The results are NumPy arrays: the canvas is static, so anchors are constants of the program.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """`[len(sizes) * len(aspect_ratios), 4]` float32 xyxy anchors centred on (0, 0)."""
    out = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return np.asarray(out, np.float64).astype(np.float32)


def grid_anchors(
    feature_hw: tuple[int, int], stride: float, cells: np.ndarray, offset: float = 0.0
) -> np.ndarray:
    """Anchors of one level.

    Args:
      feature_hw: `(H, W)` of the feature map.
      stride: input pixels per feature pixel.
      cells: `[A, 4]` cell anchors.
      offset: 0.0 puts anchor centres on pixel corners (detectron2 default), 0.5 on centres.

    Returns:
      `[H * W * A, 4]` float32 xyxy anchors in input pixels.
    """
    h, w = feature_hw
    shift_x = (offset * stride + np.arange(w, dtype=np.float64) * stride).astype(np.float32)
    shift_y = (offset * stride + np.arange(h, dtype=np.float64) * stride).astype(np.float32)
    sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], axis=1)
    return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4).astype(np.float32)


def _per_level(values, n_levels: int, name: str):
    values = [list(v) if isinstance(v, Sequence) else [v] for v in values]
    if len(values) == 1:
        return values * n_levels
    if len(values) != n_levels:
        raise ValueError(f"{name}: {len(values)} entries for {n_levels} levels")
    return values


@dataclass(frozen=True)
class AnchorGenerator:
    """detectron2 `DefaultAnchorGenerator`.

    Attributes:
      sizes: per level a list of sizes (a single list is used for every level), e.g.
        `((32, 64, 128, 256, 512),)` for the C4 RPN, `((32,), (64,), (128,), (256,), (512,))` FPN.
      aspect_ratios: per level a list of h / w ratios (a single list is broadcast).
      strides: per level stride, e.g. `(16,)` or `(4, 8, 16, 32, 64)`.
      offset: anchor centre offset in units of the stride (detectron2 `ANCHOR_GENERATOR.OFFSET`).
    """

    sizes: Sequence[Sequence[float]] = ((32, 64, 128, 256, 512),)
    aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),)
    strides: Sequence[int] = (16,)
    offset: float = 0.0

    def cell_anchors(self) -> list[np.ndarray]:
        n = len(self.strides)
        sizes = _per_level(self.sizes, n, "sizes")
        ratios = _per_level(self.aspect_ratios, n, "aspect_ratios")
        return [cell_anchors(s, r) for s, r in zip(sizes, ratios)]

    @property
    def num_anchors(self) -> list[int]:
        """Anchors per location, per level."""
        return [len(c) for c in self.cell_anchors()]

    def __call__(self, feature_hws: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Per level `[H_l * W_l * A_l, 4]` float32 xyxy anchors for the given feature sizes."""
        if len(feature_hws) != len(self.strides):
            raise ValueError(f"{len(feature_hws)} feature maps for {len(self.strides)} strides")
        return [
            grid_anchors(hw, s, c, self.offset)
            for hw, s, c in zip(feature_hws, self.strides, self.cell_anchors())
        ]
