"""grain pipeline for detection training: shards -> fixed-shape NumPy batches with GT boxes.

Per example (detectron2's default detection training augmentation, as RegionCLIP's fine-tuning
configs use it): decode -> multi-scale resize (the shorter side is one of `train_sizes`, chosen
uniformly per example from the pipeline seed - detectron2 `ResizeShortestEdge(sample_style=
"choice")` - the longer side capped at `max_size`; PIL bicubic as in `transforms`) -> random
horizontal flip (boxes mirrored) -> zero padding to the static canvas -> GT boxes (crowd boxes and
boxes of categories outside `category_map` dropped; the first `max_boxes` kept) scaled, flipped
and padded to `max_boxes` slots. Normalisation (CLIP mean/std) runs once per batch.

Batches (NumPy dict; B = batch_size, (Hc, Wc) = canvas, R = max_boxes):
  images        float32[B, Hc, Wc, 3] CLIP-normalised RGB, 0 outside [:h, :w]
                (uint8 when normalize=False)
  image_hw      int32[B, 2]    (h, w) of the resized image in the canvas
  orig_hw       int32[B, 2]    size of the stored image
  scale         float32[B, 2]  (h / height, w / width)
  flipped       bool[B]
  source_index  int32[B]       record index in the source
  boxes         float32[B, R, 4] xyxy canvas pixels, 0 in padding
  box_mask      bool[B, R]
  labels        int32[B, R]    category_map[category id] (or the id itself), -1 in padding
with `mask_scale=s` (None: these keys are absent), (Hm, Wm) = (ceil(Hc * s), ceil(Wc * s)):
  gt_masks      uint8[B, R, Hm, Wm] instance masks (0/1) in the mask canvas: slot k is the mask
                of `boxes[:, k]`, so box b (canvas pixels) covers b * s there (within a pixel);
                0 outside the resized image, in padded slots and where `mask_valid` is False
  mask_valid    bool[B, R]     the slot holds a real box with a mask (False: padding, records
                without `masks`, instances without a mask: the mask loss ignores them)

Masks follow the image: the stored RLE is decoded at the stored image's size, then sampled at the
mask canvas' pixel centres through the same resize and flip as the image (nearest neighbour:
`transforms.mask_sample_indices`). Approximation, to bound memory: detectron2 keeps full-
resolution bitmasks (or polygons) and crops them per RoI; here they are kept at `mask_scale` of
the canvas (R x Hm x Wm bytes per example, 11 MB at R = 100, 1344^2 and s = 0.25), so mask
targets cropped from them lose detail below 1 / s canvas pixels.

Sampling (one global stream of examples, the same for every process count):
  - plain: all records, shuffled each epoch (as the pretraining pipeline).
  - repeat-factor sampling (`repeat_threshold=t`, LVIS uses 0.001; detectron2
    `RepeatFactorTrainingSampler`): f(c) = fraction of images containing category c,
    r(c) = max(1, sqrt(t / f(c))), r(I) = max over the categories of image I (1 for an image with
    none). Each epoch e, image I appears floor(r(I)) times plus once more with probability
    frac(r(I)) (stochastic rounding with a generator seeded by (seed, e)); the epoch's list is
    shuffled with the same generator. The categories counted are those that survive
    `category_map` (crowd boxes included, as detectron2 counts all annotations).
  - per-process sharding (`pipeline.GlobalBatchSlice`, as pretraining): every process walks the
    same global stream and keeps its block of every global batch of `shard_count * batch_size`
    examples. The per-example size and flip are drawn from (seed, position in the global stream),
    so the global batches - records, order, scale and flip - are the same for any number of
    processes, and a checkpoint's data position maps exactly onto another process count.
  - all random choices come from `seed` (grain `MapDataset.seed` for the per-example size and
    flip; (seed, epoch) for repeat factors): two runs give identical batches, and
    `it.get_state()` / `it.set_state()` resume exactly, also with worker processes (keep
    `num_workers` fixed; grain batches inside each worker).

Records with no box left are kept (all-False mask): filter them when converting
(`convert_detection(empty_images="skip")`) if training should not see them, as detectron2's
FILTER_EMPTY_ANNOTATIONS does. A record that fails to read or decode is skipped with a warning.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from pycocotools import mask as mask_util

from regionclip_jax.data import transforms as T
from regionclip_jax.data.pipeline import GlobalBatchSlice, ShardSource, batch_and_prefetch
from regionclip_jax.data.schema import RecordError, decode_record
from regionclip_jax.data.shards import ShardSet, open_shards

log = logging.getLogger(__name__)

# detectron2's COCO default: ResizeShortestEdge((640, 672, 704, 736, 768, 800), 1333, "choice").
DEFAULT_TRAIN_SIZES = (640, 672, 704, 736, 768, 800)


# ---------------------------------------------------------------------------------------------
# Repeat-factor sampling.


def repeat_factors(category_sets: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """Per-image repeat factors r(I) (float64[N]); see the module docstring for the formula."""
    n = len(category_sets)
    if n == 0:
        return np.zeros((0,), np.float64)
    freq: dict[int, int] = {}
    for cats in category_sets:
        for c in set(int(c) for c in cats):
            freq[c] = freq.get(c, 0) + 1
    r_cat = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in freq.items()}
    return np.array(
        [max((r_cat[int(c)] for c in cats), default=1.0) for cats in category_sets], np.float64
    )


def repeat_factor_epoch(factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The shuffled image indices of one epoch (int64[M]) under stochastic rounding."""
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    whole = np.floor(factors)
    reps = whole.astype(np.int64) + (rng.random(len(factors)) < factors - whole)
    indices = np.repeat(np.arange(len(factors), dtype=np.int64), reps)
    return indices[rng.permutation(len(indices))]


