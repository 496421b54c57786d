"""`RegionCLIP`: zero-shot region recognition with a RegionCLIP or plain CLIP checkpoint.

    model = RegionCLIP.from_checkpoint("ckpt/regionclip_rn50")
    feats = model.region_features(images, boxes)              # [B, R, D] attnpool outputs
    scores = model.classify_regions("img.jpg", boxes, ["cat", "dog"])
    dets = model.detect("img.jpg", ["cat", "dog"], boxes=boxes)
    model = RegionCLIP.from_checkpoint("ckpt/regionclip_rn50", rpn="work/rpn")  # proposal mode
    dets = model.detect("img.jpg", ["cat", "dog"])             # boxes from the offline RPN

Classifier (spec §2.4, §3): logits = cos(region, class) / 0.01 with a zero background logit as the
last column, softmax over K + 1. Class embeddings: 81-template prompt ensemble of the checkpoint's
text tower, cached on disk (`vocabulary.EmbeddingCache`). Detection in GT / user-box mode (spec
§6.1): no box deltas, boxes clipped to the image, background column dropped, (box, class) pairs
above `score_thresh` kept, per-class NMS (IoU `nms_thresh`), top `max_detections`, boxes in
original image pixels (`eval.postprocess.detections_numpy`).

Proposal mode (no boxes; spec §6.1-6.2, the zero-shot RPN protocol): an offline class-agnostic
RPN (`rpn=`: an `rpn` mode workdir, its export/ dir, or a detectron2 RPN .pth; see
`convert.rpn.load_rpn_arch`) runs on the resized, zero-padded RGB 0..255 canvas; its valid
proposals, mapped to original pixels, are the boxes, used as they are (NO_BOX_DELTA) and
classified and post-processed exactly as in GT mode. The optional RPN-score fusion of the original
(MULTIPLY_RPN_SCORE) is not applied; `RegionScores.objectness` keeps the RPN logits. RPN test-time
defaults: pre-NMS top-k per level of the kind (C4 / CLIP 6000, FPN 1000), post-NMS top-k 1000,
NMS 0.9 (`OFFLINE_RPN_NMS_THRESH` of the zero-shot configs; detectron2's own default is 0.7).

Instance masks (checkpoints with a mask head, e.g. the released LVIS models converted with
`convert-regionclip`; spec §2.4): `detect` runs the class-agnostic `MaskHead` on the final
(post-NMS) boxes as detectron2's `forward_with_given_boxes`: the boxes in canvas pixels,
RoIAlign(P, 1/16, sampling_ratio 0, aligned) on the same res4 map the boxes were classified with
(computed once per image and kept on the device), res5, deconv 2x2 s2 -> ReLU -> 1x1, sigmoid:
`[N, P, P]` probabilities, pasted into the original image at the boxes in original pixels
(`eval.masks.paste_masks_rle`, detectron2's `paste_masks_in_image`, bilinear, threshold 0.5) and
returned as compressed RLE (`Detections.masks`). Without a mask head (or with `masks=False`)
nothing of this runs and the results are those of the plain recognizer.

Execution: one jitted program per (batch, canvas, box bucket): boxes are padded to a power of two
(`preprocess.bucket_size`) and canvases come in two orientation buckets, so a folder of images
compiles at most a handful of times; the RPN compiles once per canvas shape; the mask program
once per (canvas, detection bucket).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from regionclip_jax.convert import rpn as rpn_format
from regionclip_jax.convert.regionclip import load_mask_head, load_regionclip
from regionclip_jax.eval.masks import paste_masks_rle
from regionclip_jax.eval.postprocess import detections_numpy
from regionclip_jax.inference.preprocess import (
    Prepared,
    bucket_size,
    preprocess,
    validate_boxes,
)
from regionclip_jax.inference.vocabulary import (
    EmbeddingCache,
    checkpoint_identity,
    parse_vocabulary,
)
from regionclip_jax.losses.common import logits_with_background
from regionclip_jax.models.detector import MaskHead
from regionclip_jax.models.region import RegionEncoder
from regionclip_jax.models.split import SplitJit
from regionclip_jax.ops.roi_align import roi_align
from regionclip_jax.text.embeddings import clip_text_embeddings
from regionclip_jax.text.templates import TEMPLATES

PROPOSAL_MODE_ERROR = (
    "detection without boxes (proposal mode) needs an offline RPN: load the model with rpn=PATH "
    "(RegionCLIP.from_checkpoint(ckpt, rpn=...); an `rpn` workdir, its export/ dir or a "
    "detectron2 RPN .pth), or pass boxes (ground-truth or your own, xyxy pixels of the original "
    "image)"
)


@dataclasses.dataclass
class RegionScores:
    """Per-box class probabilities.

    Attributes:
      boxes: float32 `[R, 4]` xyxy in original image pixels.
      probs: float32 `[R, K]` class probabilities (softmax over K classes + background).
      background: float32 `[R]` background probability (1 - probs.sum(-1)).
      names: the K class names (vocabulary words, then exemplar queries).
      image_hw: (H, W) of the original image.
      objectness: float32 `[R]` raw RPN objectness logits of proposals (proposal mode), else None.
    """

    boxes: np.ndarray
    probs: np.ndarray
    background: np.ndarray
    names: list[str]
    image_hw: tuple[int, int]
    objectness: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """int `[R]`: most probable class per box."""
        return self.probs.argmax(-1)

    @property
    def scores(self) -> np.ndarray:
        """float32 `[R]`: probability of that class."""
        return self.probs.max(-1)

    def to_dict(self) -> dict[str, Any]:
        regions = [
            {
                "box": [round(float(v), 2) for v in b],
                "label": self.names[int(k)],
                "score": float(s),
                "probs": {n: float(p) for n, p in zip(self.names, row)},
                "background": float(bg),
            }
            for b, k, s, row, bg in zip(
                self.boxes, self.labels, self.scores, self.probs, self.background
            )
        ]
        if self.objectness is not None:
            for r, o in zip(regions, self.objectness):
                r["objectness"] = float(o)
        return {"classes": list(self.names), "regions": regions}


@dataclasses.dataclass
class Detections:
    """Post-processed detections of one image (spec §6.1), best first.

    Attributes:
      boxes: float32 `[N, 4]` xyxy in original image pixels.
      scores: float32 `[N]`.
      labels: int32 `[N]` indices into `names`.
      names: the class names.
      masks: N compressed COCO RLE dicts (`{"size": [H, W], "counts": str}`, original image
        size; `eval.masks.paste_masks_rle`) when the model has a mask head (`RegionCLIP.detect`
        of a checkpoint with `roi_heads.mask_head.*`), else None (then `to_dict` has no "mask").
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    masks: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        dets = [
            {
                "box": [round(float(v), 2) for v in b],
                "label": self.names[int(k)],
                "score": float(s),
            }
            for b, s, k in zip(self.boxes, self.scores, self.labels)
        ]
        if self.masks is not None:  # without a mask head the output is unchanged
            if len(self.masks) != len(dets):
                raise ValueError(f"{len(self.masks)} masks for {len(dets)} detections")
            for d, m in zip(dets, self.masks):
                d["mask"] = {"size": list(m["size"]), "counts": m["counts"]}
        return {"classes": list(self.names), "detections": dets}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_pipeline(self) -> list[dict[str, Any]]:
        """The detections as Hugging Face transformers' zero-shot-object-detection pipeline returns
        them: `[{"score": float, "label": str, "box": {"xmin", "ymin", "xmax", "ymax"}}]`, best
        first.

        As the pipeline (its `box.int()`), box coordinates are int pixels of the original image
        truncated toward zero (floor, since the boxes lie in the image). No masks.
        """
        return [
            {
                "score": float(s),
                "label": self.names[int(k)],
                "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (int(v) for v in np.trunc(b)))),
            }
            for b, s, k in zip(self.boxes, self.scores, self.labels)
        ]

    def to_coco(
        self, image_id: int, category_ids: Mapping[str, int] | None = None
    ) -> list[dict[str, Any]]:
        """The detections as COCO results (`pycocotools.coco.COCO.loadRes` reads a list of them).

        Args:
          image_id: the image's COCO id.
          category_ids: {class name: COCO category id}; None: 1..K in the order of `names`.

        Returns:
          `[{"image_id", "category_id", "bbox": [x, y, w, h] (float original pixels), "score"}]`,
          best first; with masks also "segmentation" (the compressed RLE of `masks`).

        Raises:
          ValueError: a detected class missing from `category_ids`.
        """
        if category_ids is None:
            category_ids = {n: i + 1 for i, n in enumerate(self.names)}
        missing = sorted({self.names[int(k)] for k in self.labels} - set(category_ids))
        if missing:
            raise ValueError(f"category_ids has no id for the class(es) {missing}")
        out = []
        for i, (b, s, k) in enumerate(zip(self.boxes, self.scores, self.labels)):
            x1, y1, x2, y2 = (float(v) for v in b)
            d = {
                "image_id": int(image_id),
                "category_id": int(category_ids[self.names[int(k)]]),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(s),
            }
            if self.masks is not None:
                m = self.masks[i]
                d["segmentation"] = {"size": list(m["size"]), "counts": m["counts"]}
            out.append(d)
        return out


