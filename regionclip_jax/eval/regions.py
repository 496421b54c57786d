"""Zero-shot region recognition with ground-truth boxes (the pretraining evaluation).

Every ground-truth box of a shard set is embedded by a CLIP image tower through the region
encoder (trunk -> RoIAlign -> res5 -> attnpool) and classified by cosine similarity with class
embeddings; no background class, no post-processing (this measures recognition, not detection).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.data import transforms as T
from regionclip_jax.data.pipeline import make_pretrain_dataset
from regionclip_jax.models.region import RegionEncoder
from regionclip_jax.models.split import SplitJit


def region_predictions(
    visual: nnx.Module,
    class_emb: np.ndarray,
    path: str,
    *,
    canvas: tuple[int, int],
    category_map: Mapping[int, int],
    batch_size: int = 16,
    max_boxes: int = 16,
    pooler_resolution: int | None = None,
) -> dict[str, np.ndarray]:
    """Predicted class of every ground-truth box in the shards at `path`.

    Args:
      visual: a ModifiedResNet image tower (teacher or student).
      class_emb: `[K, E]` class embeddings (un-normalised).
      path: shard directory / manifest (images resized to fit `canvas`).
      canvas: static (H, W); category_map: record category id -> class index (others dropped).
      batch_size: images per forward; max_boxes: GT slots per image (extra boxes are dropped).
      pooler_resolution: RoIAlign output (default 2 x input_resolution / 32).

    Returns:
      dict of flat arrays over the N boxes: `labels` int `[N]`, `preds` int `[N]`,
      `scores` float `[N]` (softmax probability of the prediction at τ = 0.01),
      `image` int `[N]` (record index), `boxes` float `[N, 4]` (original image pixels).
    """
    ds = make_pretrain_dataset(
        path,
        batch_size=batch_size,
        canvas=canvas,
        min_size=min(canvas),
        max_size=max(canvas),
        boxes="gt",
        max_boxes=max_boxes,
        shuffle=False,
        num_epochs=1,
        flip=False,
        drop_remainder=False,
        category_map=dict(category_map),
    )
    text = np.asarray(class_emb, np.float32)
    text = jnp.asarray(text / np.linalg.norm(text, axis=-1, keepdims=True))

    def classify_regions(encoder, images, boxes):
        feats = encoder(images, boxes).astype(jnp.float32)
        feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        probs = jax.nn.softmax(feats @ text.T / 0.01, axis=-1)
        return jnp.argmax(probs, axis=-1), jnp.max(probs, axis=-1)

    classify = SplitJit(
        RegionEncoder(visual, pooler_resolution=pooler_resolution), classify_regions
    )

    out: dict[str, list[Any]] = {k: [] for k in ("labels", "preds", "scores", "image", "boxes")}
    for batch in ds:
        n = len(batch["images"])
        # One static batch shape (compiled once): the last batch is padded with zeros.
        images, boxes = (T.pad_rows(batch[k], batch_size, 0) for k in ("images", "boxes"))
        preds, scores = (np.asarray(x)[:n] for x in classify(images, boxes))
        valid = batch["box_mask"] & (batch["labels"] >= 0)
        scale = batch["scale"][:, None, [1, 0, 1, 0]]  # (sy, sx) -> x, y, x, y
        out["labels"].append(batch["labels"][valid])
        out["preds"].append(preds[valid])
        out["scores"].append(scores[valid])
        out["image"].append(np.broadcast_to(batch["source_index"][:, None], valid.shape)[valid])
        out["boxes"].append((batch["boxes"] / scale)[valid])
    if not out["labels"]:
        raise ValueError(f"no images in {path}")
    return {k: np.concatenate(v) for k, v in out.items()}


def accuracy_table(
    preds: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[int]]
) -> dict[str, float]:
    """Top-1 accuracy over all boxes and over the boxes whose label is in each group."""
    labels, p = preds["labels"], preds["preds"]
    table = {"all": float(np.mean(p == labels))}
    for name, members in groups.items():
        sel = np.isin(labels, list(members))
        table[name] = float(np.mean(p[sel] == labels[sel])) if sel.any() else float("nan")
    return table
