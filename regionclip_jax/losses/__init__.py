"""Pretraining, detection and RPN losses: pure functions of padded arrays and validity masks."""

from regionclip_jax.losses.common import l2_normalize, logits_with_background
from regionclip_jax.losses.detection import box_regression_loss, fast_rcnn_classification_loss
from regionclip_jax.losses.pretrain import (
    concept_contrastive_loss,
    image_text_contrastive_loss,
    pretrain_losses,
    region_distillation_loss,
    teacher_pseudo_labels,
)

__all__ = [
    "box_regression_loss",
    "concept_contrastive_loss",
    "fast_rcnn_classification_loss",
    "image_text_contrastive_loss",
    "l2_normalize",
    "logits_with_background",
    "pretrain_losses",
    "region_distillation_loss",
    "teacher_pseudo_labels",
]
