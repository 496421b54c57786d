"""Offline RPN proposals precomputed into the shards (`regionclip-jax add-proposals`).

RegionCLIP's pretraining takes its regions from a frozen, class-agnostic offline RPN (spec §1.2,
§4.6): the LVIS-866 R50-FPN RPN in eval mode with `POST_NMS_TOPK_TEST = 300` and
`NMS_THRESH = OFFLINE_RPN_NMS_THRESH = 0.5` (pre-NMS 1000 per FPN level, min size 0), run on the
image resized by the test-time rule (shortest edge 800, longest <= 1333); the training step then
samples 100 of the 300 at random. The RPN is frozen and the resize is deterministic, so the
proposals are a function of the image alone: `add_proposals` computes them once and stores them
in the records (`proposals` float32[P, 4] xyxy pixels of the stored image, `objectness`
float32[P] raw RPN logits, P <= `topk`; schema.py). Pretraining with
`pretrain.regions = "proposals"` then reads them, and `pipeline.make_pretrain_dataset` draws the
random subset of `max_boxes` (= `pretrain.num_regions`, 100) per image.

Per record: decode the image (`transforms.decode_image`, as the pipeline does) -> resize by the
shortest-edge rule (PIL bicubic, `transforms.resized_size`) -> zero-pad bottom/right to a static
canvas (default: the two orientation buckets of `inference.preprocess.default_canvas`,
(ceil32(min_size), ceil32(max_size)) and its transpose) -> the RPN on RGB 0..255 (batches of
`batch_size` images of one canvas; the last batch of a canvas is padded with empty images, so
every canvas compiles to one program) -> the valid proposals mapped back to stored-image pixels
by the resize scale, clipped to the image, by decreasing objectness, at most `topk`.

Output: a new shard directory with the same records in the same order and with the same ids;
every field other than `proposals` / `objectness` is unchanged (image bytes included), and
existing proposals are replaced. Records whose image cannot be decoded, or that cannot be read,
are skipped with a reason in the manifest (`corrupt_image`, `unreadable_record`), as
`ShardWriter` skips bad input. The manifest's `metadata` is the input's, plus `proposals`: the
RPN path, kind and the settings used.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from regionclip_jax.convert.rpn import load_offline_rpn
from regionclip_jax.data import transforms as T
from regionclip_jax.data.schema import RecordError, decode_record
from regionclip_jax.data.shards import (
    MANIFEST_NAME,
    ShardError,
    ShardReader,
    ShardWriter,
    load_manifest,
)
from regionclip_jax.inference.preprocess import default_canvas

# The pretraining settings of the original's offline RPN (spec §1.2, §4.6).
PRETRAIN_TOPK = 300
PRETRAIN_NMS_THRESH = 0.5
# Skip examples kept in the manifest per reason (ShardWriter's default).
_MAX_EXAMPLES = 20
# Records held for ordering, in batches: past this, the canvas of the oldest waiting record is run
# with a padded batch.
_HELD_BATCHES = 8


@dataclasses.dataclass
class _Item:
    """One decoded record waiting for the RPN.

    Attributes:
      index: position in the input shards.
      record: the decoded input record.
      pixels: uint8 `[Hc, Wc, 3]` resized RGB on the zero-padded canvas.
      image_hw: (h, w) of the resized image inside the canvas.
      canvas: (Hc, Wc).
      shrunk: the image was shrunk below the resize rule to fit a user-given canvas.
    """

    index: int
    record: dict[str, Any]
    pixels: np.ndarray
    image_hw: tuple[int, int]
    canvas: tuple[int, int]
    shrunk: bool


def _check_settings(topk, pre_nms_topk, nms_thresh, min_size, max_size, canvas, batch_size):
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if pre_nms_topk is not None and pre_nms_topk < 1:
        raise ValueError(f"pre_nms_topk must be >= 1 (or None), got {pre_nms_topk}")
    if not 0.0 < nms_thresh <= 1.0:
        raise ValueError(f"nms_thresh must be in (0, 1], got {nms_thresh}")
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if canvas is not None:
        if len(canvas) != 2 or min(int(c) for c in canvas) < 1:
            raise ValueError(f"canvas must be (Hc, Wc) with positive sides, got {canvas}")


def _prepare(
    index: int,
    record: dict[str, Any],
    min_size: int,
    max_size: int,
    canvas: tuple[int, int] | None,
) -> _Item:
    """Decodes and resizes one record's image onto its canvas; raises on an undecodable image."""
    image = T.decode_image(record["image"])
    h, w = image.shape[:2]
    new_h, new_w = T.resized_size(h, w, min_size, max_size)
    shrunk = False
    if canvas is None:
        target = default_canvas(new_h, new_w, min_size, max_size)
    else:
        target = canvas
        if new_h > target[0] or new_w > target[1]:
            # A canvas smaller than the resize rule's output (as the pretraining pipeline does):
            # shrink to fit; the proposals are mapped back by the actual scale, so they stay
            # exact boxes of the stored image.
            new_h, new_w = T.fit_to_canvas(h, w, new_h, new_w, target)
            shrunk = True
    pixels = T.pad_image(T.resize_image(image, new_h, new_w), target)
    return _Item(index, record, pixels, (new_h, new_w), tuple(target), shrunk)


