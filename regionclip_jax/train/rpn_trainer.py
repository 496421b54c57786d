"""Class-agnostic region proposal network training (config mode `rpn`) and RPN loading.

The original's OVD detectors take proposals from an offline RPN trained on the *base* boxes of the
target data set (`rpn_coco_48.pth`: detectron2 R50-C4; `rpn_lvis_866*.pth`: R50-FPN; spec §1.3,
§7), run frozen in eval mode. This module trains such an RPN (`rpn.kind`):
  "c4" / "fpn": detectron2's R50 (caffe/MSRA: BGR, pixel-mean subtraction, FrozenBN), started from
                `rpn.init` (a detectron2 .pth) or from scratch;
  "clip":       the RPN head on the res4 of a CLIP ResNet image tower started from `model.init`
                (the original's `rpn_lvis_1203_clipbackbone` is such an RPN). The ShapesWorld demo
                uses it: its CLIP tower already knows the shapes, so a few hundred steps suffice.
Loss: detectron2's (256 anchors per image at half foreground, IoU 0.3 / 0.7 with low-quality
matches, objectness BCE + L1 deltas, both over 256 x B). Boxes of `rpn.train_classes` ("base":
the train classes of the detection data, as the original's OVD RPNs; "all") are the targets.

After training, `WORKDIR/export/` holds `rpn.json` (architecture) and `params.npz` (weights):
pass WORKDIR (or the export dir) as `detect.rpn_init`, or as `rpn=` of the zero-shot recognizer
(`inference.RegionCLIP`) and of `add-proposals`, which load it with `load_offline_rpn`.
`proposal_recall` measures the recall of the proposals on the evaluation set, base and novel
classes separately (the novel recall says whether the class-agnostic RPN generalises beyond its
training classes).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from regionclip_jax import parallel
from regionclip_jax.data.detection_pipeline import detection_batch_spec
from regionclip_jax.train import config_validation, detection_data, optim
from regionclip_jax.train import loop as loop_lib
from regionclip_jax.train import state as state_lib
from regionclip_jax.train.detection_trainer import clip_normalize

SPEC_FILE = "rpn.json"
PARAMS_FILE = "params.npz"


# ---------------------------------------------------------------------------------------------
# Architecture spec, building and loading.


def spec_from_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture of the RPN that mode `rpn` trains."""
    r, t = config.rpn, config.detect
    spec = {
        "kind": str(r.kind),
        "depth": int(r.depth),
        "base_width": int(r.base_width),
        "anchor_sizes": [float(x) for x in r.anchor_sizes],
        "aspect_ratios": [float(x) for x in r.aspect_ratios],
        "pre_nms_topk": int(t.rpn_pre_nms_topk),
        "post_nms_topk": int(t.rpn_post_nms_topk),
        "nms_thresh": float(t.rpn_nms_thresh),
        "init": str(r.init),
    }
    if spec["kind"] == "clip":
        spec["clip_config"] = config_validation.clip_config(config).to_dict()
    return spec


def rpn_spec_from_init(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The spec of a trained RPN: an `rpn` workdir / its export dir, or a detectron2 .pth.

    The test-time settings (pre/post-NMS top-k, NMS threshold) come from `config.detect`.
    """
    t = config.detect
    if path == "random":  # smoke runs: an untrained RPN of config.rpn's architecture
        return dict(spec_from_config(config), weights="")
    return load_rpn_spec(
        path,
        pre_nms_topk=int(t.rpn_pre_nms_topk),
        post_nms_topk=int(t.rpn_post_nms_topk),
        nms_thresh=float(t.rpn_nms_thresh),
    )


def load_rpn_spec(
    path: str | os.PathLike,
    *,
    pre_nms_topk: int | None,
    post_nms_topk: int,
    nms_thresh: float,
    name: str = "detect.rpn_init",
) -> dict[str, Any]:
    """The spec of a trained RPN at `path`, with the given test-time settings (no config needed).

    Args:
      path: an `rpn` workdir (holding export/rpn.json), its export dir, or a detectron2 RPN .pth.
      pre_nms_topk: candidates per level before NMS; None: the kind's detectron2 test default
        (C4 / CLIP res4: 6000, FPN: 1000 per level).
      post_nms_topk, nms_thresh: proposals kept after NMS, and the NMS IoU threshold.
      name: what `path` is called in error messages.

    Raises:
      FileNotFoundError: nothing at `path`, or a directory without rpn.json (nor export/rpn.json).
    """
    path = os.fspath(path)
    for d in (os.path.join(path, "export"), path):
        if os.path.isfile(os.path.join(d, SPEC_FILE)):
            with open(os.path.join(d, SPEC_FILE)) as f:
                spec = json.load(f)
            spec["weights"] = os.path.join(d, PARAMS_FILE)
            break
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name} {path!r}: neither an `rpn` workdir with export/{SPEC_FILE} "
                "nor a detectron2 RPN checkpoint file"
            )
        from regionclip_jax.convert.detectron2_rpn import infer_rpn_architecture

        spec = dict(infer_rpn_architecture(path), weights=path)
    if pre_nms_topk is None:
        pre_nms_topk = 1000 if spec.get("kind") == "fpn" else 6000
    spec.update(
        pre_nms_topk=int(pre_nms_topk),
        post_nms_topk=int(post_nms_topk),
        nms_thresh=float(nms_thresh),
    )
    return spec


def check_rpn_path(path: str | os.PathLike) -> None:
    """FileNotFoundError unless something exists at `path` (named as an RPN in the message)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"rpn {os.fspath(path)!r} does not exist (want an `rpn` workdir, its export/ dir, or "
            "a detectron2 RPN .pth)"
        )


