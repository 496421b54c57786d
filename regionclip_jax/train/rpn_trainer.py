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
`eval.proposals.proposal_recall` measures the recall of the proposals on the evaluation set, base and novel
classes separately (the novel recall says whether the class-agnostic RPN generalises beyond its
training classes).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from regionclip_jax import config as config_lib
from regionclip_jax import parallel
from regionclip_jax.convert import rpn as rpn_format
from regionclip_jax.convert.checkpoint import load_clip
from regionclip_jax.data import inputs
from regionclip_jax.data.detection_pipeline import detection_batch_spec
from regionclip_jax.eval import proposals as proposal_eval
from regionclip_jax.models import split as split_lib
from regionclip_jax.models.presets import CLIPConfig
from regionclip_jax.train import loop as loop_lib
from regionclip_jax.train import optim
from regionclip_jax.train import run as run_lib
from regionclip_jax.train import state as state_lib

# ---------------------------------------------------------------------------------------------
# Training.


class RPNModel(nnx.Module):
    def __init__(self, rpn: nnx.Module):
        self.rpn = rpn


class RPNTask:
    """`loop.Task` for class-agnostic RPN training on the detection data's train classes."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        data: inputs.DetectionData,
        clip_config: CLIPConfig | None = None,
    ):
        """`clip_config`: the run's model config (`config.validate` returns it); None reads it
        (for `rpn.kind = "clip"` only)."""
        self.config = config
        self.data = data
        self.arch = config_lib.rpn_arch(config, clip_config)
        self.arch["freeze_at"] = int(config.rpn.freeze_at)
        self.canvas = tuple(int(x) for x in config.data.canvas)
        ids = data.train_ids if config.rpn.train_classes == "base" else data.test_ids
        self.category_map = {cid: 0 for cid in ids}  # class-agnostic
        self.init_weights: tuple[Any, Any] | None = None

    def build_model(self, rngs: nnx.Rngs) -> RPNModel:
        return RPNModel(rpn_format.build_rpn(self.arch, rngs))

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        return inputs.training_dataset(self.config, self.category_map, shard_index, shard_count)

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
        if self.arch["kind"] == "clip" and self.config.model.init:
            clip = load_clip(str(self.config.model.init))
            _, params, rest = split_lib.split_model(clip.visual)
            self.init_weights = (params, rest)
        elif self.arch["kind"] != "clip" and self.arch["init"]:
            self.init_weights = rpn_format.load_rpn_weights(
                dict(self.arch, weights=self.arch["init"])
            )

    def initialize(self, graphdef: Any, state: dict[str, Any]) -> dict[str, Any]:
        if self.init_weights is None:
            return state
        params, rest = state["params"], state["rest"]
        p, r = self.init_weights
        if self.arch["kind"] == "clip":
            where = str(self.config.model.init)
            params["rpn"]["visual"] = state_lib.like(params["rpn"]["visual"], p, where)
            rest["rpn"]["visual"] = state_lib.like(rest["rpn"]["visual"], r, where)
        else:
            params["rpn"] = state_lib.like(params["rpn"], p, self.arch["init"])
            rest["rpn"] = state_lib.like(rest["rpn"], r, self.arch["init"])
        return dict(state, params=params, rest=rest)

    # -- run.run_task hooks ---------------------------------------------------------------------

    def export(self, result: loop_lib.TrainResult, workdir: str) -> None:
        """`rpn.json` + `params.npz` to `workdir/export` (`convert.rpn.export_rpn`)."""
        # Collective (every process takes part: parameters may be sharded across processes).
        host = parallel.gather_to_host(
            {"params": result.state["params"], "rest": result.state["rest"]}
        )
        if jax.process_index() == 0:
            rpn_format.export_rpn(
                self.arch,
                host["params"]["rpn"],
                host["rest"]["rpn"],
                os.path.join(workdir, "export"),
            )

    def evaluate(self, result: loop_lib.TrainResult, workdir: str) -> dict[str, float]:
        """Proposal recall on the evaluation set (`eval.proposals.proposal_recall`), printed."""
        del workdir
        recall = proposal_eval.proposal_recall(self, result.graphdef, result.state)
        print(
            "proposal recall: " + ", ".join(f"{k} {v:.1%}" for k, v in recall.items()), flush=True
        )
        return {f"eval/{k}": v for k, v in recall.items()}


def frozen_patterns(kind: str, freeze_at: int) -> tuple[str, ...]:
    """FREEZE_AT of the RPN's backbone (CLIP tower or detectron2 ResNet), as path regexes."""
    if kind == "clip":  # layer4 and attnpool are unused by the RPN (res4 only)
        return (r"^rpn/visual/(attnpool|layer4)/",) + optim.resnet_freeze_patterns(
            "rpn/visual", freeze_at
        )
    out = [r"^rpn/backbone/stem/"] if freeze_at >= 1 else []
    return tuple(out + [rf"^rpn/backbone/res{i + 1}/" for i in range(1, min(freeze_at, 5))])


def make_task(config: ml_collections.ConfigDict, clip_config: CLIPConfig, workdir: str) -> RPNTask:
    """Mode `rpn`'s side effects (detection data resolved, converted or generated: `inputs.
    prepare`), then its task. `config` is validated (`run.run_task`); this fills in its data
    paths and frozen-parameter patterns."""
    data = inputs.prepare(config, workdir)
    config.data.train, config.data.val = data.train, data.val
    config.optim.freeze = tuple(config.optim.freeze) + frozen_patterns(
        str(config.rpn.kind), int(config.rpn.freeze_at)
    )
    return RPNTask(config, data, clip_config)


def run(
    config: ml_collections.ConfigDict, workdir: str, *, keep_state: bool = True, **kwargs
) -> loop_lib.TrainResult:
    """Trains the RPN, exports it to WORKDIR/export and reports its proposal recall
    (`run.run_task`)."""
    return run_lib.run_task(config, workdir, make_task, keep_state=keep_state, **kwargs)
