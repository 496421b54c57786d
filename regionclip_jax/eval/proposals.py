"""Proposal recall: how many evaluation boxes a class-agnostic RPN finds, base and novel apart."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from regionclip_jax import parallel
from regionclip_jax.data import inputs
from regionclip_jax.data.pipeline import ShardSource
from regionclip_jax.data.shards import open_shards
from regionclip_jax.models.split import SplitJit
from regionclip_jax.ops.boxes import pairwise_iou


def proposal_recall(
    task: Any, graphdef: Any, state: dict[str, Any], *, top_n: int = 100, iou: float = 0.5
) -> dict[str, float]:
    """Recall of the top-`top_n` proposals at IoU >= `iou` on the evaluation set, per split."""
    data = task.data
    host = parallel.whole_on_one_device(state)
    splits = data.splits()
    test_ids = data.test_ids

    def best_iou_of(model, images, image_hw, gt):
        boxes, _, valid = model.rpn(images.astype(jnp.float32), image_hw)
        boxes, valid = boxes[:, :top_n], valid[:, :top_n]
        ious = jax.vmap(pairwise_iou)(gt, boxes)  # [B, G, P]
        return jnp.max(jnp.where(valid[:, None, :], ious, 0.0), axis=-1)

    best_iou = SplitJit.from_parts(graphdef, (host["params"], host["rest"]), best_iou_of)

    ds = inputs.evaluation_dataset(
        task.config, ShardSource(open_shards(data.val)), data.test_category_map()
    )
    size = int(task.config.detect.eval_batch_size)
    hits = {"base": [0, 0], "novel": [0, 0]}
    with jax.set_mesh(parallel.make_mesh({"data": 1}, jax.local_devices()[:1])):
        for batch in ds:
            padded, n = inputs.pad_batch(
                {k: batch[k] for k in ("images", "image_hw", "boxes")}, size
            )
            best = np.asarray(
                best_iou(
                    padded["images"],
                    padded["image_hw"],
                    padded["boxes"],
                )
            )
            for b in range(n):  # every image, the short last batch included
                for g in np.flatnonzero(batch["box_mask"][b]):
                    side = splits[test_ids[int(batch["labels"][b, g])]]
                    hits[side][0] += int(best[b, g] >= iou)
                    hits[side][1] += 1
    return {f"recall@{top_n}/{k}": h / max(n, 1) for k, (h, n) in hits.items()}