def _region_features(encoder: RegionEncoder, images: jax.Array, boxes: jax.Array) -> jax.Array:
    """images `[B, Hc, Wc, 3]`, boxes `[B, R, 4]` canvas xyxy -> float32 `[B, R, D]`."""
    return encoder(images, boxes).astype(jnp.float32)


def _features_and_map(
    encoder: RegionEncoder, images: jax.Array, boxes: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`_region_features` and the res4 map `[B, Hc/16, Wc/16, C]` they were pooled from.

    The map is returned (it stays on the device) for the mask head of the final boxes.
    """
    fmap = encoder.feature_map(images)
    return encoder.pool(fmap, boxes).astype(jnp.float32), fmap


def _mask_probs(modules: tuple[RegionEncoder, Any], fmap: jax.Array, boxes: jax.Array) -> jax.Array:
    """fmap `[1, H, W, C]` res4 of one canvas, boxes `[N, 4]` canvas xyxy -> float32 `[N, P, P]`."""
    enc, head = modules
    p, n = enc.pooler_resolution, boxes.shape[0]
    crops = roi_align(fmap, boxes[None].astype(jnp.float32), (p, p), 1.0 / enc.stride, 0, True)
    res5 = enc.visual.res5(crops.reshape(n, p, p, fmap.shape[-1]).astype(fmap.dtype))
    return jax.nn.sigmoid(head(res5).astype(jnp.float32))


class RegionCLIP:
    """Zero-shot region recognition (see the module docstring).

    Args:
      clip: a `regionclip_jax.models.CLIP` (RegionCLIP-pretrained or OpenAI CLIP weights).
      heads: RegionCLIP box-predictor arrays (kept for reference; GT mode uses no box deltas).
      identity: a string identifying the weights for the text-embedding cache (None: no cache).
      min_size, max_size: test-time resize (800 / 1333).
      canvas: fixed (Hc, Wc) canvas for every image (default: two orientation buckets).
      cache_dir: text-embedding cache directory ("default", a path, or None to disable).
      box_chunk: run the RoI head over chunks of this many boxes (bounds memory).
      temperature: τ of the classifier logits (0.01).
      rpn: the offline RPN of proposal mode: an `rpn` workdir, its export/ dir (rpn.json +
        params.npz) or a detectron2 RPN .pth; None: no proposal mode (boxes must be given).
      rpn_pre_nms_topk: RPN candidates per level before NMS; None: the kind's detectron2 test
        default (C4 / CLIP res4 6000, FPN 1000).
      rpn_post_nms_topk: proposals kept after the RPN's NMS (1000).
      rpn_nms_thresh: the RPN's NMS IoU (0.9: `OFFLINE_RPN_NMS_THRESH` of the zero-shot configs).
      mask_head: a `models.detector.MaskHead` over this tower's res5 (ResNet towers only); then
        `detect` returns instance masks (module docstring). None: no masks.

    Raises:
      FileNotFoundError: nothing at `rpn`, or a directory without rpn.json.
      ValueError: `rpn` is a file that is not a detectron2 RPN checkpoint, or weights that do not
        fit its rpn.json; a mask head with a ViT tower or of another res5 width.
    """

    def __init__(
        self,
        clip,
        *,
        heads: Mapping[str, np.ndarray] | None = None,
        identity: str | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        canvas: tuple[int, int] | None = None,
        cache_dir: str | os.PathLike | None = "default",
        box_chunk: int | None = None,
        temperature: float = 0.01,
        rpn: str | os.PathLike | None = None,
        rpn_pre_nms_topk: int | None = None,
        rpn_post_nms_topk: int = 1000,
        rpn_nms_thresh: float = 0.9,
        mask_head: Any = None,
    ):
        self.clip = clip
        self.heads = dict(heads or {})
        self.identity = identity
        self.min_size, self.max_size, self.canvas = min_size, max_size, canvas
        self.temperature = temperature
        self.cache = EmbeddingCache(cache_dir)
        self.box_chunk = box_chunk
        self.encoder = RegionEncoder(clip.visual, box_chunk=box_chunk)
        # Compiled once each; jit's cache keys on the shapes (one program per box bucket).
        self._features_fn = SplitJit(self.encoder, _region_features)
        self._encode_text_fn = SplitJit(clip, lambda m, ids: m.encode_text(ids).astype(jnp.float32))
        self.mask_head = mask_head
        if mask_head is not None:
            self._init_mask_head(mask_head)
        self.rpn_path = None if rpn is None else os.fspath(rpn)
        self.rpn_arch: dict[str, Any] | None = None
        if rpn is not None:
            self._load_rpn(self.rpn_path, rpn_pre_nms_topk, rpn_post_nms_topk, rpn_nms_thresh)

    def _init_mask_head(self, mask_head: Any) -> None:
        """The jitted programs of the mask path (module docstring)."""
        if not self.encoder.is_resnet:
            raise ValueError("a mask head needs a ResNet image tower (res5 feature maps)")
        want = int(self.clip.visual.width) * 32
        have = int(mask_head.deconv_kernel[...].shape[2])
        if have != want:
            raise ValueError(f"the mask head reads {have} channels, this tower's res5 has {want}")
        self._features_and_map_fn = SplitJit(self.encoder, _features_and_map)
        self._mask_probs_fn = SplitJit((self.encoder, mask_head), _mask_probs)

    def _load_rpn(
        self, path: str, pre_nms_topk: int | None, post_nms_topk: int, nms_thresh: float
    ) -> None:
        if post_nms_topk < 1 or (pre_nms_topk is not None and pre_nms_topk < 1):
            raise ValueError(
                f"rpn top-k must be >= 1, got pre {pre_nms_topk}, post {post_nms_topk}"
            )
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(f"rpn_nms_thresh must be in (0, 1], got {nms_thresh}")
        self.rpn_arch, self._rpn_fn = rpn_format.load_offline_rpn(
            path, pre_nms_topk=pre_nms_topk, post_nms_topk=post_nms_topk, nms_thresh=nms_thresh
        )

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | os.PathLike,
        rpn: str | os.PathLike | None = None,
        *,
        masks: bool = True,
        **kwargs: Any,
    ) -> RegionCLIP:
        """Loads a converted RegionCLIP checkpoint (`save_regionclip`) or a converted CLIP one
        (`regionclip-jax convert`; plain CLIP applied to regions, the paper's baseline).

        `rpn` (an `rpn` workdir, its export/ dir or a detectron2 RPN .pth) enables proposal mode.
        A checkpoint with a mask head (`regionclip_mask_head.npz`: the released LVIS models) gets
        it as a `MaskHead` (the res5 width of the tower, the checkpoint's deconv width), so that
        `detect` returns masks; `masks=False` leaves it out. Other keyword options as
        `RegionCLIP`.
        """
        if rpn is not None:  # before the (possibly large) checkpoint is read
            rpn_format.check_rpn_path(rpn)
        weights = load_regionclip(directory)
        if masks and weights.mask_head:
            visual = weights.clip.visual
            if "mask_head" in kwargs:
                raise TypeError("give mask_head= or a checkpoint with a mask head, not both")
            head = MaskHead(
                int(visual.width) * 32,
                int(np.shape(weights.mask_head["deconv.weight"])[1]),
                dtype=visual.dtype,
                rngs=nnx.Rngs(0),
            )
            load_mask_head(head, weights.mask_head)
            kwargs["mask_head"] = head
        return cls(
            weights.clip,
            heads=weights.heads,
            identity=checkpoint_identity(directory),
            rpn=rpn,
            **kwargs,
        )

    @property
    def has_rpn(self) -> bool:
        """Whether an offline RPN is loaded (proposal mode available)."""
        return self.rpn_arch is not None

    @property
    def rpn_program(self):
        """The loaded offline RPN, jitted: `(images float32 [B, Hc, Wc, 3] RGB 0..255, image_hw
        int32 [B, 2]) -> (boxes [B, P, 4] canvas xyxy, logits [B, P], valid bool [B, P])`, P =
        `rpn_post_nms_topk`; None without an RPN. `inference.export` traces it into its program."""
        return self._rpn_fn if self.has_rpn else None

    @property
    def has_mask_head(self) -> bool:
        """Whether `detect` returns instance masks (a mask head is loaded)."""
        return self.mask_head is not None

    @property
    def embed_dim(self) -> int:
        return self.clip.config.embed_dim

    # ------------------------------------------------------------------------------ embeddings

    def region_features(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Region embeddings (RegionCLIP's `att_feats`).

        Args:
          images: float32 `[B, Hc, Wc, 3]` CLIP-normalised canvases (`preprocess(...).image`).
          boxes: float `[B, R, 4]` absolute xyxy in canvas pixels.

        Returns:
          float32 `[B, R, D]` un-normalised attnpool outputs.
        """
        images = np.asarray(images, np.float32)
        boxes = np.asarray(boxes, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != images.shape[0]:
            raise ValueError(f"boxes must be [B={images.shape[0]}, R, 4], got {boxes.shape}")
        b, r = boxes.shape[:2]
        if r == 0:
            return np.zeros((b, 0, self.embed_dim), np.float32)
        size = bucket_size(r)
        if self.box_chunk:
            size = -(-size // self.box_chunk) * self.box_chunk
        padded = np.zeros((b, size, 4), np.float32)
        padded[:, :r] = boxes
        out = self._features_fn(jnp.asarray(images), jnp.asarray(padded))
        return np.asarray(out)[:, :r]

    def text_embeddings(
        self, vocabulary: str | Sequence[str], *, templates: Sequence[str] = TEMPLATES
    ) -> tuple[list[str], np.ndarray]:
        """(words, float32 `[K, D]` un-normalised prompt-ensemble embeddings), cached on disk."""
        words = parse_vocabulary(vocabulary)
        templates = list(templates)

        def compute():
            return clip_text_embeddings(
                self.clip, words, templates, encode_text=self._encode_text_fn
            )

        emb = self.cache.get_or_compute(
            self.identity, words, templates, compute, embed_dim=self.embed_dim
        )
        return words, emb

    def prepare(
        self, image: str | os.PathLike | np.ndarray, boxes=None, *, clip_boxes: bool = False
    ) -> tuple[Prepared, np.ndarray | None]:
        """(preprocessed image, validated boxes in original pixels or None)."""
        prepared = preprocess(
            image, min_size=self.min_size, max_size=self.max_size, canvas=self.canvas
        )
        if boxes is None:
            return prepared, None
        return prepared, validate_boxes(boxes, prepared.original_hw, clip=clip_boxes)

    def exemplar_embedding(
        self, image: str | os.PathLike | np.ndarray, boxes, *, clip_boxes: bool = False
    ) -> np.ndarray:
        """A class query from example boxes of one object: the mean of their L2-normalised region
        embeddings, float32 `[D]`. Pass it as `exemplars={"name": emb}`; average the results of
        several images yourself (`np.mean([...], 0)`) to use exemplars from many images."""
        prepared, b = self.prepare(image, boxes, clip_boxes=clip_boxes)
        if len(b) == 0:
            raise ValueError("exemplar_embedding needs at least one box")
        feats = self.region_features(prepared.image[None], prepared.to_canvas(b)[None])[0]
        feats = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        return feats.mean(0).astype(np.float32)

    def class_embeddings(
        self,
        vocabulary: str | Sequence[str] | None,
        exemplars: Mapping[str, np.ndarray] | None = None,
        *,
        templates: Sequence[str] = TEMPLATES,
    ) -> tuple[list[str], np.ndarray]:
        """(names, `[K, D]`): vocabulary words (text) followed by exemplar queries."""
        names: list[str] = []
        parts = []
        if vocabulary is not None:
            names, emb = self.text_embeddings(vocabulary, templates=templates)
            parts.append(emb)
        for name, vec in (exemplars or {}).items():
            vec = np.asarray(vec, np.float32).reshape(-1)
            if vec.shape != (self.embed_dim,):
                raise ValueError(
                    f"exemplar {name!r} has shape {vec.shape}, want ({self.embed_dim},)"
                )
            if name in names:
                raise ValueError(f"exemplar name {name!r} is also a vocabulary word")
            names.append(name)
            parts.append(vec[None])
        if not names:
            raise ValueError("empty vocabulary: give words and/or exemplar queries")
        return names, np.concatenate(parts).astype(np.float32)

    # -------------------------------------------------------------------------- recognition

    def _scores(
        self,
        prepared: Prepared,
        boxes: np.ndarray,
        names: list[str],
        emb: np.ndarray,
        objectness: np.ndarray | None = None,
        *,
        keep_map: bool = False,
    ) -> tuple[RegionScores, Any]:
        """Classifies `boxes` (float32 `[R, 4]` original pixels) against `emb` (`[K, D]`).

        Returns:
          (scores, the image's feature map `[1, Hc/16, Wc/16, C]` on the device with `keep_map`
          (for the mask head; needs one), else None).
        """
        canvas_boxes = prepared.to_canvas(boxes)[None]
        fmap = None
        if keep_map:
            feats, fmap = self._features_and_map(prepared.image[None], canvas_boxes)
        else:
            feats = self.region_features(prepared.image[None], canvas_boxes)[0]
        logits = logits_with_background(jnp.asarray(feats), jnp.asarray(emb), self.temperature)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        scores = RegionScores(
            boxes, probs[:, :-1], probs[:, -1], names, prepared.original_hw, objectness
        )
        return scores, fmap

    def _features_and_map(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, Any]:
        """`region_features` of one image (`[1, Hc, Wc, 3]`, boxes `[1, R, 4]` canvas pixels) and
        its feature map (a device array), in one program (mask path)."""
        r = boxes.shape[1]
        size = bucket_size(max(r, 1))
        if self.box_chunk:
            size = -(-size // self.box_chunk) * self.box_chunk
        padded = np.zeros((1, size, 4), np.float32)
        padded[:, :r] = boxes
        feats, fmap = self._features_and_map_fn(
            jnp.asarray(image, jnp.float32), jnp.asarray(padded)
        )
        return np.asarray(feats)[0, :r], fmap

    def mask_probabilities(self, fmap: Any, canvas_boxes: np.ndarray) -> np.ndarray:
        """The mask head's probabilities of boxes of one image.

        Args:
          fmap: the image's feature map `[1, Hc/16, Wc/16, C]` (`RegionEncoder.feature_map` of
            its canvas).
          canvas_boxes: float `[N, 4]` xyxy in canvas pixels.

        Returns:
          float32 `[N, P, P]` sigmoid of the mask logits (P: the pooler resolution).

        Raises:
          ValueError: no mask head loaded.
        """
        if self.mask_head is None:
            raise ValueError(
                "this model has no mask head (a checkpoint without roi_heads.mask_head)"
            )
        canvas_boxes = np.asarray(canvas_boxes, np.float32).reshape(-1, 4)
        n = len(canvas_boxes)
        p = self.encoder.pooler_resolution
        if n == 0:
            return np.zeros((0, p, p), np.float32)
        padded = np.zeros((bucket_size(n), 4), np.float32)  # one compile per detection bucket
        padded[:n] = canvas_boxes
        out = self._mask_probs_fn(fmap, jnp.asarray(padded))
        return np.asarray(out)[:n]

    def classify_regions(
        self,
        image: str | os.PathLike | np.ndarray,
        boxes,
        vocabulary: str | Sequence[str] | None,
        *,
        exemplars: Mapping[str, np.ndarray] | None = None,
        templates: Sequence[str] = TEMPLATES,
        clip_boxes: bool = False,
    ) -> RegionScores:
        """Class probabilities of each box.

        Args:
          image: path or uint8 [H, W, 3] RGB.
          boxes: `[R, 4]` xyxy in original image pixels.
          vocabulary: words (list, "cat,dog" or a file path); duplicates are an error.
          exemplars: extra class queries `{name: [D] embedding}` (`exemplar_embedding`).
          clip_boxes: clip boxes to the image instead of rejecting those that extend past it.
        """
        names, emb = self.class_embeddings(vocabulary, exemplars, templates=templates)
        prepared, b = self.prepare(image, boxes, clip_boxes=clip_boxes)
        return self._scores(prepared, b, names, emb)[0]

    # ------------------------------------------------------------------------- proposal mode

    def _require_rpn(self) -> None:
        if self.rpn_arch is None:
            raise ValueError(PROPOSAL_MODE_ERROR)

    def _proposals(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """The RPN's valid proposals of a prepared image: (float32 `[P, 4]` xyxy original pixels,
        float32 `[P]` objectness logits), by decreasing objectness."""
        self._require_rpn()
        if prepared.pixels is None:
            raise ValueError("the prepared image has no un-normalised canvas (Prepared.pixels)")
        images = jnp.asarray(prepared.pixels[None], jnp.float32)
        image_hw = jnp.asarray([prepared.image_hw], jnp.int32)
        boxes, logits, valid = self._rpn_fn(images, image_hw)
        keep = np.asarray(valid[0])
        canvas_boxes = np.asarray(boxes[0], np.float32)[keep]
        # The RPN clips to the resized image; the clip here only absorbs the rounding of the
        # rescale, so that every proposal is a valid box of the original image.
        h, w = prepared.original_hw
        out = np.clip(prepared.to_original(canvas_boxes), 0, [w, h, w, h]).astype(np.float32)
        objectness = np.asarray(logits[0], np.float32)[keep]
        # The RPN drops empty boxes; one that only the rescale made empty goes too (GT mode would
        # reject it as degenerate).
        ok = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out[ok], objectness[ok]

    def proposals(self, image: str | os.PathLike | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The offline RPN's proposals of one image.

        Args:
          image: path or uint8 [H, W, 3] RGB.

        Returns:
          (boxes float32 `[P, 4]` xyxy in original image pixels, objectness float32 `[P]` raw RPN
          logits), by decreasing objectness; P <= `rpn_post_nms_topk` (only valid proposals).

        Raises:
          ValueError: no RPN loaded (`rpn=`).
        """
        self._require_rpn()
        prepared, _ = self.prepare(image)
        return self._proposals(prepared)

    def classify_proposals(
        self,
        image: str | os.PathLike | np.ndarray,
        vocabulary: str | Sequence[str] | None,
        *,
        exemplars: Mapping[str, np.ndarray] | None = None,
        templates: Sequence[str] = TEMPLATES,
    ) -> RegionScores:
        """Class probabilities of each RPN proposal (as `classify_regions` with the proposals as
        boxes; `objectness` holds the RPN logits).

        Raises:
          ValueError: no RPN loaded (`rpn=`), or a bad vocabulary.
        """
        self._require_rpn()
        names, emb = self.class_embeddings(vocabulary, exemplars, templates=templates)
        prepared, _ = self.prepare(image)
        boxes, objectness = self._proposals(prepared)
        return self._scores(prepared, boxes, names, emb, objectness)[0]

    def detect(
        self,
        image: str | os.PathLike | np.ndarray,
        vocabulary: str | Sequence[str] | None,
        boxes=None,
        *,
        exemplars: Mapping[str, np.ndarray] | None = None,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        templates: Sequence[str] = TEMPLATES,
        clip_boxes: bool = False,
        masks: bool = True,
    ) -> Detections:
        """Detections (spec §6.1; COCO zero-shot defaults: score 0.001, NMS 0.5, 100 detections;
        LVIS uses 0.0001 and 300).

        With `boxes` (`[R, 4]` xyxy original pixels): GT / user-box mode. Without: proposal mode,
        the loaded offline RPN's proposals are the boxes (no box deltas, no RPN-score fusion),
        post-processed the same way. With a mask head (and `masks`), each detection gets its
        instance mask (`Detections.masks`, module docstring).

        Raises:
          ValueError: `boxes` is None and no RPN is loaded (pass `rpn=` to `from_checkpoint`), or
            bad inputs.
        """
        return self.detect_with_scores(
            image,
            vocabulary,
            boxes,
            exemplars=exemplars,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            max_detections=max_detections,
            templates=templates,
            clip_boxes=clip_boxes,
            masks=masks,
        )[0]

    def detect_with_scores(
        self,
        image: str | os.PathLike | np.ndarray,
        vocabulary: str | Sequence[str] | None,
        boxes=None,
        *,
        exemplars: Mapping[str, np.ndarray] | None = None,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        templates: Sequence[str] = TEMPLATES,
        clip_boxes: bool = False,
        masks: bool = True,
    ) -> tuple[Detections, RegionScores]:
        """`detect`, also returning the `RegionScores` of every box before post-processing (what
        `classify_regions` / `classify_proposals` return), from the same single pass."""
        if boxes is None:
            self._require_rpn()
        names, emb = self.class_embeddings(vocabulary, exemplars, templates=templates)
        with_masks = bool(masks) and self.mask_head is not None
        if boxes is None:
            prepared, _ = self.prepare(image)
            b, objectness = self._proposals(prepared)
        else:
            prepared, b = self.prepare(image, boxes, clip_boxes=clip_boxes)
            objectness = None
        scores, fmap = self._scores(prepared, b, names, emb, objectness, keep_map=with_masks)
        out_boxes, out_scores, labels = detections_numpy(
            scores.probs,
            scores.boxes,
            scores.image_hw,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            max_detections=max_detections,
        )
        rles = None
        if with_masks:
            probs = self.mask_probabilities(fmap, prepared.to_canvas(out_boxes))
            rles = paste_masks_rle(probs, out_boxes, prepared.original_hw)
        return Detections(out_boxes, out_scores, labels, scores.names, rles), scores
