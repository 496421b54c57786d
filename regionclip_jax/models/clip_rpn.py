"""`ClipRPN`: a region proposal network on the res4 of a CLIP ModifiedResNet image tower."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from regionclip_jax.models.clip import build_visual
from regionclip_jax.models.normalize import clip_normalize
from regionclip_jax.models.rpn import RPN


class ClipRPN(nnx.Module):
    """An RPN head on the res4 (stride 16) of a CLIP ModifiedResNet image tower.

    Takes the same input as the detectron2 RPNs (RGB 0..255, zero padding) and applies CLIP's
    normalisation itself.
    """

    def __init__(self, clip_config: Any, arch: dict[str, Any], *, rngs: nnx.Rngs):
        self.visual = build_visual(clip_config, rngs=rngs)
        self.freeze_at = int(arch.get("freeze_at", 2))
        self.rpn = RPN(
            kind="features",
            in_channels=clip_config.vision_width * 16,  # res4 of a ModifiedResNet
            strides=(16,),
            anchor_sizes=tuple(arch["anchor_sizes"]),
            aspect_ratios=tuple(arch["aspect_ratios"]),
            pre_nms_topk=int(arch["pre_nms_topk"]),
            post_nms_topk=int(arch["post_nms_topk"]),
            nms_thresh=float(arch["nms_thresh"]),
            rngs=rngs,
        )

    def features(self, images: jax.Array, image_hw: jax.Array) -> list[jax.Array]:
        return [self.visual.trunk(clip_normalize(images, image_hw), self.freeze_at)]

    def __call__(self, images: jax.Array, image_hw: jax.Array):
        return self.rpn.from_features(self.features(images, image_hw), image_hw)

    def losses(self, images, image_hw, gt_boxes, gt_mask, key):
        return self.rpn.losses_from_features(
            self.features(images, image_hw), image_hw, gt_boxes, gt_mask, key
        )
