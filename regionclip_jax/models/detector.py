"""RegionCLIP's open-vocabulary Fast R-CNN (`CLIPFastRCNN` + `CLIPRes5ROIHeads`, spec §1.3-§1.5,
§2.3-§2.4, §5.2-§5.4).

    images [B, Hc, Wc, 3] --visual.trunk (stem + layer1..3)--> res4 (stride 16)
    proposals [B, P, 4] (+ GT in training) --RoIAlign(P_pool, 1/16, 0, aligned)--> layer4 --> res5
    res5 --attnpool--> x [B, R, D]
    x --> logits [cos(x̂, ŵ_k) / τ ; 0 / τ]   (K classes + background, last)
    x --> bbox_pred: Linear(D, 4), class-agnostic deltas, Box2BoxTransform (10, 10, 5, 5)
    res5 (fg RoIs) --> mask head (LVIS, optional): deconv 2x2 s2 -> 256, ReLU, 1x1 -> 1 channel

The RoI path is `region.RegionEncoder`'s (this class extends it), the class embeddings are
frozen state (`Frozen`, not `nnx.Param`): `train_embeddings [K_train, D]` in training,
`test_embeddings [K_test, D]` at inference (the original's `TEXT_EMB_PATH` /
`OPENSET_TEST_TEXT_EMB_PATH`); the caller fills both. The background embedding is all-zero and
frozen in the original, so its logit is the constant 0 (`losses.logits_with_background`).

Training RoIs (detectron2 `label_and_sample_proposals`, static shapes): the valid GT boxes are
appended to the proposals (P + G slots, padded GT masked), matched with
`Matcher((0.5,), (0, 1), allow_low_quality_matches=False)` on IoU, labelled with the matched GT
class (fg) or K (bg), and `rois_per_image` of them are sampled with `positive_fraction` foreground
(`ops.subsample_labels`: same distribution as detectron2's `randperm`, static output with a
validity mask). Images without GT get only background RoIs, as in detectron2.

Deviations, all documented where they occur:
  - GT boxes that are empty (zero width/height) or non-finite are ignored, as are such proposals;
    detectron2's data mapper removes empty GT before the model sees them.
  - Mask targets (detectron2 `mask_rcnn_loss`, class-agnostic; M = 2 x the res5 side = the
    pooler resolution: 14 for RN50, 18 for RN50x4, as the original). Our shards carry each
    instance's mask as a bitmap (COCO/LVIS polygons and RLE decoded with pycocotools,
    ShapesWorld's rasterised shapes), and the pipeline yields them at `mask_scale` of the canvas
    (`gt_masks [B, G, Hm, Wm]`, `mask_valid [B, G]`). The targets are detectron2's
    `BitMasks.crop_and_resize`: RoIAlign(M x M, spatial scale `mask_scale`, sampling_ratio 0,
    aligned=True) of the matched GT bitmap, >= 0.5 (`bitmap_mask_targets`). detectron2 crops
    bitmasks held at image resolution; ours lose detail below 1 / `mask_scale` canvas pixels
    (the pipeline's approximation, `data.detection_pipeline`). For COCO/LVIS polygons
    detectron2 instead uses `PolygonMasks.crop_and_resize`: the polygon, shifted to the RoI and
    scaled by M / (box side), rasterised by pycocotools straight onto the M x M grid. The two
    rules agree inside the shape and differ on its boundary: on circles, triangles and squares
    12-50 px across in jittered RoIs, M = 14 (tests/test_mask_head.py), 1.3% (circles) and
    2.0% (triangles, squares) of the target pixels differ, all within one target pixel of the
    polygon's edge. Foreground RoIs whose GT has no mask (`mask_valid` False) are left out
    of the mask loss.
    Fallback, explicit: with `gt_masks=None` (a batch without masks: a pipeline built without
    `mask_scale`) the targets are box-filled, `box_filled_mask_targets` (a target pixel is 1
    iff its centre lies inside the matched GT box), and the head learns rectangles. (In a
    pipeline with masks, records without them have `mask_valid` False: no mask loss.)
  - The deconvolution is written as an einsum with PyTorch `ConvTranspose2d(k=2, s=2)` semantics
    (2x2 windows do not overlap, so each output pixel sees one tap): `kernel[a, b, c, o]` =
    torch `weight[c, o, a, b]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from regionclip_jax.losses.common import logits_with_background
from regionclip_jax.losses.detection import (
    BBOX_REG_WEIGHTS,
    SCALE_CLAMP,
    box_regression_loss,
    fast_rcnn_classification_loss,
    mask_rcnn_loss,
)
from regionclip_jax.models.layers import Dtype, Frozen, linear
from regionclip_jax.models.region import RegionEncoder, box_mask
from regionclip_jax.models.resnet import MAP_AXES, ModifiedResNet
from regionclip_jax.models.vit import VisionTransformer
from regionclip_jax.ops.boxes import Box2BoxTransform, clip_boxes, pairwise_iou
from regionclip_jax.ops.matching import Matcher
from regionclip_jax.ops.roi_align import roi_align
from regionclip_jax.ops.sampling import subsample_labels
from regionclip_jax.parallel import shard_act

ROI_AXES = ("act_batch", None, None)
FEAT_AXES = ("act_batch", None, "act_embed")


class MaskHead(nnx.Module):
    """detectron2 `MaskRCNNConvUpsampleHead` with NUM_CONV 0, class-agnostic (spec §2.4).

    deconv: ConvTranspose 2x2 stride 2 (with bias) -> ReLU -> predictor: 1x1 conv to 1 channel.
    Init as detectron2: deconv MSRA fill (fan_out, ReLU), predictor N(0, 0.001), biases 0.
    """

    def __init__(
        self,
        in_channels: int,
        conv_dim: int = 256,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        # PyTorch's fan_out of a ConvTranspose weight [in, out, 2, 2] is in * 4.
        std = math.sqrt(2.0 / (in_channels * 4))
        kernel = std * jax.random.normal(rngs.params(), (2, 2, in_channels, conv_dim), param_dtype)
        self.deconv_kernel = nnx.Param(
            kernel, out_sharding=("kernel", "kernel", "conv_in", "conv_out")
        )
        self.deconv_bias = nnx.Param(
            jnp.zeros((conv_dim,), param_dtype), out_sharding=("conv_out",)
        )
        self.predictor = linear(
            conv_dim,
            1,
            axes=("conv_in", None),
            std=0.001,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: `[N, S, S, C]` res5 features -> `[N, 2S, 2S]` float32 mask logits."""
        n, h, w, _ = x.shape
        k = self.deconv_kernel[...].astype(self.dtype)
        # out[n, 2i + a, 2j + b, o] = sum_c x[n, i, j, c] k[a, b, c, o]
        y = jnp.einsum("nijc,abco->niajbo", x.astype(self.dtype), k)
        y = y.reshape(n, 2 * h, 2 * w, -1) + self.deconv_bias[...].astype(self.dtype)
        y = shard_act(jax.nn.relu(y), MAP_AXES)
        return self.predictor(y)[..., 0].astype(jnp.float32)


