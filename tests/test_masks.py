"""`eval.masks`: detectron2's `paste_masks_in_image`, against references written from its definition.

1. A NumPy reference evaluating, for EVERY pixel of the image (no box region), torch
   `grid_sample(bilinear, zeros, align_corners=False)` at the pixel centre's normalised box
   coordinate, written corner by corner from PyTorch's formula, thresholded at 0.5.
2. (torch_ref) `torch.nn.functional.grid_sample` itself over the whole image, as detectron2's
   GPU path (`skip_empty=False`) does.
3. The RLE output decodes (pycocotools) to the same bitmaps; `mask_iou` equals pycocotools.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from regionclip_jax.eval import masks as masks_lib


def _grid_sample_reference(mask: np.ndarray, box: np.ndarray, h: int, w: int) -> np.ndarray:
    """float32 [H, W]: grid_sample of `mask` at every pixel centre, written per corner."""
    f = np.float32
    m = mask.shape[0]
    x0, y0, x1, y1 = (f(v) for v in box)
    out = np.zeros((h, w), f)
    for r in range(h):
        gy = (f(r) + f(0.5) - y0) / (y1 - y0) * f(2) - f(1)
        iy = ((gy + f(1)) * f(m) - f(1)) / f(2)
        for c in range(w):
            gx = (f(c) + f(0.5) - x0) / (x1 - x0) * f(2) - f(1)
            ix = ((gx + f(1)) * f(m) - f(1)) / f(2)
            ixw, iyn = int(np.floor(ix)), int(np.floor(iy))
            total = f(0)
            for yy, wy in ((iyn, f(iyn + 1) - iy), (iyn + 1, iy - f(iyn))):
                for xx, wx in ((ixw, f(ixw + 1) - ix), (ixw + 1, ix - f(ixw))):
                    if 0 <= yy < m and 0 <= xx < m:
                        total += wy * wx * mask[yy, xx]
            out[r, c] = total
    return out


def _case(seed: int, n: int = 5, h: int = 37, w: int = 53, m: int = 14):
    rng = np.random.default_rng(seed)
    # Smooth-ish maps so that many pixels are near but not at the threshold.
    probs = rng.uniform(0, 1, (n, m, m)).astype(np.float32)
    x0 = rng.uniform(-3, w - 5, n)
    y0 = rng.uniform(-3, h - 5, n)
    bw = rng.uniform(0.7, w * 0.9, n)
    bh = rng.uniform(0.7, h * 0.9, n)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], 1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    boxes[0] = [0, 0, w, h]  # whole image (the region clip at both ends)
    boxes[1] = [10.25, 5.5, 11.0, 6.0]  # sub-pixel box
    return probs, boxes, (h, w)


def _assert_same(got: np.ndarray, ref_vals: np.ndarray) -> None:
    ref = ref_vals >= 0.5
    # Only pixels whose value is within float32 rounding of the threshold may differ.
    diff = got != ref
    assert not np.any(diff & (np.abs(ref_vals - 0.5) > 1e-5)), np.argwhere(diff)[:5]
    assert diff.sum() <= max(1, ref.size // 10000)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_matches_numpy_grid_sample_reference(seed):
    probs, boxes, (h, w) = _case(seed)
    got = masks_lib.paste_masks_in_image(probs, boxes, (h, w))
    assert got.shape == (len(boxes), h, w) and got.dtype == bool
    for i in range(len(boxes)):
        _assert_same(got[i], _grid_sample_reference(probs[i], boxes[i], h, w))
    assert got[0].sum() > 0


def test_paste_constant_mask_fills_box():
    # A mask of ones is >= 0.5 exactly on pixels whose centre is within half a mask cell beyond
    # the box edge (bilinear weight of the edge cell >= 0.5): here the box itself, integer-aligned.
    h, w = 20, 30
    box = np.array([[4.0, 3.0, 18.0, 11.0]], np.float32)
    got = masks_lib.paste_masks_in_image(np.ones((1, 14, 14), np.float32), box, (h, w))[0]
    ref = np.zeros((h, w), bool)
    ref[3:11, 4:18] = True
    np.testing.assert_array_equal(got, ref)
    zero = masks_lib.paste_masks_in_image(np.zeros((1, 14, 14), np.float32), box, (h, w))
    assert not zero.any()


def test_degenerate_boxes_give_empty_masks():
    boxes = np.array([[5, 5, 5, 9], [3, 3, 2, 8], [np.nan, 0, 4, 4]], np.float32)
    got = masks_lib.paste_masks_in_image(np.ones((3, 14, 14), np.float32), boxes, (10, 10))
    assert got.shape == (3, 10, 10) and not got.any()


@pytest.mark.torch_ref
@pytest.mark.parametrize("seed", [3, 4])
def test_paste_matches_torch_grid_sample(seed):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    probs, boxes, (h, w) = _case(seed, n=6, h=41, w=29, m=28)
    got = masks_lib.paste_masks_in_image(probs, boxes, (h, w))
    # detectron2 _do_paste_mask with skip_empty=False (its GPU path): the whole image.
    b = torch.from_numpy(boxes)
    x0, y0, x1, y1 = torch.split(b, 1, dim=1)
    img_y = torch.arange(0, h, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, w, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    n = b.shape[0]
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    vals = F.grid_sample(torch.from_numpy(probs)[:, None], grid, align_corners=False)[:, 0]
    vals = vals.numpy()
    for i in range(n):
        _assert_same(got[i], vals[i])


def test_rle_round_trip_and_iou():
    probs, boxes, (h, w) = _case(5, n=4)
    bitmaps = masks_lib.paste_masks_in_image(probs, boxes, (h, w))
    rles = masks_lib.paste_masks_rle(probs, boxes, (h, w))
    assert len(rles) == 4
    for rle, bm in zip(rles, bitmaps):
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), bm)
    ref = mask_utils.encode(np.asfortranarray(bitmaps.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"].encode() for r in rles] == [r["counts"] for r in ref]
    assert masks_lib.encode_masks(bitmaps) == rles
    inter = (bitmaps[:, None] & bitmaps[None]).sum((2, 3))
    union = (bitmaps[:, None] | bitmaps[None]).sum((2, 3))
    ref_iou = np.where(union > 0, inter / np.maximum(union, 1), 0)
    np.testing.assert_allclose(masks_lib.mask_iou(rles, rles), ref_iou, atol=1e-12)
    assert masks_lib.mask_iou([], rles).shape == (0, 4)


def test_segmentation_to_rle_forms():
    h, w = 12, 10
    poly = [[1.0, 1.0, 8.0, 1.0, 8.0, 9.0, 1.0, 9.0]]
    rle = masks_lib.segmentation_to_rle(poly, h, w)
    ref = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
    np.testing.assert_array_equal(mask_utils.decode(rle), mask_utils.decode(ref))
    bm = mask_utils.decode(ref).astype(bool)
    # Uncompressed RLE (column-major run lengths starting with zeros).
    flat = bm.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    unc = {"size": [h, w], "counts": counts}
    np.testing.assert_array_equal(
        masks_lib.decode_rle(masks_lib.segmentation_to_rle(unc, h, w)), bm
    )
    comp = masks_lib.encode_masks(bm[None])[0]
    assert masks_lib.segmentation_to_rle(comp, h, w) is comp
