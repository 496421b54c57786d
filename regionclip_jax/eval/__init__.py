"""regionclip_jax.eval: detection post-processing, mask pasting, result streaming, COCO and LVIS evaluators."""

from regionclip_jax.eval.coco import evaluate_coco, format_table
from regionclip_jax.eval.lvis import evaluate_lvis
from regionclip_jax.eval.masks import paste_masks_in_image, paste_masks_rle
from regionclip_jax.eval.results import (
    DETECTION_DTYPE,
    DetectionWriter,
    read_detections,
    read_image_ids,
    read_masks,
    to_coco_json,
)

__all__ = [
    "DETECTION_DTYPE",
    "DetectionWriter",
    "evaluate_coco",
    "evaluate_lvis",
    "format_table",
    "paste_masks_in_image",
    "paste_masks_rle",
    "read_detections",
    "read_image_ids",
    "read_masks",
    "to_coco_json",
]
