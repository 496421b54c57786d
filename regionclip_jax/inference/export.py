"""A shippable detector: RegionCLIP proposal mode as one serialized program (`jax.export`).

    path = export_detector(model, ["cat", "dog"], "model.jax", canvas=(800, 1344))
    detect, meta = load_exported("model.jax")            # jax.export + json + numpy only
    pixels, image_hw, original_hw = preprocess_for_export(image, meta)
    out = detect(pixels[None], np.asarray([image_hw], np.int32))
    boxes = boxes_to_original(out["boxes"][0][out["valid"][0]], image_hw, original_hw)

`export_detector` writes `model.jax` (`jax.export.Exported.serialize()`: StableHLO with every
weight and the vocabulary's text embeddings as constants) and `model.json` (the metadata a server
needs: class names, canvas, resize rule, input/output spec, thresholds, CLIP mean/std, format
version). Loading needs no regionclip_jax code: `load_exported`, `preprocess_for_export` and
`boxes_to_original` import only json / numpy / jax.export (and PIL for the resize), inside the
functions, so a server can copy them (docs/serving.md).

The program, for a symbolic batch size b and the static canvas (Hc, Wc):
  inputs   pixels float32 `[b, Hc, Wc, 3]` resized RGB 0..255, zero padding bottom/right (what
           `RegionCLIP.prepare` gives as `Prepared.pixels`); image_hw int32 `[b, 2]` the (h, w)
           of the resized image on its canvas.
  steps    the offline RPN (its own normalisation) -> P = rpn_post_nms_topk proposals per image
           (canvas xyxy, padded, a valid mask; empty boxes invalid) -> CLIP normalisation
           (`models.normalize.clip_normalize`, zero padding) -> region features of the P boxes
           -> cosine logits / temperature with RegionCLIP's zero background logit, softmax over
           K + 1 (`losses.common.logits_with_background`, as the recognizer) ->
           `eval.postprocess.detections_from_scores` (the jitted batched path: clip to image_hw,
           score > score_thresh, per-class NMS, top max_detections).
  outputs  boxes float32 `[b, N, 4]` xyxy canvas pixels; scores float32 `[b, N]`; labels int32
           `[b, N]` (index into the class names, -1 in padding); valid bool `[b, N]`; N =
           max_detections, detections by decreasing score, padding last.

The results equal `RegionCLIP.detect(image, vocabulary)` in proposal mode on the same canvas up to
float rounding and the differences between the batched and the host post-processing that
`eval/postprocess.py` lists (the candidate cap `max_candidates` included). Not exported: instance
masks, exemplar queries, the two orientation buckets (one canvas; an image whose resize does not
fit it is shrunk to fit, `preprocess_for_export`). RoIAlign is lowered as the XLA "gather" form,
which runs on every platform (the Pallas kernel is never chosen).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from regionclip_jax.eval.postprocess import detections_from_scores
from regionclip_jax.inference.preprocess import default_canvas
from regionclip_jax.losses.common import logits_with_background
from regionclip_jax.models.normalize import CLIP_MEAN, CLIP_STD, clip_normalize
from regionclip_jax.models.region import RegionEncoder

FORMAT = "regionclip_jax.exported_detector"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
OUTPUTS = ("boxes", "scores", "labels", "valid")


def metadata_path(path: str | os.PathLike) -> Path:
    """The metadata file next to a program: `model.jax` -> `model.json`."""
    return Path(path).with_suffix(".json")


def check_export_settings(
    canvas: Sequence[int],
    *,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    max_candidates: int,
    platforms: Sequence[str] | None,
) -> None:
    """ValueError (one line) for settings `export_detector` cannot use (checked before any work)."""
    if len(canvas) != 2 or min(int(c) for c in canvas) < 32:
        raise ValueError(f"canvas must be (H, W), each >= 32, got {tuple(canvas)}")
    if any(int(c) % 32 for c in canvas):
        raise ValueError(f"canvas sides must be multiples of 32 (the RPN's stride), got {canvas}")
    if not 0.0 <= score_thresh < 1.0:
        raise ValueError(f"score threshold must be in [0, 1), got {score_thresh}")
    if not 0.0 < nms_thresh <= 1.0:
        raise ValueError(f"NMS threshold must be in (0, 1], got {nms_thresh}")
    if max_detections < 1 or max_candidates < 1:
        raise ValueError(
            f"max detections and candidates must be >= 1, got {max_detections}, {max_candidates}"
        )
    bad = [p for p in platforms or () if p not in PLATFORMS]
    if bad:
        raise ValueError(f"unknown platform(s) {bad}; choose from {list(PLATFORMS)}")


def export_detector(
    model: Any,
    vocabulary: str | Sequence[str],
    out: str | os.PathLike,
    *,
    canvas: tuple[int, int] | None = None,
    score_thresh: float = 0.001,
    nms_thresh: float = 0.5,
    max_detections: int = 100,
    max_candidates: int = 2000,
    platforms: Sequence[str] | None = None,
) -> Path:
    """Writes the proposal-mode detector of `model` for `vocabulary` (module docstring).

    Args:
      model: a `RegionCLIP` loaded with an offline RPN (`rpn=`); its min/max size, temperature
        and RPN settings are baked in.
      vocabulary: words (list, "cat,dog" or a file path), as `RegionCLIP.detect` takes them; the
        81-template prompt-ensemble embeddings (`RegionCLIP.class_embeddings`) are baked in.
      out: the program file (e.g. `model.jax`); the metadata goes to `metadata_path(out)`.
      canvas: static (Hc, Wc), multiples of 32; default `model.canvas`, else the landscape
        bucket of the model's min/max size (800 x 1344 for 800 / 1333).
      score_thresh, nms_thresh, max_detections: as `RegionCLIP.detect` (max_detections is the
        padded output length N).
      max_candidates: (proposal, class) pairs kept before NMS (`detections_from_scores`; exact
        while at most this many pass the score threshold).
      platforms: lowering platforms ("cpu", "cuda", "rocm", "tpu"); None: the default backend's.

    Returns:
      The program's path.

    Raises:
      ValueError: no RPN loaded, bad settings or vocabulary.
    """
    if not getattr(model, "has_rpn", False):
        raise ValueError(
            "export needs proposal mode: load the model with an offline RPN "
            "(RegionCLIP.from_checkpoint(ckpt, rpn=...))"
        )
    if canvas is None:
        canvas = model.canvas or default_canvas(1, 2, model.min_size, model.max_size)
    canvas = (int(canvas[0]), int(canvas[1]))
    platforms = None if platforms is None else tuple(platforms)
    check_export_settings(
        canvas,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        max_detections=max_detections,
        max_candidates=max_candidates,
        platforms=platforms,
    )
    names, emb = model.class_embeddings(vocabulary)
    emb = jnp.asarray(emb, jnp.float32)
    # A fresh encoder without box chunking: the chunk check needs a concrete box count, and the
    # batch size is symbolic here.
    encoder = RegionEncoder(model.clip.visual, box_chunk=None)
    # The recognizer's jitted RPN (weights on the device); inside this trace they become
    # constants of the exported program.
    propose = model.rpn_program
    temperature = float(model.temperature)

    def program(pixels: jax.Array, image_hw: jax.Array):
        boxes, _, valid = propose(pixels, image_hw)
        boxes = boxes.astype(jnp.float32)
        # The recognizer drops empty proposals before classifying them.
        valid = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        feats = encoder(clip_normalize(pixels, image_hw), boxes).astype(jnp.float32)
        probs = jax.nn.softmax(logits_with_background(feats, emb, temperature), axis=-1)
        dets = detections_from_scores(
            probs,
            boxes,
            valid,
            image_hw,
            score_thresh=float(score_thresh),
            nms_thresh=float(nms_thresh),
            topk=int(max_detections),
            max_candidates=int(max_candidates),
        )
        return dets["boxes"], dets["scores"], dets["classes"].astype(jnp.int32), dets["valid"]

    (b,) = jax.export.symbolic_shape("b")
    hc, wc = canvas
    exported = jax.export.export(jax.jit(program), platforms=platforms)(
        jax.ShapeDtypeStruct((b, hc, wc, 3), jnp.float32),
        jax.ShapeDtypeStruct((b, 2), jnp.int32),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(exported.serialize()))
    n = int(max_detections)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": list(names),
        "canvas": list(canvas),
        "min_size": int(model.min_size),
        "max_size": int(model.max_size),
        "resize": "shortest edge to min_size, longest <= max_size (int truncation), PIL bicubic "
        "on uint8 RGB; shrunk to fit the canvas if larger; zero padding bottom/right",
        "pixel_mean": [float(v) for v in CLIP_MEAN * 255.0],
        "pixel_std": [float(v) for v in CLIP_STD * 255.0],
        "clip_mean": [float(v) for v in CLIP_MEAN],
        "clip_std": [float(v) for v in CLIP_STD],
        "normalization": "inside the program: (pixels / 255 - clip_mean) / clip_std, 0 in padding",
        "inputs": [
            {"name": "pixels", "dtype": "float32", "shape": ["b", hc, wc, 3]},
            {"name": "image_hw", "dtype": "int32", "shape": ["b", 2]},
        ],
        "outputs": [
            {"name": "boxes", "dtype": "float32", "shape": ["b", n, 4], "units": "canvas xyxy"},
            {"name": "scores", "dtype": "float32", "shape": ["b", n]},
            {"name": "labels", "dtype": "int32", "shape": ["b", n], "padding": -1},
            {"name": "valid", "dtype": "bool", "shape": ["b", n]},
        ],
        "score_thresh": float(score_thresh),
        "nms_thresh": float(nms_thresh),
        "max_detections": n,
        "max_candidates": int(max_candidates),
        "temperature": temperature,
        "rpn": {
            k: model.rpn_arch[k]
            for k in ("kind", "pre_nms_topk", "post_nms_topk", "nms_thresh")
            if k in model.rpn_arch
        },
        "platforms": list(exported.platforms),
        "checkpoint": model.identity,
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    metadata_path(out).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


# -------------------------------------------------------------------------------------------------
# Serving helpers: each imports what it needs itself (json, numpy, jax.export, PIL), so a server
# can copy them without regionclip_jax.


def load_exported(path):
    """Loads `model.jax` + `model.json` with jax.export only.

    Args:
      path: the program file written by `export_detector` (the metadata next to it).

    Returns:
      (detect, metadata): `detect(pixels, image_hw)` takes float32 `[b, Hc, Wc, 3]` and int32
      `[b, 2]` (any b) and returns a dict of NumPy arrays `boxes [b, N, 4]` (canvas xyxy),
      `scores [b, N]`, `labels [b, N]`, `valid [b, N]`; `detect.exported` is the
      `jax.export.Exported`. metadata: the JSON dict (classes, canvas, min/max size, ...).

    Raises:
      ValueError: not an exported detector of a known format version.
    """
    import json
    import pathlib

    import numpy as np
    from jax import export

    path = pathlib.Path(path)
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    if meta.get("format") != "regionclip_jax.exported_detector" or meta.get("format_version") != 1:
        raise ValueError(f"{path}: not a regionclip_jax exported detector of format version 1")
    exported = export.deserialize(bytearray(path.read_bytes()))
    names = [o["name"] for o in meta["outputs"]]

    def detect(pixels, image_hw):
        out = exported.call(np.asarray(pixels, np.float32), np.asarray(image_hw, np.int32))
        return {k: np.asarray(v) for k, v in zip(names, out)}

    detect.exported = exported
    return detect, meta


def preprocess_for_export(image, metadata):
    """An image as the exported program's input (NumPy + PIL only, as `RegionCLIP.prepare`).

    Args:
      image: uint8 `[H, W, 3]` RGB (decode files with PIL: `np.asarray(Image.open(f).convert("RGB"))`).
      metadata: the exported model's metadata (`load_exported`).

    Returns:
      (pixels float32 `[Hc, Wc, 3]` resized RGB 0..255 with zero padding, image_hw (h, w) of the
      resized image, original_hw (H, W)).
    """
    import math

    import numpy as np
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    min_size, max_size = metadata["min_size"], metadata["max_size"]
    hc, wc = metadata["canvas"]
    # The shortest-edge rule with a cap on the longest edge (torchvision, int truncation).
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = min_size, int(min_size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    new_h, new_w = max(new_h, 1), max(new_w, 1)
    if new_h > hc or new_w > wc:  # one canvas: shrink to fit, keeping the aspect ratio
        s = min(hc / h, wc / w)
        new_h, new_w = max(1, min(hc, math.floor(h * s))), max(1, min(wc, math.floor(w * s)))
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    pixels = np.zeros((hc, wc, 3), np.float32)
    pixels[:new_h, :new_w] = image
    return pixels, (new_h, new_w), (h, w)


def boxes_to_original(boxes, image_hw, original_hw):
    """float `[..., 4]` xyxy canvas pixels -> float32 original-image pixels, clipped to the image."""
    import numpy as np

    (h, w), (oh, ow) = image_hw, original_hw
    sx, sy = w / ow, h / oh
    out = np.asarray(boxes, np.float64) / [sx, sy, sx, sy]
    return np.clip(out, 0, [ow, oh, ow, oh]).astype(np.float32)