def load_offline_rpn(
    path: str | os.PathLike,
    *,
    pre_nms_topk: int | None,
    post_nms_topk: int,
    nms_thresh: float,
) -> tuple[dict[str, Any], Any]:
    """A trained RPN as a frozen proposal function (the recognizer's and `add-proposals`').

    Args:
      path: an `rpn` workdir, its export/ dir (rpn.json + params.npz) or a detectron2 RPN .pth.
      pre_nms_topk, post_nms_topk, nms_thresh: test-time settings (`load_rpn_spec`).

    Returns:
      (spec, propose): `propose(images, image_hw)` takes uint8 or float `[B, Hc, Wc, 3]` RGB
      0..255 canvases (zero padding) and int32 `[B, 2]` (h, w), and returns device arrays (boxes
      float32 `[B, post_nms_topk, 4]` xyxy canvas pixels, objectness logits `[B, post_nms_topk]`,
      valid bool `[B, post_nms_topk]`); jitted, one program per input shape.

    Raises:
      FileNotFoundError: nothing usable at `path`.
      ValueError: a file that is not an RPN, or weights that do not fit its rpn.json.
    """
    path = os.fspath(path)
    check_rpn_path(path)
    try:
        spec = load_rpn_spec(
            path,
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=post_nms_topk,
            nms_thresh=nms_thresh,
            name="rpn",
        )
        params, rest = load_rpn_weights(spec)
    except ValueError as e:
        raise ValueError(f"rpn {path!r} is not a usable RPN: {e}") from e
    except KeyError as e:  # an rpn.json without an architecture field
        raise ValueError(f"rpn {path!r} is not a usable RPN: its spec lacks {e}") from e
    # The graph only: the weights come from load_rpn_weights (no second random init).
    graphdef, _, _ = state_lib.split_model(nnx.eval_shape(lambda: build_rpn(spec, nnx.Rngs(0))))
    params, rest = jax.device_put((params, rest))

    @jax.jit  # jit's cache keys on the input shapes: one program per canvas
    def _propose(params, rest, images, image_hw):
        # uint8 may cross to the device (4x less than float32); the RPN takes float 0..255.
        return state_lib.merge(graphdef, params, rest)(images.astype(jnp.float32), image_hw)

    def propose(images, image_hw):
        return _propose(params, rest, images, image_hw)

    return spec, propose


