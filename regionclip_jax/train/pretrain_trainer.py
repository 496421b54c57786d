"""RegionCLIP region-text pretraining (config mode `pretrain`, spec §1.2 and §4).

One step, for a batch of images `[B, Hc, Wc, 3]` with captions:
  1. regions `[B, R, 4]` + mask from `config.pretrain.regions`:
       "proposals": offline proposals stored in the shards; the pipeline keeps a random subset of
                    `num_regions` per image (the original samples 100 of the RPN's 300);
       "random":    `num_regions` random boxes per image, drawn inside the step (the paper's
                    "RANDOM" region ablation; our own box distribution, see `random_boxes`);
       "gt":        the ground-truth boxes of the shards (an oracle RPN: locations only, the
                    labels are never read), for ShapesWorld and ablations;
       "rpn":       an RPN run inside the step; not wired (fails clearly): precompute the
                    proposals of an offline RPN into the shards instead
                    (`regionclip-jax add-proposals`, inference/proposals.py) and use "proposals";
     plus the global box of each image (`[0, 0, w, h]`, true image size; the original uses the
     padded batch size, which our static canvas would inflate with padding).
  2. the student (trunk -> RoIAlign -> res5 -> attnpool, `models.region.RegionEncoder`) embeds
     regions and global boxes; the frozen teacher embeds the same regions (no gradient);
  3. the frozen text tower embeds one caption per image (no gradient);
  4. `losses.pretrain.pretrain_losses`: teacher pseudo-labels over the concept pool (τ 0.01,
     keep max prob > 0.1, all if none), KL distillation, multi-positive concept contrastive loss
     within each group of `group_size` images (one original GPU), and the symmetric image-text
     loss over the global batch.

Trainable: the student's image tower from layer2 on (stem + layer1 frozen, detectron2
FREEZE_AT = 2, as the original). Frozen: teacher tower, text tower, concept embeddings (carried
in the train state as `Frozen`s, so they are checkpointed but never updated), logit_scale.

Initialisation (`model.init`): a CLIP checkpoint directory written by `regionclip_jax.save_clip`
(`regionclip-jax convert` for OpenAI weights, or `<clip workdir>/export` from mode `clip`); the
student and the teacher both start from it (the original's `teacher_RN50_student_RN50_OAI_CLIP`).
Without it the student starts from random weights and the teacher is a copy (tests).
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
from regionclip_jax.convert.checkpoint import load_clip, save_clip
from regionclip_jax.data import concepts as concepts_lib
from regionclip_jax.data import inputs
from regionclip_jax.data.pipeline import pretrain_batch_spec
from regionclip_jax.losses.pretrain import pretrain_losses
from regionclip_jax.models import split as split_lib
from regionclip_jax.models.clip import CLIP, build_visual
from regionclip_jax.models.layers import DTYPES, Frozen
from regionclip_jax.models.presets import CLIPConfig
from regionclip_jax.models.region import RegionEncoder, box_mask, global_boxes
from regionclip_jax.text.embeddings import clip_text_embeddings
from regionclip_jax.train import loop as loop_lib
from regionclip_jax.train import optim
from regionclip_jax.train import run as run_lib
from regionclip_jax.train import state as state_lib

# Parameters the original never updates (spec §4.6), as regexes over '/'-joined paths; the
# ResNet's norms are FrozenBN there.
ALWAYS_FROZEN = (
    r"^teacher/",
    r"^student/(token_embedding|positional_embedding|transformer|ln_final|text_projection)",
    r"^student/logit_scale",
) + optim.resnet_norm_patterns("student/visual")


def frozen_patterns(freeze_at: int) -> tuple[str, ...]:
    """ALWAYS_FROZEN plus the student's stem (freeze_at >= 1) and layer1..layer(freeze_at-1)."""
    return ALWAYS_FROZEN + optim.resnet_freeze_patterns("student/visual", freeze_at)


class PretrainModel(nnx.Module):
    """Student CLIP (image + frozen text tower), frozen teacher image tower, concept pool.

    Attributes:
      student: `CLIP`; its image tower is trained.
      teacher: image tower of the same architecture, frozen.
      concept_emb: Frozen float32 `[C, E]` concept embeddings (un-normalised), student pool.
      teacher_concept_emb: Frozen float32 `[C, E]`, the teacher's pool (same values by default).
    """

    def __init__(self, clip_config, num_concepts: int, *, dtype: Any, rngs: nnx.Rngs):
        self.student = CLIP(clip_config, dtype=dtype, rngs=rngs)
        self.teacher = build_visual(clip_config, dtype=dtype, rngs=rngs)
        shape = (num_concepts, clip_config.embed_dim)
        self.concept_emb = Frozen(jnp.zeros(shape, jnp.float32))
        self.teacher_concept_emb = Frozen(jnp.zeros(shape, jnp.float32))


