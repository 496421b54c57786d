"""regionclip_jax.ops: pure detection ops (no parameters), static shapes, jit/vmap/grad-safe.

Note: the function `roi_align` shadows the submodule of the same name as a package attribute
(as in torchvision); code that needs the module's other names imports them from it
(`from regionclip_jax.ops.roi_align import roi_align_weights`); the helpers the XLA and Pallas
implementations share live in `ops.roi_align_common`.
"""

from regionclip_jax.ops.anchors import AnchorGenerator, cell_anchors, grid_anchors
from regionclip_jax.ops.boxes import (
    DEFAULT_SCALE_CLAMP,
    Box2BoxTransform,
    box_area,
    clip_boxes,
    cxcywh_to_xyxy,
    nonempty,
    pairwise_intersection,
    pairwise_iou,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from regionclip_jax.ops.matching import Matcher
from regionclip_jax.ops.nms import batched_nms, find_top_rpn_proposals, nms, soft_nms
from regionclip_jax.ops.roi_align import roi_align, roi_align_weights
from regionclip_jax.ops.sampling import subsample_labels

__all__ = [
    "DEFAULT_SCALE_CLAMP",
    "AnchorGenerator",
    "Box2BoxTransform",
    "Matcher",
    "batched_nms",
    "box_area",
    "cell_anchors",
    "clip_boxes",
    "cxcywh_to_xyxy",
    "find_top_rpn_proposals",
    "grid_anchors",
    "nms",
    "nonempty",
    "pairwise_intersection",
    "pairwise_iou",
    "roi_align",
    "roi_align_weights",
    "soft_nms",
    "subsample_labels",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]
