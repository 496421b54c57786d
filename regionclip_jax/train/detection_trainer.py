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

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from regionclip_jax import config as config_lib
from regionclip_jax.convert import rpn as rpn_format
from regionclip_jax.convert.regionclip import load_mask_head, load_regionclip
from regionclip_jax.convert.torch_files import load_state_dict_file
from regionclip_jax.data import inputs
from regionclip_jax.data.detection_pipeline import detection_batch_spec
from regionclip_jax.data.pipeline import ShardSource
from regionclip_jax.data.shards import open_shards
from regionclip_jax.eval import detection as detection_eval
from regionclip_jax.eval.coco import format_table
from regionclip_jax.models import split as split_lib
from regionclip_jax.models.clip import CLIP, build_visual
from regionclip_jax.models.detector import MaskHead, OVDFastRCNN
from regionclip_jax.models.layers import DTYPES
from regionclip_jax.models.normalize import clip_normalize
from regionclip_jax.models.presets import CLIPConfig
from regionclip_jax.text.embeddings import clip_text_embeddings
from regionclip_jax.train import loop as loop_lib
from regionclip_jax.train import optim
from regionclip_jax.train import run as run_lib
from regionclip_jax.train import state as state_lib


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

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        data: inputs.DetectionData,
        clip_config: CLIPConfig | None = None,
    ):
        """`clip_config`: the run's model config (`config.validate` returns it); None reads it."""
        self.config = config
        self.detect = config.detect  # this mode's section of the config
        self.data = data
        self.clip_config = clip_config or config_lib.clip_config(config)
        self.dtype = DTYPES[config.model.dtype]
        self.canvas = tuple(int(x) for x in config.data.canvas)
        self.rpn_arch = (
            config_lib.rpn_arch_from_init(str(self.detect.rpn_init), config, self.clip_config)
            if self.detect.proposals == "rpn"
            else None
        )
        # Zero-shot evaluation (`detect.eval_only`): `run.run_task` evaluates the initial weights.
        self.trains = not bool(self.detect.eval_only)
        self.init_weights: dict[str, Any] = {}

    # -- model ---------------------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> DetectionModel:
        visual = build_visual(self.clip_config, dtype=self.dtype, rngs=rngs)
        detector = OVDFastRCNN(
            visual,
            num_train_classes=len(self.data.train_ids),
            num_test_classes=len(self.data.test_ids),
            temperature=float(self.detect.temperature),
            pooler_resolution=int(self.detect.pooler_resolution) or None,
            mask_head=bool(self.detect.mask_on),
            rngs=rngs,
        )
        rpn = None if self.rpn_arch is None else rpn_format.build_rpn(self.rpn_arch, rngs)
        return DetectionModel(detector, rpn)

    def proposals(self, model: DetectionModel, batch: dict[str, jax.Array]):
        """(boxes `[B, P, 4]`, objectness logits `[B, P]`, valid `[B, P]`) of the frozen RPN."""
        boxes, logits, valid = model.rpn(batch["images"].astype(jnp.float32), batch["image_hw"])
        return jax.lax.stop_gradient((boxes, logits, valid))

    # -- loop.Task -----------------------------------------------------------------------------

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        threshold = float(self.detect.repeat_threshold)
        return inputs.training_dataset(
            self.config,
            self.data.train_category_map(),
            shard_index,
            shard_count,
            repeat_threshold=threshold if threshold > 0 else None,
        )

    def batch_spec(self, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        # With `detect.mask_on` the pipeline yields the instance masks (`training_dataset`):
        # `gt_masks` at `detect.mask_scale` of the canvas and `mask_valid`.
        mask_on = bool(self.detect.mask_on)
        spec = detection_batch_spec(
            batch_size=global_batch,
            canvas=self.canvas,
            max_boxes=int(self.detect.max_boxes),
            normalize=False,
            mask_scale=float(self.detect.mask_scale) if mask_on else None,
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
        detect = self.detect
        # Instance masks (`gt_masks [B, R, Hm, Wm]` at `detect.mask_scale` of the canvas,
        # `mask_valid [B, R]`): the targets are detectron2's `BitMasks.crop_and_resize` of them;
        # instances without a mask (mask_valid False) get no mask loss. Explicit fallback: a
        # batch without `gt_masks` (a pipeline built without `mask_scale`) trains the mask head
        # on box-filled targets (`models.detector`, module docstring).
        masks = {}
        if detect.mask_on and "gt_masks" in batch:
            masks = dict(
                gt_masks=batch["gt_masks"],
                mask_valid=batch.get("mask_valid"),
                mask_scale=float(detect.mask_scale),
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
            mode=str(detect.task),
            rois_per_image=int(detect.rois_per_image),
            positive_fraction=float(detect.positive_fraction),
            iou_threshold=float(detect.iou_threshold),
            bg_weight=None if float(detect.bg_weight) < 0 else float(detect.bg_weight),
            focal_gamma=None if float(detect.focal_gamma) < 0 else float(detect.focal_gamma),
            freeze_at=int(detect.freeze_at),
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
        detect = self.detect
        clip = None
        if not self.config.model.init:  # smoke runs: a random CLIP (no pretrained weights)
            print("model.init is empty: random weights and a random text tower", flush=True)
            clip = CLIP(self.clip_config, rngs=nnx.Rngs(int(self.config.seed)))
        else:
            init = str(self.config.model.init)
            weights = load_regionclip(init, dtype=self.dtype)  # a CLIP directory loads as well
            clip = weights.clip
            _, params, rest = split_lib.split_model(clip.visual)
            self.init_weights["visual"] = (params, rest)
            if detect.mask_on:
                self._load_init_mask_head(init, weights.mask_head)
        self.init_weights["train_embeddings"] = class_embeddings(
            str(detect.train_embeddings),
            clip,
            self.data.train_names,
            str(detect.templates),
            "train",
        )
        self.init_weights["test_embeddings"] = class_embeddings(
            str(detect.test_embeddings), clip, self.data.test_names, str(detect.templates), "test"
        )
        if self.rpn_arch is not None:
            self.init_weights["rpn"] = rpn_format.load_rpn_weights(self.rpn_arch)

    def _load_init_mask_head(self, init: str, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            print(
                f"model.init {init} has no mask head (roi_heads.mask_head.*): the mask head "
                "starts from its random init",
                flush=True,
            )
            return
        # The detector's head (`build_model`: OVDFastRCNN's mask_conv_dim, detectron2's 256):
        # `load_mask_head` checks every shape against it, naming the key.
        head = MaskHead(int(self.clip_config.vision_width) * 32, 256, rngs=nnx.Rngs(0))
        load_mask_head(head, arrays)
        _, params, _ = split_lib.split_model(head)
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
            params["rpn"] = state_lib.like(params["rpn"], rp, str(self.detect.rpn_init))
            rest["rpn"] = state_lib.like(rest["rpn"], rr, str(self.detect.rpn_init))
        return dict(state, params=params, rest=rest)

    # -- run.run_task hook ----------------------------------------------------------------------

    def evaluate(self, result: loop_lib.TrainResult, workdir: str) -> dict[str, float]:
        """COCO / LVIS metrics of `result`'s model (`eval.detection.evaluate`), printed as a
        table: after training under `eval/<step>/` as `eval/<metric>`; zero-shot (untrained,
        `detect.eval_only`) under `eval/` as they are."""
        if not self.trains:
            out_dir = os.path.join(workdir, "eval")
        else:
            out_dir = os.path.join(workdir, "eval", str(result.step))
        metrics = detection_eval.evaluate(self, result.graphdef, result.state, out_dir)
        _print_metrics(metrics)
        if not self.trains:
            return metrics
        return {f"eval/{k}": v for k, v in metrics.items()}


def class_embeddings(
    path: str, clip: Any, names: list[str], templates: str, which: str
) -> np.ndarray:
    """`[K, D]` float32 class embeddings: from a file, or the CLIP text tower's prompt ensemble."""
    if path:
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
    if clip is None:
        raise ValueError(
            f"detect.{which}_embeddings is empty and model.init is not set: the class "
            "embeddings need a CLIP text tower or a [K, D] file"
        )

    return clip_text_embeddings(clip, names, templates)


# ---------------------------------------------------------------------------------------------
# Entry point.


def make_task(
    config: ml_collections.ConfigDict, clip_config: CLIPConfig, workdir: str
) -> DetectionTask:
    """Mode `detect`'s side effects (detection data resolved, converted or generated: `inputs.
    prepare`; the training data checked on process 0), then its task. `config` is validated
    (`run.run_task`); this fills in its data paths and frozen-parameter patterns."""
    data = inputs.prepare(config, workdir)
    config.data.train = data.train
    config.data.val = data.val
    config.optim.freeze = tuple(config.optim.freeze) + frozen_patterns(int(config.detect.freeze_at))
    task = DetectionTask(config, data, clip_config)
    print(
        f"detection: {len(data.train_ids)} train classes, {len(data.test_ids)} test classes "
        f"({sum(c['split'] == 'novel' for c in data.categories)} novel); proposals "
        f"{config.detect.proposals}",
        flush=True,
    )
    if task.trains and jax.process_index() == 0:
        n = inputs.check_training_boxes(
            ShardSource(open_shards(data.train)), data.train_category_map(), str(data.train)
        )
        print(f"training images with boxes of the train classes: {n}", flush=True)
        if config.detect.mask_on:
            m = inputs.check_training_masks(ShardSource(open_shards(data.train)), str(data.train))
            print(f"training images with instance masks: {m}", flush=True)
    return task


def run(
    config: ml_collections.ConfigDict, workdir: str, *, keep_state: bool = True, **kwargs
) -> loop_lib.TrainResult:
    """Fine-tunes (unless `detect.eval_only`) and evaluates; metrics in `result.metrics`
    (`run.run_task`)."""
    return run_lib.run_task(config, workdir, make_task, keep_state=keep_state, **kwargs)


def _print_metrics(metrics: dict[str, float]) -> None:
    if not metrics:
        return
    print(format_table(metrics), flush=True)