class ClipRPN(nnx.Module):
    """An RPN head on the res4 (stride 16) of a CLIP ModifiedResNet image tower.

    Takes the same input as the detectron2 RPNs (RGB 0..255, zero padding) and applies CLIP's
    normalisation itself.
    """

    def __init__(self, clip_config: Any, spec: dict[str, Any], *, rngs: nnx.Rngs):
        from regionclip_jax.models.clip import build_visual
        from regionclip_jax.models.rpn import RPN

        self.visual = build_visual(clip_config, rngs=rngs)
        self.freeze_at = int(spec.get("freeze_at", 2))
        self.rpn = RPN(
            kind="features",
            in_channels=clip_config.vision_width * 16,  # res4 of a ModifiedResNet
            strides=(16,),
            anchor_sizes=tuple(spec["anchor_sizes"]),
            aspect_ratios=tuple(spec["aspect_ratios"]),
            pre_nms_topk=int(spec["pre_nms_topk"]),
            post_nms_topk=int(spec["post_nms_topk"]),
            nms_thresh=float(spec["nms_thresh"]),
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


def build_rpn(spec: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """The RPN module `spec` describes (random weights)."""
    if spec["kind"] == "clip":
        from regionclip_jax.models.presets import CLIPConfig

        return ClipRPN(CLIPConfig.from_dict(spec["clip_config"]), spec, rngs=rngs)
    from regionclip_jax.models.rpn import RPN

    return RPN(
        kind=spec["kind"],
        depth=int(spec["depth"]),
        base_width=int(spec["base_width"]),
        anchor_sizes=tuple(spec["anchor_sizes"]),
        aspect_ratios=tuple(spec["aspect_ratios"]),
        num_convs=int(spec.get("num_convs", 1)),
        fpn_norm=bool(spec.get("fpn_norm", False)),
        stride_in_1x1=bool(spec.get("stride_in_1x1", True)),
        pre_nms_topk=int(spec["pre_nms_topk"]),
        post_nms_topk=int(spec["post_nms_topk"]),
        nms_thresh=float(spec["nms_thresh"]),
        rngs=rngs,
    )


def _flat(tree: Any) -> dict[str, np.ndarray]:
    from regionclip_jax.train.optim import path_str

    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(tree: Any, flat: dict[str, np.ndarray], where: str) -> Any:
    from regionclip_jax.train.optim import path_str

    leaves = []
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = path_str(p)
        if key not in flat:
            raise ValueError(f"{where}: no weights for {key}")
        if flat[key].shape != v.shape:
            raise ValueError(f"{where}: {key} has shape {flat[key].shape}, the RPN {v.shape}")
        leaves.append(jnp.asarray(flat[key], v.dtype))
    return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def load_rpn_weights(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(params, rest) of the RPN `spec` describes, read from `spec["weights"]` (on the host)."""
    path = spec["weights"]
    if path.endswith(".npz"):
        # Shapes only: every value comes from the file (an eager random init takes seconds).
        _, params, rest = state_lib.split_model(
            nnx.eval_shape(lambda: build_rpn(spec, nnx.Rngs(0)))
        )
        with np.load(path) as z:
            flat = dict(z)
        params = _unflat(params, {k[2:]: v for k, v in flat.items() if k.startswith("p/")}, path)
        rest = _unflat(rest, {k[2:]: v for k, v in flat.items() if k.startswith("r/")}, path)
        return params, rest
    model = build_rpn(spec, nnx.Rngs(0))
    if not path:  # "random"
        _, params, rest = state_lib.split_model(model)
        return params, rest
    from regionclip_jax.convert.detectron2_rpn import load_detectron2_rpn

    load_detectron2_rpn(path, model)
    _, params, rest = state_lib.split_model(model)
    return params, rest


def export_rpn(spec: dict[str, Any], params: Any, rest: Any, directory: str) -> str:
    """Writes `rpn.json` + `params.npz` (the format `rpn_spec_from_init` reads)."""
    os.makedirs(directory, exist_ok=True)
    flat = {f"p/{k}": v for k, v in _flat(params).items()}
    flat.update({f"r/{k}": v for k, v in _flat(rest).items()})
    np.savez(os.path.join(directory, PARAMS_FILE), **flat)
    keep = {k: v for k, v in spec.items() if k not in ("weights", "init")}
    with open(os.path.join(directory, SPEC_FILE), "w") as f:
        json.dump(keep, f, indent=2)
    return directory


# ---------------------------------------------------------------------------------------------
# Training.


class RPNModel(nnx.Module):
    def __init__(self, rpn: nnx.Module):
        self.rpn = rpn


class RPNTask:
    """`loop.Task` for class-agnostic RPN training on the detection data's train classes."""

    def __init__(self, config: ml_collections.ConfigDict, data: detection_data.DetectionData):
        self.config = config
        self.data = data
        self.spec = spec_from_config(config)
        self.spec["freeze_at"] = int(config.rpn.freeze_at)
        self.canvas = tuple(int(x) for x in config.data.canvas)
        ids = data.train_ids if config.rpn.train_classes == "base" else data.test_ids
        self.category_map = {cid: 0 for cid in ids}  # class-agnostic
        self.init_weights: tuple[Any, Any] | None = None

    def build_model(self, rngs: nnx.Rngs) -> RPNModel:
        return RPNModel(build_rpn(self.spec, rngs))

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        return detection_data.training_dataset(
            self.config, self.category_map, shard_index, shard_count
        )

    def batch_spec(self, global_batch: int):
        spec = detection_batch_spec(
            batch_size=global_batch,
            canvas=self.canvas,
            max_boxes=int(self.config.detect.max_boxes),
            normalize=False,
        )
        return {k: spec[k] for k in ("images", "image_hw", "boxes", "box_mask")}

    def loss(self, model: RPNModel, batch, rng, step):
        del step
        out = model.rpn.losses(
            batch["images"].astype(jnp.float32),
            batch["image_hw"],
            batch["boxes"],
            batch["box_mask"],
            rng,
        )
        loss = out["loss_rpn_cls"] + out["loss_rpn_loc"]
        return loss, dict(out)

    def load_init_weights(self) -> None:
        if self.spec["kind"] == "clip" and self.config.model.init:
            from regionclip_jax.convert.checkpoint import load_clip

            clip = load_clip(str(self.config.model.init))
            _, params, rest = state_lib.split_model(clip.visual)
            self.init_weights = (params, rest)
        elif self.spec["kind"] != "clip" and self.spec["init"]:
            self.init_weights = load_rpn_weights(dict(self.spec, weights=self.spec["init"]))

    def initialize(self, graphdef: Any, state: dict[str, Any]) -> dict[str, Any]:
        if self.init_weights is None:
            return state
        params, rest = state["params"], state["rest"]
        p, r = self.init_weights
        if self.spec["kind"] == "clip":
            where = str(self.config.model.init)
            params["rpn"]["visual"] = state_lib.like(params["rpn"]["visual"], p, where)
            rest["rpn"]["visual"] = state_lib.like(rest["rpn"]["visual"], r, where)
        else:
            params["rpn"] = state_lib.like(params["rpn"], p, self.spec["init"])
            rest["rpn"] = state_lib.like(rest["rpn"], r, self.spec["init"])
        return dict(state, params=params, rest=rest)


def frozen_patterns(kind: str, freeze_at: int) -> tuple[str, ...]:
    """FREEZE_AT of the RPN's backbone (CLIP tower or detectron2 ResNet), as path regexes."""
    if kind == "clip":  # layer4 and attnpool are unused by the RPN (res4 only)
        return (r"^rpn/visual/(attnpool|layer4)/",) + optim.resnet_freeze_patterns(
            "rpn/visual", freeze_at
        )
    out = [r"^rpn/backbone/stem/"] if freeze_at >= 1 else []
    return tuple(out + [rf"^rpn/backbone/res{i + 1}/" for i in range(1, min(freeze_at, 5))])


def proposal_recall(
    task: RPNTask, graphdef: Any, state: dict[str, Any], *, top_n: int = 100, iou: float = 0.5
) -> dict[str, float]:
    """Recall of the top-`top_n` proposals at IoU >= `iou` on the evaluation set, per split."""
    from regionclip_jax.data.pipeline import ShardSource
    from regionclip_jax.data.shards import open_shards
    from regionclip_jax.ops.boxes import pairwise_iou
    from regionclip_jax.train.detection_trainer import whole_on_one_device

    data = task.data
    host = whole_on_one_device(state)
    splits = data.splits()
    test_ids = data.test_ids

    @jax.jit
    def best_iou(params, rest, images, image_hw, gt):
        model = state_lib.merge(graphdef, params, rest)
        boxes, _, valid = model.rpn(images.astype(jnp.float32), image_hw)
        boxes, valid = boxes[:, :top_n], valid[:, :top_n]
        ious = jax.vmap(pairwise_iou)(gt, boxes)  # [B, G, P]
        return jnp.max(jnp.where(valid[:, None, :], ious, 0.0), axis=-1)

    ds = detection_data.evaluation_dataset(
        task.config, ShardSource(open_shards(data.val)), data.test_category_map()
    )
    size = int(task.config.detect.eval_batch_size)
    hits = {"base": [0, 0], "novel": [0, 0]}
    with jax.set_mesh(parallel.make_mesh({"data": 1}, jax.local_devices()[:1])):
        for batch in ds:
            padded, n = detection_data.pad_batch(
                {k: batch[k] for k in ("images", "image_hw", "boxes")}, size
            )
            best = np.asarray(
                best_iou(
                    host["params"],
                    host["rest"],
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


def run(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> loop_lib.TrainResult:
    """Trains the RPN, exports it to WORKDIR/export and reports its proposal recall."""
    config = ml_collections.ConfigDict(config.to_dict())
    config_validation.validate(config, jax.device_count(), jax.process_count())
    data = detection_data.prepare(config, workdir)
    config.data.train, config.data.val = data.train, data.val
    config.optim.freeze = tuple(config.optim.freeze) + frozen_patterns(
        str(config.rpn.kind), int(config.rpn.freeze_at)
    )
    task = RPNTask(config, data)
    if not loop_lib.has_checkpoint(workdir):
        task.load_init_weights()
    kwargs["keep_state"] = True
    result = loop_lib.train(config, workdir, task, **kwargs)
    if result.preempted or result.step < int(config.total_steps):
        return result
    # Collective (every process takes part: parameters may be sharded across processes).
    host = parallel.gather_to_host({"params": result.state["params"], "rest": result.state["rest"]})
    if jax.process_index() == 0:
        export_rpn(
            task.spec,
            host["params"]["rpn"],
            host["rest"]["rpn"],
            os.path.join(workdir, "export"),
        )
    recall = proposal_recall(task, result.graphdef, result.state)
    print("proposal recall: " + ", ".join(f"{k} {v:.1%}" for k, v in recall.items()), flush=True)
    result.metrics = dict(result.metrics, **{f"eval/{k}": v for k, v in recall.items()})
    return result