class RepeatFactorSampler:
    """Random-access source of record indices: epoch after epoch of `repeat_factor_epoch`.

    `sampler[k]` is the k-th record index of the stream (with `shard_count > 1`, this process's
    share `[shard_index::shard_count]` of each epoch; the training pipeline reads the whole
    stream and splits it by global batch instead). Epoch lists are computed on demand and cached
    (each worker process computes the ones it needs; they depend only on (seed, epoch)).
    Picklable.
    """

    def __init__(
        self,
        factors: np.ndarray,
        *,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
        num_epochs: int | None = None,
    ):
        self.factors = np.asarray(factors, np.float64)
        self.seed = int(seed)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.num_epochs = num_epochs
        self._starts = [0]  # start offset of each computed epoch in this process's stream
        self._cache: dict[int, np.ndarray] = {}
        # grain reads with several threads: the cache and offsets are shared state.
        self._lock = threading.Lock()

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            full = repeat_factor_epoch(self.factors, self.seed, e)
            self._cache[e] = full[self.shard_index :: self.shard_count]
        return self._cache[e]

    def __len__(self) -> int:
        if self.num_epochs is None:
            return sys.maxsize
        with self._lock:
            while len(self._starts) <= self.num_epochs:
                self._extend()
            return self._starts[self.num_epochs]

    def _extend(self) -> None:
        e = len(self._starts) - 1
        self._starts.append(self._starts[-1] + len(self.epoch(e)))

    def __getitem__(self, k: int) -> int:
        k = int(k)
        if k < 0:
            raise IndexError(k)
        with self._lock:
            while self._starts[-1] <= k:
                if self.num_epochs is not None and len(self._starts) > self.num_epochs:
                    raise IndexError(k)
                self._extend()
            e = int(np.searchsorted(self._starts, k, side="right")) - 1
            return int(self.epoch(e)[k - self._starts[e]])

    def __getstate__(self):
        state = dict(self.__dict__, _cache={}, _starts=[0])
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _Indexed:
    """Source of `(record index, bytes)` following a sampler over a record source."""

    def __init__(self, sampler: RepeatFactorSampler, records):
        self.sampler, self.records = sampler, records

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, k: int):
        return self.records[self.sampler[k]]


def _category_ids_fast(data: bytes) -> np.ndarray | None:
    """category_ids of an encoded record without copying its image (msgpack streaming)."""
    up = msgpack.Unpacker(io.BytesIO(data), raw=False)
    for _ in range(up.read_map_header()):
        key = up.unpack()
        if key == "category_ids":
            m = up.unpack()
            return None if m is None else np.frombuffer(m["data"], np.dtype(m["dtype"]))
        up.skip()
    return None


def record_category_sets(
    records, category_map: Mapping[int, int] | None = None
) -> list[np.ndarray]:
    """Per record: its category ids (those in `category_map` when given). Reads every record."""
    keep = None if category_map is None else np.array(sorted(int(k) for k in category_map))
    out = []
    for i in range(len(records)):
        _, data = records[i]
        cats = None if data is None else _category_ids_fast(data)
        cats = np.zeros((0,), np.int64) if cats is None else cats.astype(np.int64)
        if keep is not None:
            cats = cats[np.isin(cats, keep)]
        out.append(cats)
    return out


# ---------------------------------------------------------------------------------------------
# Per-example transform.


