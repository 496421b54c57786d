"""Streams detections to disk during evaluation, and reads them back for the evaluators.

An evaluation loop produces fixed-shape batches (`boxes [B, N, 4]` with a validity mask, see
`regionclip_jax.eval.postprocess`). Keeping the detections of a full val set as Python objects
costs far more host memory than the detections themselves (COCO val: 5,000 images x 100 = 500k
detections = 16 MB packed, several hundred bytes each as Python dicts), so `DetectionWriter` appends each batch's
valid detections as packed binary records to a file and keeps nothing but a counter and the set of
image ids seen.

Distributed evaluation (the distributed gather): every process writes its own file set into one
shared directory (a workdir on a shared file system), named by its `process_index`, and closes its
writer. After a barrier (the caller's, e.g. `jax.experimental.multihost_utils.sync_global_devices`),
process 0 calls `read_detections(directory)` and `read_image_ids(directory)`, which read every
process's files. Each image must be written by exactly one process, once; the reader checks this,
so an image cannot be counted twice; give padded or repeated eval samples `image_id = -1`.
Use a fresh directory per evaluation: files of other process indices left by an earlier run with
more processes would be read too.

Files per process `p` (5-digit zero-padded):
  detections-pPPPPP.bin   packed `DETECTION_DTYPE` records, appended per `add`;
  detections-pPPPPP.json  written by `close`: record count, dtype, image ids file (the marker that
                          the process finished; `read_detections` refuses a file set without it);
  images-pPPPPP.npy       int64 ids of every image passed to `add` (also images with no detection);
  masks-pPPPPP.txt        only for a writer made with `masks=True`: one line per record, in record
                          order, "H W COUNTS" = the detection's compressed COCO RLE (`eval.masks`;
                          RLE counts use the characters '0'..'o', never a space or newline).
                          The marker's "masks" field says whether the file set has one (files
                          written before masks existed have no field: no masks).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# One detection: COCO results fields, box in COCO xywh (original image pixels). float32 like
# detectron2's `instances_to_coco_json` (float32 tensors -> python floats).
DETECTION_DTYPE = np.dtype(
    [
        ("image_id", "<i8"),
        ("category_id", "<i4"),
        ("x", "<f4"),
        ("y", "<f4"),
        ("w", "<f4"),
        ("h", "<f4"),
        ("score", "<f4"),
    ]
)
_FORMAT_VERSION = 1
_NAME_RE = re.compile(r"detections-p(\d{5})\.json$")


def _paths(directory: str, process_index: int) -> tuple[str, str, str]:
    stem = f"p{process_index:05d}"
    return (
        os.path.join(directory, f"detections-{stem}.bin"),
        os.path.join(directory, f"detections-{stem}.json"),
        os.path.join(directory, f"images-{stem}.npy"),
    )


def _masks_path(directory: str, process_index: int) -> str:
    return os.path.join(directory, f"masks-p{process_index:05d}.txt")


def _rle_line(rle: Any) -> str:
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError(f"a mask must be a compressed RLE dict with size and counts, got {rle!r}")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str) or any(c.isspace() for c in counts):
        raise ValueError("mask counts must be a compressed RLE string (pycocotools mask.encode)")
    h, w = (int(v) for v in rle["size"])
    return f"{h} {w} {counts}\n"


def _valid_entries(
    image_ids: np.ndarray, shape: tuple[int, int], valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(shape, bool) if valid is None else np.asarray(valid, bool).copy()
    if keep.shape != shape:
        raise ValueError(f"valid must be {list(shape)}, got {keep.shape}")
    keep &= (np.asarray(image_ids).astype(np.int64).reshape(-1) >= 0)[:, None]
    return np.nonzero(keep)


def pack_detections(
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Packs a padded batch into `DETECTION_DTYPE` records (valid entries only, row-major order).

    Args:
      image_ids: int[B] dataset image ids; rows with `image_id < 0` are padding and are dropped.
      boxes: float[B, N, 4] xyxy boxes in original image pixels.
      scores: float[B, N].
      category_ids: int[B, N] dataset category ids.
      valid: bool[B, N]; None means all valid.

    Returns:
      `DETECTION_DTYPE` array [K], K = number of valid entries of non-padding rows. `w = x2 - x1`
      and `h = y2 - y1` are computed in float32, as detectron2 does.
    """
    image_ids = np.asarray(image_ids).astype(np.int64).reshape(-1)
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    category_ids = np.asarray(category_ids)
    b = image_ids.shape[0]
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be [B={b}, N, 4], got {boxes.shape}")
    n = boxes.shape[1]
    if scores.shape != (b, n) or category_ids.shape != (b, n):
        raise ValueError(
            f"scores {scores.shape} and category_ids {category_ids.shape} must be [{b}, {n}]"
        )
    rows, cols = _valid_entries(image_ids, (b, n), valid)
    bx = boxes[rows, cols]
    out = np.empty(rows.shape[0], DETECTION_DTYPE)
    out["image_id"] = image_ids[rows]
    out["category_id"] = category_ids[rows, cols]
    out["x"] = bx[:, 0]
    out["y"] = bx[:, 1]
    out["w"] = bx[:, 2] - bx[:, 0]
    out["h"] = bx[:, 3] - bx[:, 1]
    out["score"] = scores[rows, cols]
    return out