def _to_record_frame(
    boxes: np.ndarray,
    logits: np.ndarray,
    valid: np.ndarray,
    image_hw: tuple[int, int],
    height: int,
    width: int,
    topk: int,
    min_box_size: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's RPN output -> (float32 `[P, 4]` xyxy stored-image pixels, float32 `[P]`).

    Args:
      boxes: float `[K, 4]` xyxy canvas pixels; logits: float `[K]`; valid: bool `[K]`.
      image_hw: (h, w) of the resized image in the canvas; height, width: of the stored image.
      topk: most proposals kept. min_box_size: the output shards' degenerate-box size.
    """
    b = np.asarray(boxes, np.float64)[valid]
    s = np.asarray(logits, np.float32)[valid]
    sx, sy = image_hw[1] / width, image_hw[0] / height
    b = b / np.array([sx, sy, sx, sy])
    # The RPN clips to the resized image; this clip only absorbs the rounding of the rescale.
    b = np.clip(b, 0, [width, height, width, height]).astype(np.float32)
    # Boxes the writer would drop as degenerate go here, so what is stored is what is counted.
    ok = ((b[:, 2] - b[:, 0]) > min_box_size) & ((b[:, 3] - b[:, 1]) > min_box_size)
    b, s = b[ok], s[ok]
    order = np.argsort(-s, kind="stable")[:topk]
    return b[order], s[order]


def add_proposals(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rpn: str | os.PathLike,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    canvas: tuple[int, int] | None = None,
    topk: int = PRETRAIN_TOPK,
    pre_nms_topk: int | None = None,
    nms_thresh: float = PRETRAIN_NMS_THRESH,
    batch_size: int = 8,
    records_per_shard: int | None = None,
    num_threads: int = 4,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    set_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Writes a copy of the shards in `in_dir` with the offline RPN's proposals filled in.

    See the module docstring for the steps and the output.

    Args:
      in_dir: a shard directory (with manifest.json).
      out_dir: the new shard directory; must differ from `in_dir`.
      rpn: an `rpn` workdir, its export/ dir or a detectron2 RPN .pth.
      min_size, max_size: the test-time resize (RegionCLIP: 800 / 1333).
      canvas: fixed (Hc, Wc) for every image (images whose resize does not fit are shrunk to fit,
        counted as `shrunk_to_canvas`); None: the two orientation buckets
        (ceil32(min_size), ceil32(max_size)) and its transpose.
      topk: proposals kept per image, the RPN's post-NMS top-k (pretraining: 300).
      pre_nms_topk: RPN candidates per level before NMS; None: the kind's detectron2 test default
        (FPN 1000 per level, as the pretraining RPN; C4 / CLIP res4 6000).
      nms_thresh: the RPN's NMS IoU (pretraining: `OFFLINE_RPN_NMS_THRESH` 0.5; the zero-shot
        inference configs use 0.9).
      batch_size: images per RPN call (per canvas).
      records_per_shard: records per output file; None: as the input's largest shard.
      num_threads: threads decoding and resizing images.
      overwrite: replace shards already in `out_dir`.
      progress: called with the number of input records finished (written or skipped).
      set_total: called once with the number of input records.

    Returns:
      Summary dict: records (written), input_records, skipped {reason: n}, proposals (total),
      proposals_per_image (mean), proposals_min / proposals_max, records_without_proposals,
      shrunk_to_canvas, canvases {"HcxWc": images}, seconds, images_per_second, out_dir,
      manifest (the output manifest), settings (as stored in the manifest).

    Raises:
      ValueError: `in_dir == out_dir`, bad settings, or `in_dir` is not a readable shard directory.
      FileExistsError: `out_dir` holds shards and not `overwrite`.
      FileNotFoundError: nothing usable at `rpn`.
    """
    _check_settings(topk, pre_nms_topk, nms_thresh, min_size, max_size, canvas, batch_size)
    canvas = None if canvas is None else (int(canvas[0]), int(canvas[1]))
    in_dir, out_dir = os.fspath(in_dir), os.fspath(out_dir)
    if os.path.realpath(in_dir) == os.path.realpath(out_dir):
        raise ValueError(
            f"the output directory {out_dir!r} is the input {in_dir!r}: write the shards with "
            "proposals to a new directory (the input stays as it is)"
        )
    try:
        in_manifest = load_manifest(in_dir)
        reader = ShardReader(in_dir)
    except ShardError as e:
        raise ValueError(f"input shards {in_dir!r}: {e}") from e
    # Fail before loading the RPN (ShardWriter checks again when it opens).
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)) and not overwrite:
        raise FileExistsError(
            f"{os.path.join(out_dir, MANIFEST_NAME)} exists: shards were already written there "
            "(pass overwrite=True / --overwrite to replace them)"
        )
    arch, propose = load_offline_rpn(
        rpn, pre_nms_topk=pre_nms_topk, post_nms_topk=topk, nms_thresh=nms_thresh
    )
    if canvas is not None and arch.get("kind") == "fpn" and (canvas[0] % 32 or canvas[1] % 32):
        raise ValueError(f"an FPN RPN needs a canvas divisible by 32, got {canvas}")
    settings = {
        "rpn": os.path.abspath(os.fspath(rpn)),
        "rpn_kind": arch.get("kind"),
        "topk": int(topk),
        "pre_nms_topk": int(arch["pre_nms_topk"]),
        "nms_thresh": float(nms_thresh),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "canvas": None if canvas is None else list(canvas),
        "batch_size": int(batch_size),
        "input": os.path.abspath(in_dir),
    }
    policy = dict(in_manifest.get("policy") or {})
    min_box_size = float(policy.get("min_box_size", 0.0))
    if records_per_shard is None:
        records_per_shard = max([int(s["num_records"]) for s in in_manifest["shards"]] or [1])
    metadata = dict(in_manifest.get("metadata") or {})
    metadata["proposals"] = settings

    total = len(reader)
    if set_total is not None:
        set_total(total)
    counts: collections.Counter = collections.Counter()
    canvases: collections.Counter = collections.Counter()
    per_image: list[int] = []
    start = time.perf_counter()

    writer = ShardWriter(
        out_dir,
        in_manifest.get("prefix", "data"),
        records_per_shard,
        # The input's bad-record policy: records that passed it pass again unchanged.
        require_captions=bool(policy.get("require_captions", True)),
        require_boxes=bool(policy.get("require_boxes", False)),
        check_images=bool(policy.get("check_image", True)),
        min_box_size=min_box_size,
        check_duplicate_ids=bool(policy.get("check_duplicate_ids", True)),
        metadata=metadata,
        overwrite=overwrite,
    )

    def skip(rid: Any, reason: str, detail: str) -> None:
        # The writer's own counters, so the manifest's invariant holds:
        # input_records == num_records + sum(skipped).
        writer.input_records += 1
        writer.skipped[reason] += 1
        examples = writer.skipped_examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append([str(rid), detail[:200]])

    # Results wait here until every earlier record is done, so the output keeps the input order.
    done: dict[int, tuple[str, Any]] = {}
    next_out = 0

    def emit() -> None:
        nonlocal next_out
        while next_out in done:
            kind, value = done.pop(next_out)
            if kind == "skip":
                skip(*value)
            else:
                writer.write(value)
            next_out += 1
            if progress is not None:
                progress(1)

    pending: dict[tuple[int, int], list[_Item]] = collections.defaultdict(list)
    in_flight: list[tuple[list[_Item], Any]] = []

    def finish(items: list[_Item], outputs: Any) -> None:
        boxes, logits, valid = (np.asarray(x) for x in outputs)
        for i, item in enumerate(items):
            rec = item.record
            b, s = _to_record_frame(
                boxes[i],
                logits[i],
                valid[i],
                item.image_hw,
                int(rec["height"]),
                int(rec["width"]),
                topk,
                min_box_size,
            )
            per_image.append(len(b))
            done[item.index] = ("write", dict(rec, proposals=b, objectness=s))

    def dispatch(key: tuple[int, int]) -> None:
        items = pending.pop(key)
        images = np.zeros((batch_size, *key, 3), np.uint8)  # padding rows: empty images
        image_hw = np.ones((batch_size, 2), np.int32)  # (1, 1) keeps the padding rows finite
        for i, item in enumerate(items):
            images[i] = item.pixels
            image_hw[i] = item.image_hw
            item.pixels = None  # the batch holds the canvas now
        # Dispatch is asynchronous: the next batch is prepared while this one runs; the one
        # before it is finished (copied to the host) now.
        in_flight.append((items, propose(images, image_hw)))
        while len(in_flight) > 1:
            finish(*in_flight.pop(0))

    def read(index: int) -> tuple[int, dict[str, Any] | None, str]:
        try:
            data = reader.read_bytes(index)
            return index, decode_record(data, where=f"{in_dir}[{index}]"), ""
        except (RecordError, RuntimeError) as e:
            return index, None, f"{type(e).__name__}: {e}"

    def prepare(entry: tuple[int, dict[str, Any] | None, str]):
        index, rec, problem = entry
        if rec is None:
            return index, None, ("unreadable_record", problem)
        try:
            return index, _prepare(index, rec, min_size, max_size, canvas), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad bytes
            return index, rec, ("corrupt_image", f"{type(e).__name__}: {e}")

    def prepared() -> Iterator[tuple[int, Any, tuple[str, str] | None]]:
        chunk = max(4 * batch_size, 16)
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            for lo in range(0, total, chunk):
                # Reading stays in this thread (one ArrayRecord reader); decoding is threaded.
                entries = [read(i) for i in range(lo, min(total, lo + chunk))]
                yield from pool.map(prepare, entries)

    # Bound on records held for ordering: a rare canvas (e.g. a few portrait images among many
    # landscape ones) is run with a padded batch rather than holding everything after it.
    max_held = _HELD_BATCHES * batch_size
    try:
        for index, item, problem in prepared():
            if problem is not None:
                rid = item.get("id") if isinstance(item, dict) else None
                done[index] = ("skip", (rid if rid is not None else f"#{index}", *problem))
            else:
                canvases[f"{item.canvas[0]}x{item.canvas[1]}"] += 1
                counts["shrunk_to_canvas"] += int(item.shrunk)
                pending[item.canvas].append(item)
                if len(pending[item.canvas]) == batch_size:
                    dispatch(item.canvas)
            while pending and index + 1 - next_out > max_held:
                oldest = min(pending, key=lambda k: pending[k][0].index)
                dispatch(oldest)
                while in_flight:
                    finish(*in_flight.pop(0))
                emit()
            emit()
        for key in list(pending):
            dispatch(key)
        while in_flight:
            finish(*in_flight.pop(0))
        emit()
        if next_out != total:  # every input record is written or skipped, in order
            raise AssertionError(f"internal error: {next_out} of {total} records emitted")
    except BaseException:
        writer.abort()
        reader.close()
        raise
    manifest = writer.close()
    reader.close()
    seconds = time.perf_counter() - start
    n = len(per_image)
    return {
        "records": int(manifest["num_records"]),
        "input_records": int(manifest["input_records"]),
        "skipped": dict(manifest["skipped"]),
        "proposals": int(sum(per_image)),
        "proposals_per_image": float(np.mean(per_image)) if n else 0.0,
        "proposals_min": int(min(per_image)) if n else 0,
        "proposals_max": int(max(per_image)) if n else 0,
        "records_without_proposals": int(sum(1 for p in per_image if p == 0)),
        "shrunk_to_canvas": int(counts["shrunk_to_canvas"]),
        "canvases": dict(sorted(canvases.items())),
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else 0.0,
        "out_dir": out_dir,
        "manifest": manifest,
        "settings": settings,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the command line: records, proposals per image, skipped."""
    s = summary
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
    cfg = s["settings"]
    lines = [
        f"add-proposals: {s['records']:,} of {s['input_records']:,} records written to "
        f"{s['out_dir']} in {s['seconds']:.1f} s ({s['images_per_second']:,.1f} images/s)",
        f"  proposals per image: mean {s['proposals_per_image']:.1f}, min {s['proposals_min']}, "
        f"max {s['proposals_max']} (top {cfg['topk']}, RPN NMS {cfg['nms_thresh']}, pre-NMS "
        f"{cfg['pre_nms_topk']}); {s['records_without_proposals']} image(s) without proposals",
        f"  skipped: {skipped}",
        f"  resize {cfg['min_size']}/{cfg['max_size']}, canvases "
        + (", ".join(f"{k}: {v}" for k, v in s["canvases"].items()) or "none")
        + (f"; {s['shrunk_to_canvas']} shrunk to fit the canvas" if s["shrunk_to_canvas"] else ""),
        f"  rpn: {cfg['rpn']} ({cfg['rpn_kind']})",
    ]
    return "\n".join(lines)