class DetectionTransform(grain.transforms.RandomMap):
    """(index, record bytes) -> example dict with a uint8 canvas, or None (skipped, logged)."""

    def __init__(
        self,
        *,
        canvas: tuple[int, int],
        train_sizes: Sequence[int],
        max_size: int | None,
        flip: bool,
        max_boxes: int,
        category_map: Mapping[int, int] | None,
        mask_scale: float | None = None,
    ):
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.mask_scale = None if mask_scale is None else float(mask_scale)
        self.train_sizes = tuple(int(s) for s in train_sizes)
        self.max_size = None if max_size is None else int(max_size)
        self.flip = flip
        self.max_boxes = int(max_boxes)
        self.category_map = (
            None if category_map is None else {int(k): int(v) for k, v in category_map.items()}
        )

    def random_map(self, element, rng: np.random.Generator):
        index, data = element
        if data is None:
            return None
        # Draws first and in a fixed order: they do not depend on the record's content.
        size = self.train_sizes[int(rng.integers(len(self.train_sizes)))]
        do_flip = self.flip and rng.random() < 0.5
        try:
            rec = decode_record(data, where=f"record {index}")
            image = T.decode_image(rec["image"])
        except (RecordError, OSError, ValueError, SyntaxError) as e:
            log.warning("skipping record %d: %s", index, e)
            return None
        height, width = image.shape[:2]
        new_h, new_w = T.resized_size(height, width, size, self.max_size)
        new_h, new_w = T.fit_to_canvas(height, width, new_h, new_w, self.canvas)
        image = T.resize_image(image, new_h, new_w)
        if do_flip:
            image = image[:, ::-1]
        r = self.max_boxes
        if rec["boxes"] is None:
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
        else:
            keep = ~rec["iscrowd"]
            labels = rec["category_ids"].astype(np.int32)
            if self.category_map is not None:
                keep &= np.isin(labels, list(self.category_map))
                labels = np.array([self.category_map.get(int(c), -1) for c in labels], np.int32)
            boxes, labels = rec["boxes"][keep][:r], labels[keep][:r]
        boxes = T.scale_boxes(boxes, new_h / height, new_w / width)
        if do_flip:
            boxes = T.hflip_boxes(boxes, new_w)
        mask = np.zeros((r,), bool)
        mask[: len(boxes)] = True
        out = {
            "image": T.pad_image(image, self.canvas),
            "image_hw": np.array([new_h, new_w], np.int32),
            "orig_hw": np.array([height, width], np.int32),
            "scale": np.array([new_h / height, new_w / width], np.float32),
            "flipped": np.bool_(do_flip),
            "source_index": np.int32(index),
            "boxes": T.pad_rows(boxes.astype(np.float32), r, 0.0),
            "box_mask": mask,
            "labels": T.pad_rows(labels.astype(np.int32), r, -1),
        }
        if self.mask_scale is not None:
            # Record indices of the kept boxes, in slot order (the masks to take).
            kept = [] if rec["boxes"] is None else np.flatnonzero(keep)[:r]
            out["gt_masks"], out["mask_valid"] = self._instance_masks(
                rec["masks"], kept, (height, width), (new_h, new_w), do_flip
            )
        return out

    def _instance_masks(
        self,
        masks: Sequence[Mapping[str, Any] | None] | None,
        kept: Sequence[int],
        image_hw: tuple[int, int],
        new_hw: tuple[int, int],
        flip: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(gt_masks uint8[R, Hm, Wm], mask_valid bool[R]) of the record's `masks` (RLEs at the
        stored `image_hw`) taken at the record indices `kept`, in slot order; the image was
        resized to `new_hw` and maybe flipped (module docstring)."""
        hm, wm = T.mask_shape(self.canvas, self.mask_scale)
        out = np.zeros((self.max_boxes, hm, wm), np.uint8)
        valid = np.zeros((self.max_boxes,), bool)
        if masks is None:
            return out, valid
        height, width = image_hw
        rows, cols = T.mask_sample_indices(height, width, *new_hw, self.mask_scale, (hm, wm), flip)
        for slot, i in enumerate(kept):
            rle = masks[int(i)]
            # The writer stores masks in the image's frame; a foreign record breaking that
            # loses the mask (mask_valid False), not the example.
            if rle is None or list(rle["size"]) != [height, width]:
                continue
            full = mask_util.decode(rle)
            out[slot, : len(rows), : len(cols)] = full[np.ix_(rows, cols)]
            valid[slot] = True
        return out, valid


def make_detection_dataset(
    paths: ShardSet | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    source: Any = None,
    batch_size: int,
    canvas: tuple[int, int] = (1344, 1344),
    train_sizes: Sequence[int] = DEFAULT_TRAIN_SIZES,
    max_size: int | None = 1333,
    max_boxes: int = 100,
    category_map: Mapping[int, int] | None = None,
    repeat_threshold: float | None = None,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 0,
    flip: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    normalize: bool = True,
    read_threads: int = 2,
    prefetch_buffer: int | None = None,
    on_bad_shard: str = "error",
    mask_scale: float | None = None,
) -> grain.IterDataset:
    """Builds the detection training pipeline (batch layout in the module docstring).

    Args:
      paths: shard directories / manifests / files / globs, or a ShardSet.
      source: instead of `paths`, any random-access source whose `[i]` is `(i, record bytes)`
        (e.g. `tfds_shapesworld.TfdsDetectionSource`).
      batch_size: examples per batch on this process.
      canvas: static (Hc, Wc); the default holds every 800/1333 resize.
      train_sizes: shorter-side sizes, one chosen per example; max_size caps the longer side.
      max_boxes: GT slots R.
      category_map: category id -> label; boxes of other ids are dropped (None: ids as labels).
      repeat_threshold: None (plain sampling) or t of repeat-factor sampling (LVIS: 0.001).
      seed, shard_index, shard_count, num_workers, flip, shuffle, num_epochs, drop_remainder,
      normalize, read_threads, prefetch_buffer, on_bad_shard: as `make_pretrain_dataset`
        (`shuffle` does not apply with repeat factors, whose epochs are always shuffled).
      mask_scale: None (no instance masks: the batches carry no mask keys) or s in (0, 1]: add
        `gt_masks` [B, R, ceil(Hc * s), ceil(Wc * s)] and `mask_valid` [B, R] (module docstring).

    Returns:
      A `grain.IterDataset` of batches.
    """
    if (paths is None) == (source is None):
        raise ValueError("pass exactly one of paths and source")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size < 1 or max_boxes < 1 or not train_sizes:
        raise ValueError("batch_size and max_boxes must be >= 1 and train_sizes non-empty")
    if mask_scale is not None and not 0 < mask_scale <= 1:
        raise ValueError(f"mask_scale must be None or in (0, 1], got {mask_scale}")
    if source is None:
        shards = (
            paths if isinstance(paths, ShardSet) else open_shards(paths, on_bad_shard=on_bad_shard)
        )
        source = ShardSource(shards)
    if len(source) < shard_count:
        raise ValueError(f"{len(source)} records cannot be split over {shard_count} processes")

    if repeat_threshold is None:
        ds = grain.MapDataset.source(source).seed(seed)
        if shuffle:
            ds = ds.shuffle()
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
    else:
        factors = repeat_factors(record_category_sets(source, category_map), repeat_threshold)
        sampler = RepeatFactorSampler(factors, seed=seed, num_epochs=num_epochs)
        ds = grain.MapDataset.source(_Indexed(sampler, source)).seed(seed)
    ds = ds.random_map(
        DetectionTransform(
            canvas=canvas,
            train_sizes=train_sizes,
            max_size=max_size,
            flip=flip,
            max_boxes=max_boxes,
            category_map=category_map,
            mask_scale=mask_scale,
        )
    )
    if shard_count > 1:  # after random_map: the random draws follow the global position
        ds = GlobalBatchSlice(ds, batch_size, shard_index, shard_count)
    return batch_and_prefetch(
        ds,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        normalize=normalize,
        num_workers=num_workers,
        read_threads=read_threads,
        prefetch_buffer=prefetch_buffer,
    )


def detection_batch_spec(
    *,
    batch_size: int,
    canvas: tuple[int, int] = (1344, 1344),
    max_boxes: int = 100,
    normalize: bool = True,
    mask_scale: float | None = None,
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the batches `make_detection_dataset` yields."""
    b, (hc, wc), r = batch_size, canvas, max_boxes
    spec = {
        "images": ((b, hc, wc, 3), np.dtype(np.float32 if normalize else np.uint8)),
        "image_hw": ((b, 2), np.dtype(np.int32)),
        "orig_hw": ((b, 2), np.dtype(np.int32)),
        "scale": ((b, 2), np.dtype(np.float32)),
        "flipped": ((b,), np.dtype(bool)),
        "source_index": ((b,), np.dtype(np.int32)),
        "boxes": ((b, r, 4), np.dtype(np.float32)),
        "box_mask": ((b, r), np.dtype(bool)),
        "labels": ((b, r), np.dtype(np.int32)),
    }
    if mask_scale is not None:
        hm, wm = T.mask_shape(canvas, mask_scale)
        spec["gt_masks"] = ((b, r, hm, wm), np.dtype(np.uint8))
        spec["mask_valid"] = ((b, r), np.dtype(bool))
    return spec