def box_filled_mask_targets(rois: jax.Array, gt_boxes: jax.Array, size: int) -> jax.Array:
    """Box-filled GT masks cropped to RoIs: 1 where an M x M bin centre lies inside the GT box.

    Args:
      rois: `[..., 4]` xyxy RoI boxes.
      gt_boxes: `[..., 4]` xyxy matched GT boxes.
      size: M.

    Returns:
      `[..., M, M]` float32 in {0, 1} (rows = y).
    """
    t = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    x1, y1, x2, y2 = (rois[..., i, None].astype(jnp.float32) for i in range(4))
    xs = x1 + t * (x2 - x1)
    ys = y1 + t * (y2 - y1)
    inx = (xs >= gt_boxes[..., 0, None]) & (xs <= gt_boxes[..., 2, None])
    iny = (ys >= gt_boxes[..., 1, None]) & (ys <= gt_boxes[..., 3, None])
    return (iny[..., :, None] & inx[..., None, :]).astype(jnp.float32)


def bitmap_mask_targets(
    masks: jax.Array, rois: jax.Array, size: int, spatial_scale: float = 1.0
) -> jax.Array:
    """detectron2 `BitMasks.crop_and_resize`: RoIAlign(M, scale, 0, aligned=True) >= 0.5.

    Args:
      masks: `[B, F, Hm, Wm]` the matched GT bitmap of every RoI (any numeric dtype), in the
        canvas frame scaled by `spatial_scale` (1.0: canvas resolution). This holds F full
        bitmaps per image: on large canvases pass masks at a reduced `spatial_scale`.
      rois: `[B, F, 4]` xyxy canvas pixels.
      size: M.
      spatial_scale: mask pixels per canvas pixel.

    Returns:
      `[B, F, M, M]` float32 in {0, 1}.
    """
    b, f, hm, wm = masks.shape
    pooled = roi_align(
        masks.reshape(b * f, hm, wm, 1).astype(jnp.float32),
        rois.reshape(b * f, 1, 4).astype(jnp.float32),
        (size, size),
        spatial_scale,
        0,
        True,
    )
    return (pooled.reshape(b, f, size, size) >= 0.5).astype(jnp.float32)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Per-image gather: x `[B, N, ...]`, idx `[B, S]` -> `[B, S, ...]`."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class OVDFastRCNN(RegionEncoder):
    """RegionCLIP's detector head over a CLIP image tower.

    Attributes:
      visual: the CLIP image tower (`ModifiedResNet`; a `VisionTransformer` works for the box
        head, as RegionCLIP's zero-shot branch, but has no mask head and no frozen stages).
      train_embeddings: `Frozen` float32 `[K_train, D]`.
      test_embeddings: `Frozen` float32 `[K_test, D]`.
      bbox_pred: Linear(D, 4), N(0, 0.001) kernel, zero bias, on the un-normalised feature.
      mask_head: `MaskHead` or None.
      temperature: τ (CLSS_TEMP 0.01).
    """

    def __init__(
        self,
        visual: ModifiedResNet | VisionTransformer,
        *,
        num_train_classes: int,
        num_test_classes: int,
        temperature: float = 0.01,
        pooler_resolution: int | None = None,
        box_chunk: int | None = None,
        mask_head: bool = False,
        mask_conv_dim: int = 256,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(visual, pooler_resolution=pooler_resolution, box_chunk=box_chunk)
        d = visual.output_dim
        self.num_train_classes = int(num_train_classes)
        self.num_test_classes = int(num_test_classes)
        self.temperature = float(temperature)
        self.train_embeddings = Frozen(jnp.zeros((num_train_classes, d), jnp.float32))
        self.test_embeddings = Frozen(jnp.zeros((num_test_classes, d), jnp.float32))
        self.bbox_pred = linear(
            d,
            4,
            axes=("proj", None),
            std=0.001,
            dtype=visual.dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if mask_head:
            if not self.is_resnet:
                raise ValueError("the mask head needs a ModifiedResNet (res5 feature maps)")
            self.mask_head = MaskHead(
                visual.width * 32,
                mask_conv_dim,
                dtype=visual.dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.mask_head = None

    # ------------------------------------------------------------------------------- features

    def frozen_trunk(self, images: jax.Array, freeze_at: int) -> jax.Array:
        """`feature_map` with no gradient into stages below `freeze_at` (detectron2 FREEZE_AT).

        freeze_at = 2 (RegionCLIP): stem and layer1 get no gradient (and no backward pass).
        The optimizer must still exclude their parameters (weight decay would move them).

        Args:
          images: `[B, Hc, Wc, 3]` CLIP-normalised.

        Returns:
          `[B, Hc/16, Wc/16, C]` res4 (a ViT's patch grid, with no freezing).
        """
        if not self.is_resnet:
            return self.feature_map(images)
        return self.visual.trunk(images, freeze_at)

    def _pool_with_res5(
        self, feature_map: jax.Array, boxes: jax.Array, num_mask: int
    ) -> tuple[jax.Array, jax.Array]:
        """`pool`, also returning the res5 maps of the first `num_mask` RoIs of each image.

        The mask head reads the same res5 maps as the box head (detectron2 `Res5ROIHeads`), so
        they are kept rather than recomputed. `box_chunk` is not applied on this path.

        Returns:
          (`[B, R, D]` embeddings, `[B * num_mask, S, S, C]` res5 features).
        """
        b, r = boxes.shape[:2]
        p = self.pooler_resolution
        crops = roi_align(
            feature_map, boxes.astype(jnp.float32), (p, p), 1.0 / self.stride, 0, True
        ).reshape(b * r, p, p, feature_map.shape[-1])
        crops = shard_act(crops.astype(feature_map.dtype), MAP_AXES)
        res5 = self.visual.res5(crops)
        feats = self.visual.attnpool(res5).reshape(b, r, -1)
        res5 = res5.reshape((b, r) + res5.shape[1:])[:, :num_mask]
        return feats, res5.reshape((b * num_mask,) + res5.shape[2:])

    def class_logits(self, feats: jax.Array, embeddings: jax.Array) -> jax.Array:
        """feats `[..., D]`, embeddings `[K, D]` -> float32 `[..., K + 1]`, background last."""
        return logits_with_background(feats, embeddings, self.temperature)

    # ------------------------------------------------------------------------------- training

    def label_and_sample(
        self,
        proposals: jax.Array,
        proposal_valid: jax.Array,
        gt_boxes: jax.Array,
        gt_labels: jax.Array,
        gt_mask: jax.Array,
        key: jax.Array,
        *,
        rois_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
    ) -> dict[str, jax.Array]:
        """detectron2 `label_and_sample_proposals` with static shapes (module docstring).

        Args:
          proposals: `[B, P, 4]` xyxy; proposal_valid: bool `[B, P]`.
          gt_boxes: `[B, G, 4]` xyxy; gt_labels: int `[B, G]` in 0..K-1, -1 padding;
          gt_mask: bool `[B, G]`.
          key: PRNG key of the sampling.

        Returns:
          dict of `[B, S]`-leading arrays (S = rois_per_image): `boxes [B, S, 4]`,
          `labels` (0..K-1 fg, K bg, -1 padding), `gt_boxes [B, S, 4]` (matched GT, fg only
          meaningful), `gt_index` (matched GT slot), `valid`, `is_fg`.
        """
        k = self.num_train_classes
        b = proposals.shape[0]
        gt_boxes = gt_boxes.astype(jnp.float32)
        gt_ok = box_mask(gt_boxes, gt_mask.astype(bool) & (gt_labels >= 0))
        cand = jnp.concatenate([proposals.astype(jnp.float32), gt_boxes], axis=1)
        cand_ok = jnp.concatenate([box_mask(proposals, proposal_valid.astype(bool)), gt_ok], 1)
        iou = pairwise_iou(gt_boxes, cand)  # [B, G, P + G]
        matcher = Matcher((iou_threshold,), (0, 1), allow_low_quality_matches=False)
        matches, match_labels = jax.vmap(matcher)(iou, gt_ok)
        cls = jnp.take_along_axis(gt_labels.astype(jnp.int32), matches, axis=1)
        labels = jnp.where(match_labels == 1, cls, k)
        labels = jnp.where(cand_ok, labels, -1)
        idx, is_fg, valid = jax.vmap(
            lambda lab, kk, ok: subsample_labels(
                lab, rois_per_image, positive_fraction, k, kk, valid=ok
            )
        )(labels, jax.random.split(key, b), cand_ok)
        safe = jnp.maximum(idx, 0)
        gt_index = _take(matches, safe)
        return dict(
            boxes=shard_act(_take(cand, safe), ROI_AXES),
            labels=jnp.where(valid, _take(labels, safe), -1),
            gt_boxes=_take(gt_boxes, gt_index),
            gt_index=gt_index,
            valid=valid,
            is_fg=is_fg & valid,
        )

    def training_losses(
        self,
        images: jax.Array,
        image_hw: jax.Array,
        proposals: jax.Array,
        proposal_valid: jax.Array,
        gt_boxes: jax.Array,
        gt_labels: jax.Array,
        gt_mask: jax.Array,
        key: jax.Array,
        *,
        mode: str = "coco",
        rois_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        bg_weight: float | None = None,
        focal_gamma: float | None = None,
        freeze_at: int = 2,
        gt_masks: jax.Array | None = None,
        mask_valid: jax.Array | None = None,
        mask_scale: float = 1.0,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Fast R-CNN losses of one batch (spec §5.2-§5.4; loss weights 1).

        Args:
          images: `[B, Hc, Wc, 3]` CLIP-normalised canvases.
          image_hw: `[B, 2]` true (h, w) (unused by the losses; kept for a uniform signature).
          proposals: `[B, P, 4]` xyxy proposals (offline RPN); proposal_valid: bool `[B, P]`.
          gt_boxes: `[B, G, 4]` xyxy; gt_labels: int `[B, G]` train class 0..K-1, -1 padding;
          gt_mask: bool `[B, G]`.
          key: PRNG key (RoI sampling).
          mode: "coco" (focal-scaled CE, γ 0.5, bg 0.2, plain mean) or "lvis" (weighted CE,
            bg 0.8); see `losses.detection.fast_rcnn_classification_loss`.
          rois_per_image, positive_fraction, iou_threshold: detectron2's 512, 0.25, 0.5.
          bg_weight, focal_gamma: overrides of the mode's defaults (None: default).
          freeze_at: stages without gradient (2: stem + layer1).
          gt_masks: optional `[B, G, Hm, Wm]` GT bitmaps, values {0, 1} (any numeric dtype),
            aligned with `gt_boxes`, at `mask_scale` of the canvas (mask head only). None: the
            documented box-filled fallback (module docstring).
          mask_valid: optional bool `[B, G]`: False for instances without a mask (their
            foreground RoIs get no mask loss). None: every GT with `gt_masks` has one.
          mask_scale: mask pixels per canvas pixel of `gt_masks`.

        Returns:
          (scalar float32 loss, metrics dict of scalars: loss_cls, loss_box_reg, [loss_mask],
          cls_accuracy, fg_cls_accuracy, false_negative, num_fg_samples, num_bg_samples (per
          image), fg_fraction).
        """
        del image_hw
        s = self.label_and_sample(
            proposals,
            proposal_valid,
            gt_boxes,
            gt_labels,
            gt_mask,
            key,
            rois_per_image=rois_per_image,
            positive_fraction=positive_fraction,
            iou_threshold=iou_threshold,
        )
        fmap = self.frozen_trunk(images, freeze_at)
        b = images.shape[0]
        # subsample_labels puts the foreground first: only these slots can need a mask.
        num_mask = min(int(rois_per_image * positive_fraction), rois_per_image)
        if self.mask_head is not None and num_mask > 0:
            feats, res5 = self._pool_with_res5(fmap, s["boxes"], num_mask)
        else:
            feats, res5 = self.pool(fmap, s["boxes"]), None
        feats = shard_act(feats, FEAT_AXES)

        logits = self.class_logits(feats, self.train_embeddings[...])
        labels, valid, is_fg = s["labels"], s["valid"], s["is_fg"]
        loss_cls = fast_rcnn_classification_loss(
            logits, labels, valid, mode=mode, bg_weight=bg_weight, focal_gamma=focal_gamma
        )
        deltas = self.bbox_pred(feats).astype(jnp.float32)
        loss_box = box_regression_loss(
            deltas, s["boxes"], s["gt_boxes"], labels, valid, num_classes=self.num_train_classes
        )
        loss = loss_cls + loss_box
        metrics = {"loss_cls": loss_cls, "loss_box_reg": loss_box}

        if res5 is not None:
            loss_mask = self._mask_loss(res5, s, gt_masks, mask_valid, mask_scale, b, num_mask)
            loss = loss + loss_mask
            metrics["loss_mask"] = loss_mask

        validf, fgf = valid.astype(jnp.float32), is_fg.astype(jnp.float32)
        pred = jnp.argmax(logits, axis=-1)
        n_valid, n_fg = jnp.sum(validf), jnp.sum(fgf)
        bg_pred = pred == self.num_train_classes
        metrics.update(
            cls_accuracy=jnp.sum(validf * (pred == labels)) / jnp.maximum(n_valid, 1.0),
            fg_cls_accuracy=jnp.sum(fgf * (pred == labels)) / jnp.maximum(n_fg, 1.0),
            false_negative=jnp.sum(fgf * bg_pred) / jnp.maximum(n_fg, 1.0),
            num_fg_samples=n_fg / b,
            num_bg_samples=(n_valid - n_fg) / b,
            fg_fraction=n_fg / jnp.maximum(n_valid, 1.0),
        )
        return loss, metrics

    def _mask_loss(self, res5, s, gt_masks, mask_valid, mask_scale, b, num_mask) -> jax.Array:
        """detectron2 `mask_rcnn_loss` (class-agnostic BCE, mean over the pixels of the fg RoIs)
        against the module docstring's targets (bitmaps, or the box-filled fallback)."""
        logits = self.mask_head(res5)
        m = logits.shape[-1]
        logits = logits.reshape(b, num_mask, m, m)
        rois = s["boxes"][:, :num_mask]
        gt_index = s["gt_index"][:, :num_mask]
        fg = s["is_fg"][:, :num_mask]
        if gt_masks is None:  # the box-filled fallback
            targets = box_filled_mask_targets(rois, s["gt_boxes"][:, :num_mask], m)
        else:
            targets = bitmap_mask_targets(_take(gt_masks, gt_index), rois, m, mask_scale)
            if mask_valid is not None:
                fg = fg & _take(mask_valid.astype(bool), gt_index)
        return mask_rcnn_loss(logits, jax.lax.stop_gradient(targets), fg)

    # ------------------------------------------------------------------------------ inference

    def predict(
        self,
        images: jax.Array,
        image_hw: jax.Array,
        proposals: jax.Array,
        proposal_valid: jax.Array,
        *,
        embeddings: jax.Array | None = None,
        apply_deltas: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Class probabilities and boxes of every proposal (spec §6.1 steps 2-3).

        Args:
          images: `[B, Hc, Wc, 3]` CLIP-normalised canvases.
          image_hw: `[B, 2]` true (h, w): boxes are clipped to it.
          proposals: `[B, P, 4]` xyxy; proposal_valid: bool `[B, P]`.
          embeddings: `[K, D]` class embeddings (default: `test_embeddings`).
          apply_deltas: decode the class-agnostic deltas (Box2BoxTransform (10, 10, 5, 5),
            dw/dh clamped at log(1000/16)); False returns the proposals (the original's
            NO_BOX_DELTA: zero-shot and GT-box modes).

        Returns:
          probs: float32 `[B, P, K + 1]` softmax, background last; 0 on invalid rows.
          boxes: float32 `[B, P, 4]` clipped to `image_hw`; 0 on invalid rows.
        """
        ok = box_mask(proposals, proposal_valid.astype(bool))
        props = jnp.where(ok[..., None], proposals.astype(jnp.float32), 0.0)
        feats = shard_act(self(images, props), FEAT_AXES)
        emb = self.test_embeddings[...] if embeddings is None else embeddings
        probs = jax.nn.softmax(self.class_logits(feats, emb), axis=-1)
        if apply_deltas:
            deltas = self.bbox_pred(feats).astype(jnp.float32)
            boxes = Box2BoxTransform(BBOX_REG_WEIGHTS, SCALE_CLAMP).apply_deltas(deltas, props)
        else:
            boxes = props
        boxes = clip_boxes(boxes, image_hw)
        return jnp.where(ok[..., None], probs, 0.0), jnp.where(ok[..., None], boxes, 0.0)
