"""Detection evaluation: a detector over an evaluation set -> detections on disk -> COCO / LVIS metrics.

`evaluate(task, graphdef, state, out_dir)` runs the detection task's model (`train.detection_trainer`
builds it) over every evaluation image, each process on a disjoint slice, post-processes with
`eval.postprocess`, streams detections (and instance masks) to `out_dir` and computes the metrics on
process 0. `make_predict_fn` is its jitted batch -> detections function.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from regionclip_jax import parallel
from regionclip_jax.data import inputs
from regionclip_jax.data.pipeline import ShardSource
from regionclip_jax.data.shards import open_shards
from regionclip_jax.eval.coco import evaluate_coco, gt_has_masks, load_coco
from regionclip_jax.eval.lvis import evaluate_lvis
from regionclip_jax.eval.masks import paste_masks_rle
from regionclip_jax.eval.postprocess import detections_from_scores, rescale_to_original
from regionclip_jax.eval.results import DetectionWriter, read_detections, read_masks
from regionclip_jax.models.normalize import clip_normalize
from regionclip_jax.models.split import SplitJit
from regionclip_jax.ops.boxes import nonempty


def make_predict_fn(task: Any, graphdef: Any, parts: tuple[Any, Any]) -> SplitJit:
    """jitted `batch -> detections` of the evaluation (class indices 0..K_test-1) of the model
    `(graphdef, parts)` (parts: the (params, rest) of a train state, on one device).

    With a mask head (`detect.mask_on`) the detections also carry `mask_probs [B, topk, M, M]`
    float32: the sigmoid of the mask head on the res5 features of the final (post-NMS, top-k)
    boxes, as detectron2's `forward_with_given_boxes` (RoIAlign on res4 -> res5 -> mask head;
    zeros on padding slots). The feature map is requested again from the trunk
    (`OVDFastRCNN.predict` does not return it): the identical computation inside one jit,
    which XLA's common-subexpression elimination merges (checked on CPU with a tiny detector:
    the compiled FLOPs are those of one trunk pass; a trunk on different input adds one
    trunk's FLOPs). A `predict` that returned its feature map would make that explicit.
    """
    t = task.detect

    def predict(model, batch):
        image_hw = batch["image_hw"]
        if t.proposals == "gt":
            boxes = batch["boxes"].astype(jnp.float32)
            valid = batch["box_mask"]
            objectness = None
        else:
            boxes, logits, valid = task.proposals(model, batch)
            objectness = logits if t.multiply_rpn_score else None
        images = clip_normalize(batch["images"], image_hw).astype(task.dtype)
        probs, pred_boxes = model.detector.predict(
            images,
            image_hw,
            boxes,
            valid,
            apply_deltas=bool(t.apply_deltas) and t.proposals != "gt",
        )
        out = detections_from_scores(
            probs.astype(jnp.float32),
            pred_boxes.astype(jnp.float32),
            valid,
            image_hw,
            objectness=objectness,
            score_thresh=float(t.score_thresh),
            nms_thresh=float(t.nms_thresh),
            soft_nms=bool(t.soft_nms),
            topk=int(t.topk),
            max_candidates=int(t.max_candidates),
        )
        det = model.detector
        if getattr(det, "mask_head", None) is not None:
            b, n = out["boxes"].shape[:2]
            # res5 of the final boxes (the attnpool output `_pool_with_res5` also returns is
            # unused here and removed by XLA).
            _, res5 = det._pool_with_res5(det.feature_map(images), out["boxes"], n)
            logits = det.mask_head(res5)
            m = logits.shape[-1]
            mask_probs = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(b, n, m, m)
            out["mask_probs"] = jnp.where(out["valid"][..., None, None], mask_probs, 0.0)
        return out

    return SplitJit.from_parts(graphdef, parts, predict)


def evaluate(task: Any, graphdef: Any, state: dict[str, Any], out_dir: str) -> dict[str, float]:
    """Detections of the evaluation set -> COCO / LVIS metrics (on process 0; {} elsewhere).

    Runs on this process's local devices (the state is gathered to the host once); every
    process takes a disjoint slice of the images and streams its detections to `out_dir`.

    With a mask head (`detect.mask_on`) each kept detection's mask probabilities are pasted
    into its original image at its rescaled box (`eval.masks.paste_masks_rle`, detectron2's
    `paste_masks_in_image`, threshold 0.5), streamed as compressed RLE beside the detections,
    and the mask metrics are reported beside the box metrics under `segm/` (`segm/AP`,
    `segm/AP50/novel`, ... for COCO; `segm/APr`, `segm/APc`, `segm/APf`, ... for LVIS) when
    every ground-truth annotation has a `segmentation` (else box metrics only, with a note).
    """
    t, data = task.detect, task.data
    host = parallel.whole_on_one_device(state)
    predict = make_predict_fn(task, graphdef, (host["params"], host["rest"]))
    source = ShardSource(open_shards(data.val))
    image_ids = inputs.record_image_ids(source, data.val_json)
    bs = int(t.eval_batch_size)
    limit = int(t.max_eval_images)
    ds = inputs.evaluation_dataset(
        task.config,
        source,
        data.test_category_map(),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    test_ids = np.asarray(data.test_ids, np.int64)
    os.makedirs(out_dir, exist_ok=True)
    with_masks = bool(t.mask_on)
    writer = DetectionWriter(out_dir, process_index=jax.process_index(), masks=with_masks)
    total = len(source) // jax.process_count() if not limit else min(limit, len(source))
    seen, t0 = 0, time.perf_counter()
    keys = ("images", "image_hw", "boxes", "box_mask")
    with jax.set_mesh(parallel.make_mesh({"data": 1}, jax.local_devices()[:1])):
        for batch in ds:
            if limit and seen >= limit:
                break
            padded, n = inputs.pad_batch({k: batch[k] for k in keys}, bs)
            out = jax.device_get(predict(padded))
            boxes = rescale_to_original(out["boxes"][:n], batch["scale"][:n], batch["orig_hw"][:n])
            cls = np.asarray(out["classes"][:n])
            # detector_postprocess drops boxes left empty by the rescale.
            keep = np.asarray(out["valid"][:n]) & np.asarray(nonempty(jnp.asarray(boxes)))
            boxes = np.asarray(boxes)
            masks = None
            if with_masks:  # one image at a time: at most one full-size mask in memory
                orig_hw = np.asarray(batch["orig_hw"][:n])
                masks = []
                for i in range(n):
                    idx = np.flatnonzero(keep[i])
                    rles = paste_masks_rle(
                        np.asarray(out["mask_probs"][i])[idx], boxes[i][idx], tuple(orig_hw[i])
                    )
                    row: list[Any] = [None] * keep.shape[1]
                    for j, rle in zip(idx.tolist(), rles):
                        row[j] = rle
                    masks.append(row)
            writer.add(
                image_ids[np.asarray(batch["source_index"][:n])],
                boxes,
                np.asarray(out["scores"][:n]),
                test_ids[np.clip(cls, 0, len(test_ids) - 1)],
                keep,
                masks=masks,
            )
            seen += n
            if seen % max(bs * 25, 1) < bs or seen >= total:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                print(f"  evaluated {seen}/{total} images ({rate:.1f} img/s)", flush=True)
    writer.close()
    inputs._barrier("detections_written")
    if jax.process_index() != 0:
        return {}
    dets = read_detections(out_dir)
    det_masks = read_masks(out_dir)
    with open(data.val_json) as f:
        gt = json.load(f)
    iou_types = ["bbox"]
    if det_masks is not None:
        if gt_has_masks(gt):
            iou_types.append("segm")
        else:
            print(f"{data.val_json}: annotations without segmentation: no mask AP", flush=True)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        prefix = "" if iou_type == "bbox" else "segm/"
        segm_masks = det_masks if iou_type == "segm" else None
        if t.task == "lvis":
            m = evaluate_lvis(gt, dets, max_dets=int(t.topk), iou_type=iou_type, masks=segm_masks)
        else:
            if iou_type == "bbox":
                gt = load_coco(gt)
            restrict = None
            if limit:
                restrict = sorted({int(i) for i in dets["image_id"]})
            m = evaluate_coco(
                gt,
                dets,
                category_splits=data.splits(),
                max_dets=int(t.topk),
                image_ids=restrict,
                iou_type=iou_type,
                masks=segm_masks,
            )
        metrics.update({prefix + k: v for k, v in m.items()})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
