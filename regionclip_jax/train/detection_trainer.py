"""Open-vocabulary detection fine-tuning and evaluation (config mode `detect`; spec §1.3-§1.5, §5, §6).

One training step, for a batch of images `[B, Hc, Wc, 3]` with GT boxes of the train classes:
  1. proposals: the frozen offline RPN (`detect.rpn_init`: an `rpn` workdir or a detectron2
     RPN .pth) in eval mode with its test-time top-k (C4: 6000 -> NMS 0.7 -> 1000), as the
     original runs `offline_proposal_generator` under `torch.no_grad()`;
  2. `models.detector.OVDFastRCNN.training_losses`: GT appended to the proposals, IoU-0.5 matcher,
     `rois_per_image` RoIs at `positive_fraction` foreground, region features (trunk -> RoIAlign ->
     res5 -> attnpool), text-embedding classifier with the zero background logit at τ, COCO
     focal-scaled CE (γ 0.5, background 0.2) or LVIS weighted CE (background 0.8), L1 box loss
     over the sampled RoIs (+ the class-agnostic mask loss with `detect.mask_on`).
Trainable: the CLIP image tower from layer2 on (stem + layer1 frozen: FREEZE_AT 2), attnpool,
bbox_pred (and the mask head). Frozen: class embeddings (carried in the state), the RPN.

Evaluation (`evaluate`): every image of the evaluation set at `detect.test_size`, proposals from
the RPN (or the GT boxes with `detect.proposals = "gt"`: zero-shot GT mode), the test-class
embeddings (all classes), `eval.postprocess` (softmax, optional RPN-score fusion, threshold,
NMS or soft-NMS, top-k), boxes back to the original image size, streamed to disk per process
(`eval.results.DetectionWriter`), then COCO (novel / base / all AP50 and the AP table) or LVIS
(APr / APc / APf) metrics on process 0.

Initialisation: `model.init`, a CLIP checkpoint directory (`regionclip-jax convert` of OpenAI or
RegionCLIP weights, the `export/` of a `clip` run, or the `export/` of a `pretrain` run = the
region-pretrained student). The class embeddings come from that checkpoint's text tower with the
81-template ensemble (`detect.train_embeddings` / `test_embeddings` load [K, D] files instead:
the original's `coco_48_base_cls_emb.pth` etc. work).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from regionclip_jax import parallel
from regionclip_jax.data import transforms as T
from regionclip_jax.data.detection_pipeline import detection_batch_spec
from regionclip_jax.train import clip_trainer, config_validation, detection_data, optim
from regionclip_jax.train import loop as loop_lib
from regionclip_jax.train import state as state_lib

_CLIP_MEAN = jnp.asarray(T.CLIP_MEAN)
_CLIP_STD = jnp.asarray(T.CLIP_STD)


def clip_normalize(images: jax.Array, image_hw: jax.Array) -> jax.Array:
    """uint8/float `[B, Hc, Wc, 3]` RGB in 0..255 -> CLIP-normalised float32, 0 in the padding."""
    x = (images.astype(jnp.float32) / 255.0 - _CLIP_MEAN) / _CLIP_STD
    hc, wc = images.shape[1:3]
    inside = (jnp.arange(hc)[None, :, None] < image_hw[:, 0, None, None]) & (
        jnp.arange(wc)[None, None, :] < image_hw[:, 1, None, None]
    )
    return jnp.where(inside[..., None], x, 0.0)


def frozen_patterns(freeze_at: int) -> tuple[str, ...]:
    """Parameters the detection fine-tuning never updates, as regexes over '/'-joined paths."""
    return (
        (r"^rpn/", r"^detector/(train|test)_embeddings")
        + optim.resnet_norm_patterns("detector/visual")
        + optim.resnet_freeze_patterns("detector/visual", freeze_at)
    )


class DetectionModel(nnx.Module):
    """The OVD detector and (when proposals come from one) its frozen offline RPN."""

    def __init__(self, detector: nnx.Module, rpn: nnx.Module | None):
        self.detector = detector
        self.rpn = rpn


class DetectionTask:
    """`loop.Task` for Fast R-CNN fine-tuning with a text-embedding classifier."""

    def __init__(self, config: ml_collections.ConfigDict, data: detection_data.DetectionData):
        from regionclip_jax.train import rpn_trainer

        self.config = config
        self.t = config.detect
        self.data = data
        self.clip_config = config_validation.clip_config(config)
        self.dtype = clip_trainer.DTYPES[config.model.dtype]
        self.canvas = tuple(int(x) for x in config.data.canvas)
        self.rpn_spec = (
            rpn_trainer.rpn_spec_from_init(str(self.t.rpn_init), config)
            if self.t.proposals == "rpn"
            else None
        )
        self.init_weights: dict[str, Any] = {}

    # -- model ---------------------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> DetectionModel:
        from regionclip_jax.models.clip import build_visual
        from regionclip_jax.models.detector import OVDFastRCNN
        from regionclip_jax.train import rpn_trainer

        visual = build_visual(self.clip_config, dtype=self.dtype, rngs=rngs)
        detector = OVDFastRCNN(
            visual,
            num_train_classes=len(self.data.train_ids),
            num_test_classes=len(self.data.test_ids),
            temperature=float(self.t.temperature),
            pooler_resolution=int(self.t.pooler_resolution) or None,
            mask_head=bool(self.t.mask_on),
            rngs=rngs,
        )
        rpn = None if self.rpn_spec is None else rpn_trainer.build_rpn(self.rpn_spec, rngs)
        return DetectionModel(detector, rpn)

    def proposals(self, model: DetectionModel, batch: dict[str, jax.Array]):
        """(boxes `[B, P, 4]`, objectness logits `[B, P]`, valid `[B, P]`) of the frozen RPN."""
        boxes, logits, valid = model.rpn(batch["images"].astype(jnp.float32), batch["image_hw"])
        return jax.lax.stop_gradient((boxes, logits, valid))

    # -- loop.Task -----------------------------------------------------------------------------

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        threshold = float(self.t.repeat_threshold)
        return detection_data.training_dataset(
            self.config,
            self.data.train_category_map(),
            shard_index,
            shard_count,
            repeat_threshold=threshold if threshold > 0 else None,
        )

    def batch_spec(self, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        # With `detect.mask_on` the pipeline yields the instance masks (`training_dataset`):
        # `gt_masks` at `detect.mask_scale` of the canvas and `mask_valid`.
        mask_on = bool(self.t.mask_on)
        spec = detection_batch_spec(
            batch_size=global_batch,
            canvas=self.canvas,
            max_boxes=int(self.t.max_boxes),
            normalize=False,
            mask_scale=float(self.t.mask_scale) if mask_on else None,
        )
        keys = ["images", "image_hw", "boxes", "box_mask", "labels"]
        if mask_on:
            keys += ["gt_masks", "mask_valid"]
        return {k: spec[k] for k in keys}

    def loss(self, model: DetectionModel, batch, rng, step):
        del step
        image_hw = batch["image_hw"]
        proposals, _, valid = self.proposals(model, batch)
        images = clip_normalize(batch["images"], image_hw).astype(self.dtype)
        t = self.t
        # Instance masks (`gt_masks [B, R, Hm, Wm]` at `detect.mask_scale` of the canvas,
        # `mask_valid [B, R]`): the targets are detectron2's `BitMasks.crop_and_resize` of them;
        # instances without a mask (mask_valid False) get no mask loss. Explicit fallback: a
        # batch without `gt_masks` (a pipeline built without `mask_scale`) trains the mask head
        # on box-filled targets (`models.detector`, module docstring).
        masks = {}
        if t.mask_on and "gt_masks" in batch:
            masks = dict(
                gt_masks=batch["gt_masks"],
                mask_valid=batch.get("mask_valid"),
                mask_scale=float(t.mask_scale),
            )
        loss, metrics = model.detector.training_losses(
            images,
            image_hw,
            proposals,
            valid,
            batch["boxes"],
            jnp.where(batch["box_mask"], batch["labels"], -1),
            batch["box_mask"],
            rng,
            mode=str(t.task),
            rois_per_image=int(t.rois_per_image),
            positive_fraction=float(t.positive_fraction),
            iou_threshold=float(t.iou_threshold),
            bg_weight=None if float(t.bg_weight) < 0 else float(t.bg_weight),
            focal_gamma=None if float(t.focal_gamma) < 0 else float(t.focal_gamma),
            freeze_at=int(t.freeze_at),
            **masks,
        )
        metrics["num_proposals"] = jnp.mean(jnp.sum(valid.astype(jnp.float32), axis=1))
        return loss, metrics

    # -- initial weights -------------------------------------------------------------------------

    def load_init_weights(self) -> None:
        """Reads `model.init` (image tower + class embeddings) and the RPN, outside any mesh.

        With `detect.mask_on`, a `model.init` converted from a RegionCLIP checkpoint with a mask
        head (`convert-regionclip` of a released LVIS model: `regionclip_mask_head.npz`) also
        initialises the mask head (`convert.regionclip.load_mask_head`); without one the mask
        head keeps its random init (detectron2's). Both cases print one line.
        """
        from regionclip_jax.convert.regionclip import load_regionclip
        from regionclip_jax.train import rpn_trainer

        t = self.t
        clip = None
        if not self.config.model.init:  # smoke runs: a random CLIP (no pretrained weights)
            from regionclip_jax.models.clip import CLIP

            print("model.init is empty: random weights and a random text tower", flush=True)
            clip = CLIP(self.clip_config, rngs=nnx.Rngs(int(self.config.seed)))
        else:
            init = str(self.config.model.init)
            weights = load_regionclip(init, dtype=self.dtype)  # a CLIP directory loads as well
            clip = weights.clip
            _, params, rest = state_lib.split_model(clip.visual)
            self.init_weights["visual"] = (params, rest)
            if t.mask_on:
                self._load_init_mask_head(init, weights.mask_head)
        self.init_weights["train_embeddings"] = class_embeddings(
            str(t.train_embeddings), clip, self.data.train_names, str(t.templates), "train"
        )
        self.init_weights["test_embeddings"] = class_embeddings(
            str(t.test_embeddings), clip, self.data.test_names, str(t.templates), "test"
        )
        if self.rpn_spec is not None:
            self.init_weights["rpn"] = rpn_trainer.load_rpn_weights(self.rpn_spec)

    def _load_init_mask_head(self, init: str, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            print(
                f"model.init {init} has no mask head (roi_heads.mask_head.*): the mask head "
                "starts from its random init",
                flush=True,
            )
            return
        from regionclip_jax.convert.regionclip import load_mask_head
        from regionclip_jax.models.detector import MaskHead

        # The detector's head (`build_model`: OVDFastRCNN's mask_conv_dim, detectron2's 256):
        # `load_mask_head` checks every shape against it, naming the key.
        head = MaskHead(int(self.clip_config.vision_width) * 32, 256, rngs=nnx.Rngs(0))
        load_mask_head(head, arrays)
        _, params, _ = state_lib.split_model(head)
        self.init_weights["mask_head"] = params
        print(
            f"mask head loaded from model.init {init} (deconv "
            f"{list(np.shape(arrays['deconv.weight']))}, predictor "
            f"{list(np.shape(arrays['predictor.weight']))})",
            flush=True,
        )

    def initialize(self, graphdef: Any, state: dict[str, Any]) -> dict[str, Any]:
        params, rest = state["params"], state["rest"]
        if "visual" in self.init_weights:
            vp, vr = self.init_weights["visual"]
            where = str(self.config.model.init)
            params["detector"]["visual"] = state_lib.like(params["detector"]["visual"], vp, where)
            rest["detector"]["visual"] = state_lib.like(rest["detector"]["visual"], vr, where)
        if "mask_head" in self.init_weights:
            where = f"{self.config.model.init} (mask head)"
            params["detector"]["mask_head"] = state_lib.like(
                params["detector"]["mask_head"], self.init_weights["mask_head"], where
            )
        for key in ("train_embeddings", "test_embeddings"):
            emb = self.init_weights[key]
            have = rest["detector"][key].shape
            if emb.shape != have:
                raise ValueError(
                    f"detect.{key}: embeddings of shape {emb.shape}, the detector needs {have} "
                    "(classes x embedding width)"
                )
            rest["detector"][key] = jnp.asarray(emb, jnp.float32)
        if "rpn" in self.init_weights:
            rp, rr = self.init_weights["rpn"]
            params["rpn"] = state_lib.like(params["rpn"], rp, str(self.t.rpn_init))
            rest["rpn"] = state_lib.like(rest["rpn"], rr, str(self.t.rpn_init))
        return dict(state, params=params, rest=rest)


def class_embeddings(
    path: str, clip: Any, names: list[str], templates: str, which: str
) -> np.ndarray:
    """`[K, D]` float32 class embeddings: from a file, or the CLIP text tower's prompt ensemble."""
    if path:
        from regionclip_jax.convert.torch_files import load_state_dict_file

        if path.endswith(".npy"):
            emb = np.load(path)
        else:  # the original's *_cls_emb.pth: a single tensor (or a dict holding one)
            sd = load_state_dict_file(path)
            if len(sd) != 1:
                raise ValueError(f"{path}: expected one [K, D] tensor, found keys {sorted(sd)}")
            emb = next(iter(sd.values()))
        emb = np.asarray(emb, np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(names):
            raise ValueError(
                f"detect.{which}_embeddings {path}: shape {emb.shape}, expected "
                f"[{len(names)}, D] for the {len(names)} {which} classes"
            )
        return emb
    from regionclip_jax.train.pretrain_trainer import concept_embeddings

    if clip is None:
        raise ValueError(
            f"detect.{which}_embeddings is empty and model.init is not set: the class "
            "embeddings need a CLIP text tower or a [K, D] file"
        )

    return np.asarray(concept_embeddings(clip, names, templates), np.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def whole_on_one_device(state: dict[str, Any]) -> dict[str, Any]:
    """params + rest of a (possibly sharded) train state, whole on the first local device, once
    (a jitted evaluation fed host arrays would copy them at every call)."""

    whole = parallel.gather_to_host({"params": state["params"], "rest": state["rest"]})
    return jax.device_put(whole, jax.local_devices()[0])


def make_predict_fn(task: DetectionTask, graphdef: Any):
    """jitted `(params, rest, batch) -> detections` of the evaluation (class indices 0..K_test-1).

    With a mask head (`detect.mask_on`) the detections also carry `mask_probs [B, topk, M, M]`
    float32: the sigmoid of the mask head on the res5 features of the final (post-NMS, top-k)
    boxes, as detectron2's `forward_with_given_boxes` (RoIAlign on res4 -> res5 -> mask head;
    zeros on padding slots). The feature map is requested again from the trunk
    (`OVDFastRCNN.predict` does not return it): the identical computation inside one jit,
    which XLA's common-subexpression elimination merges (checked on CPU with a tiny detector:
    the compiled FLOPs are those of one trunk pass; a trunk on different input adds one
    trunk's FLOPs). A `predict` that returned its feature map would make that explicit.
    """
    from regionclip_jax.eval.postprocess import detections_from_scores

    t = task.t

    @jax.jit
    def predict(params, rest, batch):
        model = state_lib.merge(graphdef, params, rest)
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

    return predict


def evaluate(
    task: DetectionTask, graphdef: Any, state: dict[str, Any], out_dir: str
) -> dict[str, float]:
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
    from regionclip_jax.data.pipeline import ShardSource
    from regionclip_jax.data.shards import open_shards
    from regionclip_jax.eval.masks import paste_masks_rle
    from regionclip_jax.eval.postprocess import rescale_to_original
    from regionclip_jax.eval.results import DetectionWriter, read_detections, read_masks
    from regionclip_jax.ops.boxes import nonempty

    t, data = task.t, task.data
    host = whole_on_one_device(state)
    predict = make_predict_fn(task, graphdef)
    source = ShardSource(open_shards(data.val))
    image_ids = detection_data.record_image_ids(source, data.val_json)
    bs = int(t.eval_batch_size)
    limit = int(t.max_eval_images)
    ds = detection_data.evaluation_dataset(
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
            padded, n = detection_data.pad_batch({k: batch[k] for k in keys}, bs)
            out = jax.device_get(predict(host["params"], host["rest"], padded))
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
    detection_data._barrier("detections_written")
    if jax.process_index() != 0:
        return {}
    from regionclip_jax.eval.coco import gt_has_masks

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
            from regionclip_jax.eval.lvis import evaluate_lvis

            m = evaluate_lvis(gt, dets, max_dets=int(t.topk), iou_type=iou_type, masks=segm_masks)
        else:
            from regionclip_jax.eval.coco import evaluate_coco, load_coco

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


# ---------------------------------------------------------------------------------------------
# Entry point.


def run(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> loop_lib.TrainResult:
    """Fine-tunes (unless `detect.eval_only`) and evaluates; metrics in `result.metrics`."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config_validation.validate(config, jax.device_count(), jax.process_count())
    data = detection_data.prepare(config, workdir)
    config.data.train = data.train
    config.data.val = data.val
    config.optim.freeze = tuple(config.optim.freeze) + frozen_patterns(int(config.detect.freeze_at))
    task = DetectionTask(config, data)
    print(
        f"detection: {len(data.train_ids)} train classes, {len(data.test_ids)} test classes "
        f"({sum(c['split'] == 'novel' for c in data.categories)} novel); proposals "
        f"{config.detect.proposals}",
        flush=True,
    )
    if config.detect.eval_only:
        task.load_init_weights()
        with jax.set_mesh(parallel.make_mesh({"data": 1}, jax.local_devices()[:1])):
            graphdef, params, rest = state_lib.split_model(task.build_model(nnx.Rngs(0)))
            state = task.initialize(graphdef, {"params": params, "rest": rest})
        metrics = evaluate(task, graphdef, state, os.path.join(workdir, "eval"))
        _print_metrics(metrics)
        return loop_lib.TrainResult(step=0, metrics=metrics, losses={}, seconds=0.0)

    from regionclip_jax.data.pipeline import ShardSource
    from regionclip_jax.data.shards import open_shards

    if jax.process_index() == 0:
        n = detection_data.check_training_boxes(
            ShardSource(open_shards(data.train)), data.train_category_map(), str(data.train)
        )
        print(f"training images with boxes of the train classes: {n}", flush=True)
        if config.detect.mask_on:
            m = detection_data.check_training_masks(
                ShardSource(open_shards(data.train)), str(data.train)
            )
            print(f"training images with instance masks: {m}", flush=True)
    if not loop_lib.has_checkpoint(workdir):
        task.load_init_weights()
    kwargs["keep_state"] = True
    result = loop_lib.train(config, workdir, task, **kwargs)
    if result.preempted or result.step < int(config.total_steps):
        return result
    metrics = evaluate(
        task, result.graphdef, result.state, os.path.join(workdir, "eval", str(result.step))
    )
    _print_metrics(metrics)
    result.metrics = dict(result.metrics, **{f"eval/{k}": v for k, v in metrics.items()})
    return result


def _print_metrics(metrics: dict[str, float]) -> None:
    if not metrics:
        return
    from regionclip_jax.eval.coco import format_table

    print(format_table(metrics), flush=True)