def random_boxes(
    rng: jax.Array, image_hw: jax.Array, num: int, min_frac: float, max_frac: float
) -> jax.Array:
    """`num` random boxes per image, inside its true area.

    Each side is uniform in [min_frac, max_frac] of the image side (independently for width and
    height), the position uniform where the box fits. The original's `create_rand_boxes` is not
    specified beyond "random boxes"; this distribution is ours.

    Args:
      rng: PRNG key. image_hw: `[B, 2]` true (h, w). num: boxes per image.

    Returns:
      float32 `[B, num, 4]` xyxy.
    """
    hw = image_hw.astype(jnp.float32)
    u = jax.random.uniform(rng, (hw.shape[0], num, 4), jnp.float32)
    h, w = hw[:, None, 0], hw[:, None, 1]
    bw = (min_frac + (max_frac - min_frac) * u[..., 0]) * w
    bh = (min_frac + (max_frac - min_frac) * u[..., 1]) * h
    x1 = u[..., 2] * (w - bw)
    y1 = u[..., 3] * (h - bh)
    return jnp.stack([x1, y1, x1 + bw, y1 + bh], axis=-1)


def concept_names(config: ml_collections.ConfigDict) -> list[str]:
    """The concept pool: `pretrain.concepts` (a file of `regionclip-jax concepts`, or names
    separated by commas), or, if empty, the frequent nouns of the training captions."""
    setting = str(config.pretrain.concepts)
    if setting and os.path.exists(setting):
        return concepts_lib.load_concepts(setting)
    if setting:
        return [s.strip() for s in setting.split(",") if s.strip()]
    counts, _ = concepts_lib.count_concepts(concepts_lib.iter_captions([config.data.train]))
    pool = concepts_lib.frequent_concepts(counts, int(config.pretrain.concept_min_count))
    return [name for name, _ in pool]


