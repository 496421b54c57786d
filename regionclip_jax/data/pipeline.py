"""grain pipeline for region-text pretraining: shards -> fixed-shape NumPy batches.

Per example (in this order, as RegionCLIP's pretraining loader does, spec §4.1):
  decode -> resize (shorter side `min_size`, longer <= `max_size`, bicubic) -> random horizontal
  flip (boxes too) -> CLIP normalisation -> zero-pad bottom/right to the static canvas -> pick one
  caption uniformly at random and tokenize it -> boxes (GT or offline proposals) scaled, flipped
  and padded to `max_boxes` slots with a mask.
Normalisation runs once per batch on the stacked uint8 canvases (`transforms.normalize_padded`),
which gives the same numbers as normalising before padding while prefetch buffers hold 1-byte
pixels.

Batches (NumPy dict, fixed shapes; B = batch_size, (Hc, Wc) = canvas, R = max_boxes):
  images        float32[B, Hc, Wc, 3]  CLIP-normalised RGB, 0 outside [:h, :w]
                (uint8 pixel values when normalize=False, for normalising on the device)
  tokens        int32[B, context_length]  CLIP BPE ids of the chosen caption
  image_hw      int32[B, 2]   (h, w) of the resized image inside the canvas
  orig_hw       int32[B, 2]   (height, width) of the stored image
  scale         float32[B, 2] (h / height, w / width): stored-image pixels -> canvas pixels
  flipped       bool[B]
  source_index  int32[B]      index of the record in the concatenated shards (`open_shards` order)
  with boxes="gt":        boxes float32[B, R, 4] xyxy canvas pixels, box_mask bool[B, R],
                          labels int32[B, R] (-1 padding)
  with boxes="proposals": boxes, box_mask, objectness float32[B, R] (-inf padding)

Sampling and determinism:
  - per-process sharding (`GlobalBatchSlice`): every process walks the same shuffled order and
    takes its block of every *global* batch (process p of P holds rows [p*b, (p+1)*b) of each
    global batch of P*b examples, the rows its devices hold; see parallel.process_batch_block).
    The global batches, and so the losses, are the same for any number of processes, which is
    what lets a run resume on a different process count. Each process reads only its own rows.
    The one exception: a record that is skipped (unreadable) shifts the later rows of the
    process that met it.
  - the order and every random choice (flip, caption, proposal subset) come from `seed` through
    grain (`MapDataset.seed`): two runs with one seed give identical batches.
  - `num_workers > 0` prefetches in that many processes. grain gives each worker a slice of the
    examples and batches inside the worker, so the batch sequence depends on `num_workers`
    (deterministic for a fixed value). Keep it fixed when resuming.
  - `it = iter(ds)`; `it.get_state()` / `it.set_state(state)` restore the position exactly
    (save it with the model checkpoint: `grain.checkpoint.CheckpointSave(it)` under Orbax).

Static shapes force two approximations, documented here and in docs/shapesworld.md:
  - a single canvas: images whose resized size does not fit (only when the canvas is smaller
    than max_size on a side) are shrunk further to fit (`transforms.fit_to_canvas`);
  - GT boxes beyond `max_boxes` are dropped (the first `max_boxes` are kept); proposals beyond
    `max_boxes` are subsampled uniformly at random (RegionCLIP samples 100 of 300 proposals the
    same way). Crowd GT boxes and GT boxes whose category is not in `category_map` are dropped.

Bad data: bad shard files are handled when the shards are opened (shards.open_shards,
`on_bad_shard`); a record that later fails to read or decode, or has no caption, is skipped with
a logged warning naming it (the batch is filled with the next records, so shapes never change).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from regionclip_jax.data import transforms as T
from regionclip_jax.data.schema import RecordError, decode_record
from regionclip_jax.data.shards import ShardSet, open_shards
from regionclip_jax.text.tokenizer import tokenize

log = logging.getLogger(__name__)

BOX_SOURCES = ("gt", "proposals")


class ShardSource:
    """grain random-access source over the raw records of a `ShardSet`.

    `source[i]` is `(i, bytes)`, or `(i, None)` when the record cannot be read (logged); the
    index travels with the record so batches can say which record they hold. Picklable.
    """

    def __init__(self, shards: ShardSet):
        self.shards = shards
        self._source = grain.sources.ArrayRecordDataSource(list(shards.paths))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[int, bytes | None]:
        index = int(index)
        try:
            return index, self._source[index]
        except RuntimeError as e:  # array_record reports damaged chunks as RuntimeError
            log.warning("skipping record %d: unreadable (%s)", index, e)
            return index, None

    def __repr__(self) -> str:
        return f"ShardSource({len(self.shards.paths)} files, {len(self)} records)"


class PretrainTransform(grain.transforms.RandomMap):
    """(index, record bytes) -> one example dict (uint8 canvas, see the module docstring), or
    None for a record that must be skipped. The rng comes from grain (seed, position)."""

    def __init__(
        self,
        *,
        canvas: tuple[int, int],
        min_size: int,
        max_size: int | None,
        flip: bool,
        boxes: str | None,
        max_boxes: int,
        context_length: int,
        truncate: str,
        category_map: Mapping[int, int] | None,
    ):
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.min_size = int(min_size)
        self.max_size = None if max_size is None else int(max_size)
        self.flip = flip
        self.boxes = boxes
        self.max_boxes = int(max_boxes)
        self.context_length = int(context_length)
        self.truncate = truncate
        self.category_map = (
            None if category_map is None else {int(k): int(v) for k, v in category_map.items()}
        )

    def random_map(self, element: tuple[int, bytes | None], rng: np.random.Generator):
        index, data = element
        if data is None:
            return None
        # Random draws first, in a fixed order, so they do not depend on the record's content.
        do_flip = self.flip and rng.random() < 0.5
        caption_u = rng.random()
        subset_key = rng.integers(2**63 - 1)
        try:
            rec = decode_record(data, where=f"record {index}")
            image = T.decode_image(rec["image"])
        except (RecordError, OSError, ValueError, SyntaxError) as e:
            log.warning("skipping record %d: %s", index, e)
            return None
        captions = rec["captions"]
        if not captions:
            log.warning("skipping record %d (%s): no caption", index, rec["id"])
            return None
        height, width = image.shape[:2]
        new_h, new_w = T.resized_size(height, width, self.min_size, self.max_size)
        new_h, new_w = T.fit_to_canvas(height, width, new_h, new_w, self.canvas)
        image = T.resize_image(image, new_h, new_w)
        if do_flip:
            image = image[:, ::-1]
        caption = captions[min(int(caption_u * len(captions)), len(captions) - 1)]
        out = {
            "image": T.pad_image(image, self.canvas),
            "tokens": tokenize([caption], self.context_length, truncate=self.truncate)[0],
            "image_hw": np.array([new_h, new_w], np.int32),
            "orig_hw": np.array([height, width], np.int32),
            "scale": np.array([new_h / height, new_w / width], np.float32),
            "flipped": np.bool_(do_flip),
            "source_index": np.int32(index),
        }
        if self.boxes is not None:
            out.update(self._boxes(rec, height, width, new_h, new_w, do_flip, subset_key))
        return out

    def _boxes(
        self, rec, height, width, new_h, new_w, do_flip, subset_key
    ) -> dict[str, np.ndarray]:
        r = self.max_boxes
        if self.boxes == "gt":
            boxes = rec["boxes"]
            if boxes is None:
                boxes, extra = np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
            else:
                keep = ~rec["iscrowd"]
                labels = rec["category_ids"].astype(np.int32)
                if self.category_map is not None:
                    keep &= np.isin(labels, list(self.category_map))
                    labels = np.array([self.category_map.get(int(c), -1) for c in labels], np.int32)
                boxes, extra = boxes[keep][:r], labels[keep][:r]
            extra_key, extra_fill = "labels", -1
        else:
            boxes = rec["proposals"]
            if boxes is None:
                boxes, extra = np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
            else:
                extra = rec["objectness"]
                if len(boxes) > r:
                    pick = np.sort(
                        np.random.default_rng(subset_key).choice(len(boxes), r, replace=False)
                    )
                    boxes, extra = boxes[pick], extra[pick]
            extra_key, extra_fill = "objectness", -np.inf
        boxes = T.scale_boxes(boxes, new_h / height, new_w / width)
        if do_flip:
            boxes = T.hflip_boxes(boxes, new_w)
        mask = np.zeros((r,), bool)
        mask[: len(boxes)] = True
        return {
            "boxes": T.pad_rows(boxes.astype(np.float32), r, 0.0),
            "box_mask": mask,
            extra_key: T.pad_rows(
                extra.astype(np.int32 if extra_key == "labels" else np.float32), r, extra_fill
            ),
        }


class FinishBatch(grain.transforms.Map):
    """Renames `image` -> `images` and normalises the stacked canvases (see normalize_padded)."""

    def __init__(self, normalize: bool):
        self.normalize = normalize

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        batch["images"] = (
            T.normalize_padded(images, batch["image_hw"]) if self.normalize else images
        )
        return batch


def _mark_flags_parsed(worker_index: int, worker_count: int) -> None:
    # grain reads absl flags in its worker processes; outside app.run they must be marked parsed.
    del worker_index, worker_count
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pretrain_dataset(
    paths: ShardSet | str | os.PathLike | Sequence[str | os.PathLike],
    *,
    batch_size: int,
    canvas: tuple[int, int] = (1344, 1344),
    min_size: int = 800,
    max_size: int | None = 1333,
    boxes: str | None = None,
    max_boxes: int = 100,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 0,
    flip: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    normalize: bool = True,
    context_length: int = 77,
    truncate: str = "clip",
    category_map: Mapping[int, int] | None = None,
    read_threads: int = 2,
    prefetch_buffer: int | None = None,
    on_bad_shard: str = "error",
) -> grain.IterDataset:
    """Builds the pretraining pipeline (see the module docstring for the batch layout).

    Args:
      paths: shard directories / manifests / files / globs (shards.open_shards), or a ShardSet.
      batch_size: examples per batch on this process.
      canvas: static (Hc, Wc); default 1344 x 1344 holds every 800/1333 resize (divisible by 32).
      min_size, max_size: the resize rule (RegionCLIP pretraining: 800, 1333).
      boxes: None (no box keys), "gt" (record GT boxes, with labels) or "proposals" (offline
        proposals stored in the records, with objectness).
      max_boxes: box slots R per image.
      seed: shuffling and augmentation seed.
      shard_index, shard_count: this process's block of every global batch (the global batch is
        `batch_size * shard_count`; see the module docstring).
      num_workers: grain worker processes (0: threads in this process).
      flip: random horizontal flip with probability 0.5.
      shuffle: shuffle the records (each epoch differently).
      num_epochs: passes over the data; None repeats forever.
      drop_remainder: drop a last incomplete batch (only matters with finite num_epochs).
      normalize: CLIP-normalise on the host (float32 images); False returns uint8 canvases.
      context_length, truncate: tokenizer settings (regionclip_jax.text.tokenize).
      category_map: dataset category id -> label for boxes="gt"; boxes of other ids are dropped.
        None keeps the dataset's ids as labels.
      read_threads: threads decoding examples (per worker process).
      prefetch_buffer: examples decoded ahead per worker (default: batch_size).
      on_bad_shard: "error" or "skip" (shards.open_shards).

    Returns:
      A `grain.IterDataset`; `iter()` it for batches. Close the iterator (or let it be garbage
      collected) to stop worker processes. With workers, batch arrays are views of shared memory
      that is freed when they are released: copy (`np.array`) what you keep, and drop the last
      batch before closing, or Python warns about leaked shared memory at exit.
    """
    if boxes not in (None, *BOX_SOURCES):
        raise ValueError(f"boxes must be None, 'gt' or 'proposals', got {boxes!r}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size < 1 or (boxes is not None and max_boxes < 1):
        raise ValueError("batch_size and max_boxes must be >= 1")
    shards = paths if isinstance(paths, ShardSet) else open_shards(paths, on_bad_shard=on_bad_shard)
    if len(shards) == 0:
        raise ValueError(f"no records in {list(shards.paths)}")
    if len(shards) < shard_count:
        raise ValueError(f"{len(shards)} records cannot be split over {shard_count} processes")

    ds = grain.MapDataset.source(ShardSource(shards))
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.random_map(
        PretrainTransform(
            canvas=canvas,
            min_size=min_size,
            max_size=max_size,
            flip=flip,
            boxes=boxes,
            max_boxes=max_boxes,
            context_length=context_length,
            truncate=truncate,
            category_map=category_map,
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


class GlobalBatchSlice(grain.MapDataset):
    """Block `index` of `count` of every global batch of a dataset read in order.

    Element i of this dataset is element `(i // b) * b * count + index * b + i % b` of the parent
    (b = `block`): the parent is cut into global batches of `b * count` consecutive elements and
    this process keeps rows [index * b, (index + 1) * b) of each. With a finite parent, the last,
    partial global batch is split the same way (later blocks may be short or empty).
    """

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        if not 0 <= index < count or block < 1:
            raise ValueError(
                f"need block >= 1 and 0 <= index < count, got {block}, {index}, {count}"
            )
        self._block, self._index, self._global = int(block), int(index), int(block) * int(count)
        n = len(parent)
        full, rest = divmod(n, self._global)
        self._length = full * self._block + min(
            max(rest - self._index * self._block, 0), self._block
        )

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, i: int) -> int:
        row, col = divmod(int(i), self._block)
        return row * self._global + self._index * self._block + col

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        return self._parent[self._parent_index(i)]

    def __str__(self) -> str:
        return f"GlobalBatchSlice(block={self._block}, index={self._index}, global={self._global})"


def batch_and_prefetch(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    drop_remainder: bool,
    normalize: bool,
    num_workers: int,
    read_threads: int,
    prefetch_buffer: int | None,
) -> grain.IterDataset:
    """The common tail of the pipelines: read threads, batch, `FinishBatch`, worker processes."""
    read = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_buffer or batch_size
    )
    it_ds = ds.to_iter_dataset(read)  # drops the None of skipped records
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder)
    it_ds = it_ds.map(FinishBatch(normalize))
    if num_workers > 0:
        # grain reads its absl flags when the worker pool starts. Outside `app.run` (scripts,
        # notebooks, tests) nothing parsed them; marking them parsed keeps their defaults.
        _mark_flags_parsed(0, 1)
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers),
            worker_init_fn=_mark_flags_parsed,
        )
    return it_ds


def pretrain_batch_spec(
    *,
    batch_size: int,
    canvas: tuple[int, int] = (1344, 1344),
    boxes: str | None = None,
    max_boxes: int = 100,
    normalize: bool = True,
    context_length: int = 77,
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of the batches `make_pretrain_dataset` yields with these arguments."""
    b, (hc, wc), r = batch_size, canvas, max_boxes
    spec: dict[str, Any] = {
        "images": ((b, hc, wc, 3), np.dtype(np.float32 if normalize else np.uint8)),
        "tokens": ((b, context_length), np.dtype(np.int32)),
        "image_hw": ((b, 2), np.dtype(np.int32)),
        "orig_hw": ((b, 2), np.dtype(np.int32)),
        "scale": ((b, 2), np.dtype(np.float32)),
        "flipped": ((b,), np.dtype(bool)),
        "source_index": ((b,), np.dtype(np.int32)),
    }
    if boxes is not None:
        spec["boxes"] = ((b, r, 4), np.dtype(np.float32))
        spec["box_mask"] = ((b, r), np.dtype(bool))
        if boxes == "gt":
            spec["labels"] = ((b, r), np.dtype(np.int32))
        else:
            spec["objectness"] = ((b, r), np.dtype(np.float32))
    return spec
