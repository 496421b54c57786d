"""regionclip_jax.eval: detection post-processing and every evaluation of a trained model.

- postprocess.py: RegionCLIP's detection post-processing (scores, NMS / soft-NMS, top-k);
- detection.py: the detection evaluation loop (detector -> detections on disk -> metrics);
- results.py: detections streamed to disk and read back; masks.py: mask pasting and RLE;
- coco.py, lvis.py: COCO (with the open-vocabulary AP50 splits) and LVIS box and mask AP;
- proposals.py: proposal recall of an RPN; regions.py: region recognition with GT boxes;
- confusion.py: which class each ground-truth object is given.
"""

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
