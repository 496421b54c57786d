"""The README's main job, in its interim form (until the pretraining issue lands).

The end-to-end ShapesWorld demo (teacher CLIP → region pretraining → zero-shot region recognition)
needs the trainers. Until then this runs the smallest real thing the project does, end to end, and
says so: generate ShapesWorld → build a CLIP tower with RANDOM weights → save it as a converted
checkpoint and load it back → 81-template prompt-ensemble embeddings of the shape names → crop each
ground-truth object, encode the crops and classify them zero-shot. With random weights the accuracy
is chance level; what the demo shows is that every stage runs, and how long each takes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"-- {name} ...", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"   done in {timings[name]:.1f} s", flush=True)


def crop_objects(scenes, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops every kept ground-truth object, resized (bicubic) and CLIP-normalised.

    Returns:
      crops: float32[N, resolution, resolution, 3]; labels: int32[N] indices into SHAPES.
    """
    from PIL import Image

    from regionclip_jax.data.shapesworld import SHAPES

    crops, labels = [], []
    for scene in scenes:
        image = Image.fromarray(scene.image)
        for obj in scene.kept:
            x1, y1, x2, y2 = (int(round(v)) for v in obj.box)
            crop = image.crop((x1, y1, x2, y2)).resize((resolution, resolution), Image.BICUBIC)
            crops.append((np.asarray(crop, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)
            labels.append(SHAPES.index(obj.shape))
    return np.stack(crops), np.asarray(labels, np.int32)


def run(
    out_dir: str = "runs/demo",
    *,
    preset: str = "RN50",
    num_scenes: int = 16,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Runs the interim demo; returns the timings (seconds per stage) and the accuracy."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from regionclip_jax.convert.checkpoint import load_clip, save_clip
    from regionclip_jax.data import shapesworld
    from regionclip_jax.models.clip import CLIP
    from regionclip_jax.text import prompt_ensemble_embeddings

    print(
        "regionclip_jax demo (interim): the end-to-end ShapesWorld demo (teacher -> region "
        "pretraining -> zero-shot region recognition) arrives with the pretraining issue.\n"
        "This runs the smallest real thing the project does today, with a CLIP of RANDOM "
        "weights: expect chance-level accuracy.\n"
    )
    timings: dict[str, float] = {}
    os.makedirs(out_dir, exist_ok=True)

    with _stage(f"generate ShapesWorld ({num_scenes} val scenes, shards + COCO json)", timings):
        summary = shapesworld.generate(
            os.path.join(out_dir, "shapesworld"),
            num_train=0,
            num_val=num_scenes,
            seed=seed,
            overwrite=True,
        )
        scenes = [shapesworld.render_scene(i, seed=seed, split="val") for i in range(num_scenes)]
        print(f"   {summary.get('images_per_second', 0):.0f} images/s")

    ckpt = os.path.join(out_dir, f"clip_{preset.lower().replace('/', '_')}_random")
    with _stage(f"build CLIP {preset} (random weights), save and reload the checkpoint", timings):
        model = CLIP.from_preset(preset, rngs=nnx.Rngs(seed))
        save_clip(model, ckpt, overwrite=True, source=f"random init ({preset}, seed {seed})")
        model = load_clip(ckpt)
        print(f"   checkpoint: {ckpt}")

    encode_text = nnx.jit(lambda m, t: m.encode_text(t))
    encode_image = nnx.jit(lambda m, x: m.encode_image(x))

    names = list(shapesworld.SHAPES)
    with _stage(f"prompt-ensemble embeddings ({len(names)} names x 81 templates)", timings):
        class_emb = prompt_ensemble_embeddings(
            lambda t: encode_text(model, jnp.asarray(t)), names, batch_size=81, jit=False
        )

    res = model.config.image_resolution
    with _stage(f"crop and encode the ground-truth objects at {res}x{res}", timings):
        crops, labels = crop_objects(scenes, res)
        feats = []
        for start in range(0, len(crops), batch_size):
            chunk = crops[start : start + batch_size]
            padded = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk  # one static batch shape: compiled once
            feats.append(np.asarray(encode_image(model, jnp.asarray(padded)))[: len(chunk)])
        feats = np.concatenate(feats)

    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    text = class_emb / np.linalg.norm(class_emb, axis=-1, keepdims=True)
    pred = np.argmax(feats @ text.T, axis=-1)
    accuracy = float(np.mean(pred == labels))
    timings["accuracy"] = accuracy

    print(f"\nZero-shot crop classification of {len(labels)} objects, {len(names)} classes:")
    print(f"  accuracy {accuracy:.1%} (chance {1 / len(names):.1%}; weights are random)")
    print(f"  backend: {jax.default_backend()}, {jax.device_count()} device(s)")
    print(
        "  stage timings: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "accuracy")
    )
    return timings
