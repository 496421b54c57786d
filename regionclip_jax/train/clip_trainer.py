"""Image-level CLIP training (config mode `clip`): both towers, symmetric image-text loss.

Used to make the ShapesWorld teacher for region pretraining, and usable on its own.

Loss: `losses.pretrain.image_text_contrastive_loss` over the global batch (under jit the batch
is one global array, so the softmax runs over all images and captions of all devices, as
CLIP's all-gather does). Temperature, `config.loss`:
  - learn_temperature=True (CLIP): τ = 1 / exp(logit_scale) with the model's `logit_scale`
    parameter (init log(1/0.07)). CLIP clamps the parameter to log(100) after each update; we
    clamp it inside the loss (exp(min(logit_scale, log(max_logit_scale)))), which gives the same
    logits; above the cap the parameter gets no gradient instead of being reset.
  - learn_temperature=False: fixed τ = loss.temperature (RegionCLIP's 0.01); `logit_scale` gets no
    gradient and is left as initialised.

Batches come from `data.pipeline.make_pretrain_dataset` (no boxes) with the canvas equal to the
model's input resolution (ShapesWorld images are square, so nothing is padded).
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from regionclip_jax import config as config_lib
from regionclip_jax import parallel
from regionclip_jax.convert.checkpoint import save_clip
from regionclip_jax.data import inputs
from regionclip_jax.losses.pretrain import image_text_contrastive_loss
from regionclip_jax.models.clip import CLIP
from regionclip_jax.models.layers import DTYPES
from regionclip_jax.models.presets import CLIPConfig
from regionclip_jax.models.split import SplitJit
from regionclip_jax.train import loop as loop_lib
from regionclip_jax.train import run as run_lib
from regionclip_jax.train import state as state_lib


class ClipTask:
    """`loop.Task` for image-level CLIP training (with `run.run_task`'s export / evaluate hooks)."""

    def __init__(self, config: ml_collections.ConfigDict, clip_config: CLIPConfig | None = None):
        """`clip_config`: the run's model config (`config.validate` returns it); None reads it."""
        self.config = config
        self.clip_config = clip_config or config_lib.clip_config(config)
        self.dtype = DTYPES[config.model.dtype]

    def build_model(self, rngs: nnx.Rngs) -> CLIP:
        return CLIP(self.clip_config, dtype=self.dtype, rngs=rngs)

    def _dataset(self, path: str, batch: int, shard_index: int, shard_count: int, train: bool):
        return inputs.image_text_dataset(
            self.config, path, batch, shard_index, shard_count, train=train
        )

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        batch = int(self.config.data.batch_size) // shard_count
        return self._dataset(self.config.data.train, batch, shard_index, shard_count, True)

    def batch_spec(self, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        h, w = (int(x) for x in self.config.data.canvas)
        return {
            "images": ((global_batch, h, w, 3), np.float32),
            "tokens": ((global_batch, int(self.config.data.context_length)), np.int32),
        }

    def temperature(self, model: CLIP) -> jax.Array:
        cfg = self.config.loss
        if not cfg.learn_temperature:
            return jnp.asarray(float(cfg.temperature), jnp.float32)
        cap = math.log(float(cfg.max_logit_scale))
        return jnp.exp(-jnp.minimum(model.logit_scale[...].astype(jnp.float32), cap))

    def embed(self, model: CLIP, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(image [B, E], text [B, E]) float32 embeddings, un-normalised."""
        img = model.encode_image(batch["images"].astype(self.dtype)).astype(jnp.float32)
        txt = model.encode_text(batch["tokens"]).astype(jnp.float32)
        return img, txt

    def loss(self, model, batch, rng, step):
        del rng, step  # CLIP training has no randomness inside the step
        img, txt = self.embed(model, batch)
        tau = self.temperature(model)
        loss = image_text_contrastive_loss(img, txt, temperature=tau)
        return loss, {"temperature": tau, "i2t_acc": _i2t_accuracy(img, txt)}

    # -- run.run_task hooks ---------------------------------------------------------------------

    def export(self, result: loop_lib.TrainResult, workdir: str) -> None:
        """The trained CLIP to `workdir/export` (save_clip format: a `model.init`)."""
        model = state_lib.host_model(result.graphdef, result.state)
        export_model(model, result.step, os.path.join(workdir, "export"))

    def evaluate(self, result: loop_lib.TrainResult, workdir: str) -> dict[str, float]:
        """Val retrieval (`evaluate_retrieval`) when `data.val` is set, whatever the process count:
        process 0 evaluates the whole model on its first device; the others wait."""
        del workdir
        metrics: dict[str, float] = {}
        if self.config.data.val:
            whole = parallel.whole_on_one_device(result.state)  # collective: every process
            if jax.process_index() == 0:
                batch_size = int(self.config.data.batch_size)
                with jax.set_mesh(parallel.make_mesh({"data": 1}, jax.local_devices()[:1])):
                    metrics = evaluate_retrieval(
                        self, result.graphdef, whole, self.config.data.val, batch_size
                    )
                if metrics:
                    print(
                        f"val retrieval (batches of {batch_size}): "
                        f"image->text {metrics['val_i2t_top1']:.3f}, "
                        f"text->image {metrics['val_t2i_top1']:.3f}",
                        flush=True,
                    )
        parallel.sync_processes("clip_evaluated")
        return metrics


def _i2t_accuracy(img: jax.Array, txt: jax.Array) -> jax.Array:
    """Fraction of images whose own caption scores highest among the batch's captions."""
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    sim = img @ txt.T
    return jnp.mean((jnp.argmax(sim, axis=1) == jnp.arange(sim.shape[0])).astype(jnp.float32))


def evaluate_retrieval(
    task: ClipTask, graphdef: Any, state: Any, path: str, batch_size: int
) -> dict[str, float]:
    """Image->text and text->image top-1 retrieval within batches of `batch_size` val images
    (one random caption per image; chance = 1 / batch_size). Single-process helper."""
    embed = SplitJit.from_parts(graphdef, (state["params"], state["rest"]), task.embed)

    i2t, t2i, n = 0.0, 0.0, 0
    it = iter(task._dataset(path, batch_size, 0, 1, train=False))
    for batch in it:
        img, txt = embed({k: batch[k] for k in ("images", "tokens")})
        i2t += float(_i2t_accuracy(img, txt))
        t2i += float(_i2t_accuracy(txt, img))
        n += 1
    if n == 0:
        return {}
    return {"val_i2t_top1": i2t / n, "val_t2i_top1": t2i / n, "val_batches": n}


def export_model(model: CLIP, step: int, directory: str) -> None:
    """Writes the trained CLIP (whole host arrays, `state_lib.host_model`) as a `save_clip`
    checkpoint (a `model.init` for pretraining). Every process calls it; process 0 writes."""
    if jax.process_index() == 0:
        save_clip(model, directory, overwrite=True, single_writer=True)
        print(f"exported the trained CLIP (step {step}) to {directory}", flush=True)
    parallel.sync_processes("clip_exported")


def make_task(config: ml_collections.ConfigDict, clip_config: CLIPConfig, workdir: str) -> ClipTask:
    """Mode `clip`'s side effects (ShapesWorld generated if configured), then its task."""
    del workdir
    inputs.prepare_shapesworld(config)
    return ClipTask(config, clip_config)


def run(
    config: ml_collections.ConfigDict, workdir: str, *, keep_state: bool = True, **kwargs
) -> loop_lib.TrainResult:
    """Trains image-level CLIP (`config.mode == 'clip'`); at the end exports the model to
    `workdir/export` (save_clip format) and evaluates val retrieval (`run.run_task`)."""
    return run_lib.run_task(config, workdir, make_task, keep_state=keep_state, **kwargs)