class DetectionWriter:
    """Appends detections of one process to `directory` (see the module docstring for the files).

    Usage:
      with DetectionWriter(workdir, jax.process_index()) as w:
        for batch in loader:
          w.add(batch_image_ids, boxes, scores, category_ids, valid)
      # barrier across processes, then on process 0:
      dets = read_detections(workdir)

    Host memory: O(number of images) for the duplicate check, independent of detections.

    With `masks=True` every `add` also takes the detections' masks (compressed RLE dicts,
    `eval.masks.paste_masks_rle`), written as text lines beside the records; read them back with
    `read_masks`.
    """

    def __init__(
        self, directory: str | os.PathLike, process_index: int = 0, *, masks: bool = False
    ):
        self.directory = os.fspath(directory)
        self.process_index = int(process_index)
        self.masks = bool(masks)
        os.makedirs(self.directory, exist_ok=True)
        self._bin, self._meta, self._images = _paths(self.directory, self.process_index)
        mask_path = _masks_path(self.directory, self.process_index)
        # A stale marker from an earlier run would make a half-written file look complete.
        for path in (self._meta, self._images, mask_path):
            if os.path.exists(path):
                os.remove(path)
        self._file = open(self._bin, "wb")
        self._mask_file = open(mask_path, "w", encoding="ascii") if self.masks else None
        self._image_ids: set[int] = set()
        self.num_detections = 0

    def add(
        self,
        image_ids: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        category_ids: np.ndarray,
        valid: np.ndarray | None = None,
        masks: Sequence[Sequence[Any]] | None = None,
    ) -> int:
        """Appends one batch (arguments as in `pack_detections`); returns detections written.

        Args:
          masks: for a writer with `masks=True` (required there, refused otherwise): `masks[b][n]`
            the RLE dict (`{"size": [H, W], "counts": str}`) of detection n of row b; entries of
            invalid detections and padding rows are not read (may be None).

        Raises:
          ValueError: an image id already added by this writer (double counting); a missing or
            malformed mask of a valid detection.
        """
        if self._file is None:
            raise RuntimeError("DetectionWriter is closed")
        if (masks is not None) != self.masks:
            raise ValueError(
                "this DetectionWriter stores masks: pass masks= to add"
                if self.masks
                else "masks given to a DetectionWriter made without masks=True"
            )
        ids = [int(i) for i in np.asarray(image_ids).reshape(-1) if i >= 0]
        dup = sorted(self._image_ids.intersection(ids) | {i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(
                f"image ids added twice to process {self.process_index}'s writer: {dup[:5]}; "
                "mark padded or repeated images with image_id = -1"
            )
        records = pack_detections(image_ids, boxes, scores, category_ids, valid)
        if self._mask_file is not None:
            rows, cols = _valid_entries(image_ids, np.asarray(boxes).shape[:2], valid)
            lines = [_rle_line(masks[r][c]) for r, c in zip(rows.tolist(), cols.tolist())]
            self._mask_file.write("".join(lines))
        self._file.write(records.tobytes())
        self._image_ids.update(ids)
        self.num_detections += records.shape[0]
        return records.shape[0]

    def close(self) -> None:
        """Flushes the records, then writes the image ids and the completion marker."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._mask_file is not None:
            self._mask_file.close()
            self._mask_file = None
        np.save(self._images, np.array(sorted(self._image_ids), np.int64))
        meta = {
            "format_version": _FORMAT_VERSION,
            "process_index": self.process_index,
            "num_detections": self.num_detections,
            "num_images": len(self._image_ids),
            "dtype": DETECTION_DTYPE.descr,
            "masks": self.masks,
        }
        tmp = self._meta + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, self._meta)  # atomic: the marker appears only once complete

    def __enter__(self) -> DetectionWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _process_indices(directory: str) -> list[int]:
    found = []
    for path in glob.glob(os.path.join(directory, "detections-p*.json")):
        m = _NAME_RE.search(os.path.basename(path))
        if m:
            found.append(int(m.group(1)))
    bins = glob.glob(os.path.join(directory, "detections-p*.bin"))
    if len(bins) != len(found):
        raise RuntimeError(
            f"{directory}: {len(bins)} detection files but {len(found)} completion markers; "
            "a process has not closed its DetectionWriter (missing barrier?)"
        )
    return sorted(found)


def read_image_ids(directory: str | os.PathLike) -> np.ndarray:
    """int64 ids of all images any process passed to `add`, sorted.

    Raises:
      ValueError: an image written by two processes.
    """
    directory = os.fspath(directory)
    parts = [np.load(_paths(directory, p)[2]) for p in _process_indices(directory)]
    ids = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"images written by more than one process: {uniq[counts > 1][:5]}")
    return uniq


def read_detections(directory: str | os.PathLike, *, check: bool = True) -> np.ndarray:
    """Reads every process's detections from `directory` into one `DETECTION_DTYPE` array [K].

    Order: process 0's records in write order, then process 1's, ... (the evaluators sort by
    score with stable sorts, so only exact score ties depend on this order).

    Args:
      directory: the directory the `DetectionWriter`s wrote into.
      check: verify each file's record count against its marker and that no image was written
        by two processes.

    Raises:
      RuntimeError: a process's file set is incomplete (writer not closed, or file truncated).
    """
    directory = os.fspath(directory)
    parts = []
    for p in _process_indices(directory):
        bin_path, meta_path, _ = _paths(directory, p)
        with open(meta_path) as f:
            meta = json.load(f)
        records = np.fromfile(bin_path, DETECTION_DTYPE)
        if check and records.shape[0] != meta["num_detections"]:
            raise RuntimeError(
                f"{bin_path}: {records.shape[0]} records, marker says {meta['num_detections']}"
            )
        parts.append(records)
    if check:
        read_image_ids(directory)
    if not parts:
        return np.zeros((0,), DETECTION_DTYPE)
    return np.concatenate(parts)


def has_masks(directory: str | os.PathLike) -> bool:
    """Whether the file set in `directory` was written with masks (every process, or none).

    Raises:
      RuntimeError: some processes wrote masks and others did not.
    """
    directory = os.fspath(directory)
    flags = set()
    for p in _process_indices(directory):
        with open(_paths(directory, p)[1]) as f:
            flags.add(bool(json.load(f).get("masks", False)))
    if len(flags) > 1:
        raise RuntimeError(f"{directory}: some processes wrote masks and others did not")
    return flags == {True}


def read_masks(directory: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The detections' masks, aligned with `read_detections(directory)`; None without masks.

    Returns:
      one compressed RLE dict `{"size": [H, W], "counts": str}` per detection, or None when the
      file set was written without masks (also files from before masks existed).

    Raises:
      RuntimeError: a process's mask file does not have one line per record.
    """
    directory = os.fspath(directory)
    if not has_masks(directory):
        return None
    out: list[dict[str, Any]] = []
    for p in _process_indices(directory):
        with open(_paths(directory, p)[1]) as f:
            expected = json.load(f)["num_detections"]
        path = _masks_path(directory, p)
        n0 = len(out)
        with open(path, encoding="ascii") as f:
            for line in f:
                h, w, counts = line.rstrip("\n").split(" ")
                out.append({"size": [int(h), int(w)], "counts": counts})
        if len(out) - n0 != expected:
            raise RuntimeError(f"{path}: {len(out) - n0} masks, marker says {expected} records")
    return out


def detections_from_coco_results(results: list[dict[str, Any]]) -> np.ndarray:
    """COCO results list (`image_id`, `category_id`, `bbox` xywh, `score`) -> `DETECTION_DTYPE`."""
    out = np.zeros((len(results),), DETECTION_DTYPE)
    if results:
        out["image_id"] = [r["image_id"] for r in results]
        out["category_id"] = [r["category_id"] for r in results]
        bbox = np.asarray([r["bbox"] for r in results], np.float32).reshape(-1, 4)
        for i, k in enumerate("xywh"):
            out[k] = bbox[:, i]
        out["score"] = [r["score"] for r in results]
    return out


def to_coco_results(
    dets: np.ndarray, masks: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """`DETECTION_DTYPE` array -> COCO results list (python floats of the float32 values).

    With `masks` (one RLE dict per detection, `read_masks`), each result also has
    `segmentation` (detectron2's `instances_to_coco_json` writes both bbox and segmentation).
    """
    ids = dets["image_id"].tolist()
    cats = dets["category_id"].tolist()
    xywh = np.stack([dets["x"], dets["y"], dets["w"], dets["h"]], axis=1).tolist()
    scores = dets["score"].tolist()
    out = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(ids, cats, xywh, scores)
    ]
    if masks is not None:
        if len(masks) != len(out):
            raise ValueError(f"{len(masks)} masks for {len(out)} detections")
        for r, m in zip(out, masks):
            r["segmentation"] = m
    return out


def to_coco_json(
    dets: np.ndarray, path: str | os.PathLike, masks: Sequence[dict[str, Any]] | None = None
) -> None:
    """Writes the standard COCO results json (a list of dicts) that `COCO.loadRes` reads."""
    with open(path, "w") as f:
        json.dump(to_coco_results(dets, masks), f)