class PretrainTask:
    """`loop.Task` for RegionCLIP pretraining."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        concepts: list[str],
        clip_config: CLIPConfig | None = None,
    ):
        """`clip_config`: the run's model config (`config.validate` returns it); None reads it."""
        self.config = config
        self.pretrain = config.pretrain  # this mode's section of the config
        self.concepts = list(concepts)
        if not self.concepts:
            raise ValueError("the concept pool is empty (config.pretrain.concepts)")
        self.clip_config = clip_config or config_lib.clip_config(config)
        if not self.clip_config.is_resnet:
            raise ValueError(
                "mode 'pretrain' needs a ModifiedResNet CLIP (RegionCLIP's region head is res5 + "
                "attnpool); got a ViT config"
            )
        self.dtype = DTYPES[config.model.dtype]
        self.freeze_at = int(self.pretrain.freeze_at)
        self.source = str(self.pretrain.regions)
        self.init_weights: tuple[Any, Any] | None = None

    # -- loop.Task ------------------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> PretrainModel:
        return PretrainModel(self.clip_config, len(self.concepts), dtype=self.dtype, rngs=rngs)

    def _boxes_mode(self) -> str | None:
        return {"proposals": "proposals", "gt": "gt"}.get(self.source)

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        return inputs.image_text_dataset(
            self.config,
            self.config.data.train,
            int(self.config.data.batch_size) // shard_count,
            shard_index,
            shard_count,
            train=True,
            boxes=self._boxes_mode(),
            max_boxes=int(self.pretrain.num_regions),
        )

    def batch_spec(self, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        d = self.config.data
        spec = pretrain_batch_spec(
            batch_size=global_batch,
            canvas=tuple(int(x) for x in d.canvas),
            boxes=self._boxes_mode(),
            max_boxes=int(self.pretrain.num_regions),
            context_length=int(d.context_length),
        )
        keys = ["images", "tokens", "image_hw"] + (
            ["boxes", "box_mask"] if self._boxes_mode() else []
        )
        return {k: spec[k] for k in keys}

    def regions(self, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(boxes `[B, R, 4]` float32, mask `[B, R]` bool) of this step."""
        if self.source == "random":
            boxes = random_boxes(
                rng,
                batch["image_hw"],
                int(self.pretrain.num_regions),
                float(self.pretrain.random_min_frac),
                float(self.pretrain.random_max_frac),
            )
            return boxes, box_mask(boxes)
        boxes = batch["boxes"].astype(jnp.float32)
        return boxes, box_mask(boxes, batch["box_mask"])

    def loss(self, model: PretrainModel, batch, rng, step):
        del step
        images = batch["images"].astype(self.dtype)
        boxes, mask = self.regions(batch, rng)
        student = RegionEncoder(
            model.student.visual, pooler_resolution=self.pretrain.pooler_resolution or None
        )
        teacher = RegionEncoder(
            model.teacher, pooler_resolution=self.pretrain.pooler_resolution or None
        )
        all_boxes = jnp.concatenate([boxes, global_boxes(batch["image_hw"])], axis=1)
        feats = student.pool(model.student.visual.trunk(images, self.freeze_at), all_boxes)
        s_regions, s_global = feats[:, :-1], feats[:, -1]
        t_regions = jax.lax.stop_gradient(teacher(images, boxes))
        text = jax.lax.stop_gradient(model.student.encode_text(batch["tokens"]))
        group = int(self.pretrain.group_size) or None
        out = pretrain_losses(
            s_regions.astype(jnp.float32),
            t_regions.astype(jnp.float32),
            mask,
            model.concept_emb[...],
            s_global.astype(jnp.float32),
            text.astype(jnp.float32),
            teacher_concept_emb=model.teacher_concept_emb[...],
            temperature=float(self.pretrain.temperature),
            teacher_temperature=float(self.pretrain.teacher_temperature),
            threshold=float(self.pretrain.threshold),
            group_size=group,
            weights=tuple(float(w) for w in self.pretrain.loss_weights),
        )
        total = out.pop("total_loss")
        out["num_regions"] = jnp.sum(mask.astype(jnp.float32))
        return total, out

    # -- initial weights --------------------------------------------------------------------------

    def load_init_weights(self) -> None:
        """Reads `model.init` into host memory (outside any mesh: loading traces the model)."""
        init_dir = str(self.config.model.init)
        if not init_dir:
            return
        clip = load_clip(init_dir, dtype=self.dtype)
        _, clip_params, clip_rest = split_lib.split_model(clip)
        self.init_weights = (clip_params, clip_rest)

    def initialize(self, graphdef: Any, state: dict[str, Any]) -> dict[str, Any]:
        """Student and teacher from `model.init` (or teacher := random student); concept pool.

        Called by the loop on a fresh start only (a resumed run restores all of this).
        """
        params, rest = state["params"], state["rest"]
        if self.config.model.init and self.init_weights is None:
            raise RuntimeError("model.init is set but was not loaded (call load_init_weights)")
        if self.init_weights is not None:
            clip_params, clip_rest = self.init_weights
            where = str(self.config.model.init)
            params["student"] = state_lib.like(params["student"], clip_params, where)
            rest["student"] = state_lib.like(rest["student"], clip_rest, where)
        params["teacher"] = state_lib.like(
            params["teacher"], params["student"]["visual"], "student"
        )
        rest["teacher"] = state_lib.like(rest["teacher"], rest["student"]["visual"], "student")
        model = split_lib.merge(graphdef, params, rest)
        emb = clip_text_embeddings(model.student, self.concepts, self.config.pretrain.templates)
        rest["concept_emb"] = jnp.array(emb, jnp.float32)
        rest["teacher_concept_emb"] = jnp.array(emb, jnp.float32)
        print(f"concept pool: {len(self.concepts)} concepts ({', '.join(self.concepts[:8])}...)")
        return dict(state, params=params, rest=rest)

    # -- run.run_task hooks ---------------------------------------------------------------------

    def export(self, result: loop_lib.TrainResult, workdir: str) -> None:
        """The region-pretrained student to `workdir/export` (`export_student`)."""
        export_student(result, os.path.join(workdir, "export"))


def make_task(
    config: ml_collections.ConfigDict, clip_config: CLIPConfig, workdir: str
) -> PretrainTask:
    """Mode `pretrain`'s side effects (ShapesWorld generated if configured, the concept pool
    parsed from the captions), then its task. `config` is validated (`run.run_task`)."""
    del workdir
    if config.pretrain.regions == "rpn":  # before any data is generated
        raise NotImplementedError(
            "config.pretrain.regions='rpn' (an RPN inside the pretraining step) is not wired; "
            "use 'proposals' (precomputed into the shards with `regionclip-jax add-proposals "
            "--shards IN --out OUT --rpn RPN`), 'random' or 'gt'"
        )
    inputs.prepare_shapesworld(config)
    config.optim.freeze = tuple(config.optim.freeze) + frozen_patterns(
        int(config.pretrain.freeze_at)
    )
    return PretrainTask(config, concept_names(config), clip_config)


def run(
    config: ml_collections.ConfigDict, workdir: str, *, keep_state: bool = False, **kwargs
) -> loop_lib.TrainResult:
    """Region-text pretraining (`config.mode == 'pretrain'`); at the end exports the student to
    `workdir/export` (`run.run_task`)."""
    return run_lib.run_task(config, workdir, make_task, keep_state=keep_state, **kwargs)


def export_student(result: loop_lib.TrainResult, directory: str) -> None:
    """Writes the region-pretrained student CLIP as a `save_clip` checkpoint.

    The export is what the detection trainers take as `model.init`; the text tower is the frozen
    one the student started with. Every process must call it (the parameters are gathered from
    all of them); process 0 writes.
    """
    model = state_lib.host_model(result.graphdef, result.state)
    if jax.process_index() == 0:
        save_clip(model.student, directory, overwrite=True, single_writer=True)
        print(
            f"exported the region-pretrained student (step {result.step}) to {directory}",
            flush=True,
        )
    parallel.sync_processes("pretrain_exported")
