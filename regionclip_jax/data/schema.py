"""The shard record schema (version 1): one image with its captions, boxes, masks and proposals.

A record is a Python dict; on disk it is one msgpack map (https://msgpack.org, readable from any
language; no pickle). Field names, types and meaning:

  | key              | in memory (after `decode_record`)   | on disk (msgpack)                    |
  |------------------|-------------------------------------|--------------------------------------|
  | `schema_version` | int, == SCHEMA_VERSION              | int                                  |
  | `id`             | str, stable and unique in a data set | str                                 |
  | `source`         | str, where the record came from      | str                                  |
  | `image`          | bytes, the encoded image file        | bin                                  |
  | `image_format`   | "png" or "jpeg"                      | str                                  |
  | `height`,`width` | int, of the decoded image            | int                                  |
  | `captions`       | list[str], possibly empty            | array of str                         |
  | `boxes`          | float32[K, 4] xyxy pixels, or None   | array map (below) or nil             |
  | `category_ids`   | int32[K], or None                    | array map or nil                     |
  | `iscrowd`        | bool[K], or None                     | array map (uint8) or nil             |
  | `masks`          | list[K] of RLE or None, or None      | array of (mask map or nil), or nil   |
  | `proposals`      | float32[P, 4] xyxy pixels, or None   | array map or nil                     |
  | `objectness`     | float32[P], or None                  | array map or nil                     |

Boxes are absolute `xyxy` in the pixel frame of the stored image: pixel (i, j) covers
[j, j+1) x [i, i+1), so a box enclosing pixel columns 3..7 is x1=3, x2=8 (COCO's `xywh` becomes
`[x, y, x + w, y + h]`). `category_ids` are the data set's own ids (COCO ids, not contiguous
indices). `boxes`, `category_ids` and `iscrowd` are present together or not at all; so are
`proposals` and `objectness`. None means "not annotated"; an empty [0, 4] array means "annotated,
no objects".

`masks` (optional, later addition to version 1) holds one instance mask per box, aligned with
`boxes`: each entry is a COCO compressed RLE `{"size": [height, width], "counts": bytes}` in the
stored image's pixel frame (pycocotools' `mask.decode` reads it), or None for an instance without
a mask (its source had no usable segmentation). The field is None when the source has no
segmentation at all, and absent in shards written before it existed: `decode_record` returns
None for them. On disk a mask map is `{"size": [h, w], "counts": bin}`. The schema version is
unchanged: readers that predate the field ignore it (see below), and shards without it still read.

An array map is `{"dtype": "<f4" | "<i4" | "|u1", "shape": [..], "data": bin}` with the
little-endian, C-order bytes of the array. Unknown keys are ignored by this reader (later minor
additions stay readable); a different `schema_version` raises `SchemaVersionError`.

`sanitize_record` applies the bad-record policy (documented in docs/shapesworld.md and in its
docstring) before a record is written; `ShardWriter` calls it.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

SCHEMA_VERSION = 1

# Formats stored as they come. Anything else PIL can decode is re-encoded as PNG (a repair).
STORED_IMAGE_FORMATS = ("png", "jpeg")

_ARRAY_DTYPES = {
    "boxes": np.dtype("<f4"),
    "category_ids": np.dtype("<i4"),
    "iscrowd": np.dtype("|u1"),
    "proposals": np.dtype("<f4"),
    "objectness": np.dtype("<f4"),
}
_ARRAY_KEYS = tuple(_ARRAY_DTYPES)
RECORD_KEYS = (
    "schema_version",
    "id",
    "source",
    "image",
    "image_format",
    "height",
    "width",
    "captions",
    *_ARRAY_KEYS,
)


class SchemaVersionError(ValueError):
    """A record or manifest was written with a schema version this reader does not read."""


class RecordError(ValueError):
    """A record is malformed (missing key, wrong type or shape)."""


def check_schema_version(version: Any, where: str) -> None:
    """Raises `SchemaVersionError` naming `where` unless `version == SCHEMA_VERSION`."""
    if version != SCHEMA_VERSION:
        hint = (
            "it was written by a newer regionclip_jax: upgrade this installation"
            if isinstance(version, int) and version > SCHEMA_VERSION
            else "re-create the shards with this regionclip_jax (regionclip-jax make-shards / shapesworld)"
        )
        raise SchemaVersionError(
            f"{where}: shard schema version {version!r}, but this regionclip_jax reads version "
            f"{SCHEMA_VERSION}; {hint}"
        )


def _encode_array(x: np.ndarray, dtype: np.dtype) -> dict[str, Any]:
    x = np.ascontiguousarray(x, dtype=dtype)
    return {"dtype": dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def _decode_array(m: Any, key: str, where: str) -> np.ndarray:
    if not isinstance(m, Mapping) or not {"dtype", "shape", "data"} <= set(m):
        raise RecordError(f"{where}: field {key!r} is not an array map")
    if np.dtype(m["dtype"]) != _ARRAY_DTYPES[key]:
        raise RecordError(
            f"{where}: field {key!r} has dtype {m['dtype']}, expected {_ARRAY_DTYPES[key].str}"
        )
    arr = np.frombuffer(m["data"], dtype=np.dtype(m["dtype"])).reshape(m["shape"])
    # Native byte order and a writable copy: downstream transforms modify arrays in place.
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    return arr.astype(bool) if key == "iscrowd" else arr


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serialises a (sanitised) record dict to msgpack bytes; see the module docstring."""
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": str(record["id"]),
        "source": str(record.get("source", "")),
        "image": bytes(record["image"]),
        "image_format": str(record["image_format"]),
        "height": int(record["height"]),
        "width": int(record["width"]),
        "captions": [str(c) for c in record.get("captions") or []],
    }
    for key, dtype in _ARRAY_DTYPES.items():
        value = record.get(key)
        out[key] = None if value is None else _encode_array(np.asarray(value), dtype)
    masks = record.get("masks")
    out["masks"] = None if masks is None else [_encode_mask(m) for m in masks]
    return msgpack.packb(out, use_bin_type=True)


def _encode_mask(rle: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A compressed RLE (counts bytes or str) -> the on-disk mask map; None stays None."""
    if rle is None:
        return None
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _decode_masks(value: Any, num_boxes: int | None, where: str) -> list | None:
    """The on-disk `masks` field -> list[K] of RLE dicts / None (checked against K boxes)."""
    if value is None:
        return None
    if not isinstance(value, list) or num_boxes is None or len(value) != num_boxes:
        raise RecordError(
            f"{where}: field 'masks' must be a list with one entry per box ({num_boxes})"
        )
    out = []
    for m in value:
        ok = m is None or (
            isinstance(m, Mapping)
            and isinstance(m.get("counts"), bytes)
            and isinstance(m.get("size"), list | tuple)
            and len(m["size"]) == 2
        )
        if not ok:
            raise RecordError(f"{where}: a 'masks' entry is not a mask map or nil")
        out.append(None if m is None else {"size": list(m["size"]), "counts": m["counts"]})
    return out


def decode_record(data: bytes, *, where: str = "record") -> dict[str, Any]:
    """Parses msgpack bytes written by `encode_record` into a record dict.

    Raises:
      SchemaVersionError: the record has another schema version (message names `where`).
      RecordError: the bytes are not a record of this schema.
    """
    try:
        m = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise RecordError(f"{where}: not a msgpack record ({type(e).__name__}: {e})") from e
    if not isinstance(m, dict):
        raise RecordError(f"{where}: not a msgpack map")
    check_schema_version(m.get("schema_version"), where)
    missing = [k for k in RECORD_KEYS if k not in m]
    if missing:
        raise RecordError(f"{where}: missing fields {missing}")
    rec = {k: m[k] for k in RECORD_KEYS if k not in _ARRAY_KEYS}
    for key in _ARRAY_KEYS:
        rec[key] = None if m[key] is None else _decode_array(m[key], key, where)
    boxes = rec["boxes"]
    rec["masks"] = _decode_masks(m.get("masks"), None if boxes is None else len(boxes), where)
    return rec


# ---------------------------------------------------------------------------------------------
# Bad-record policy.


class SkipRecord(Exception):
    """Raised by `sanitize_record` when a record is skipped; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _box_array(value: Any, key: str, ncols: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SkipRecord("malformed", f"{key} is not numeric ({e})") from e
    if arr.size == 0:
        arr = arr.reshape((0, ncols) if ncols else (0,))
    if (ncols and (arr.ndim != 2 or arr.shape[1] != ncols)) or (not ncols and arr.ndim != 1):
        want = f"[N, {ncols}]" if ncols else "[N]"
        raise SkipRecord("malformed", f"{key} has shape {list(arr.shape)}, expected {want}")
    return arr


def _repair_boxes(
    boxes: np.ndarray,
    height: int,
    width: int,
    repairs: collections.Counter,
    kind: str,
    min_size: float,
) -> np.ndarray:
    """Returns the keep mask [N] after clipping `boxes` [N, 4] (in place) to the image."""
    finite = np.isfinite(boxes).all(axis=1)
    if (~finite).any():
        repairs[f"{kind}_nonfinite_dropped"] += int((~finite).sum())
    safe = np.where(finite[:, None], boxes, 0.0)
    clipped = np.stack(
        [
            np.clip(safe[:, 0], 0, width),
            np.clip(safe[:, 1], 0, height),
            np.clip(safe[:, 2], 0, width),
            np.clip(safe[:, 3], 0, height),
        ],
        axis=1,
    )
    changed = finite & (clipped != safe).any(axis=1)
    boxes[:] = clipped
    big = ((clipped[:, 2] - clipped[:, 0]) > min_size) & (
        (clipped[:, 3] - clipped[:, 1]) > min_size
    )
    keep = finite & big
    degenerate = finite & ~big
    if degenerate.any():
        repairs[f"{kind}_degenerate_dropped"] += int(degenerate.sum())
    if (changed & keep).any():
        repairs[f"{kind}_clipped"] += int((changed & keep).sum())
    return keep


# Instance masks: COCO segmentations -> compressed RLE in the stored image's frame.


def _rle_string_counts(s: bytes) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`), None if cut.

    Decoded here, not by pycocotools, so that a corrupt string is rejected before its C decoder
    (which trusts the runs to sum to h * w) sees it.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # the last run's continuation bit points past the end
            c = s[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign extension
        if len(counts) > 2:
            x += counts[-2]  # runs after the third are stored as deltas
        counts.append(x)
    return counts


def _runs_ok(counts: Any, total: int) -> bool:
    """Whether `counts` are non-negative integer runs covering exactly `total` pixels."""
    return (
        isinstance(counts, list)
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        and sum(counts) == total
    )


def _polygon_rle(seg: Any, frame: tuple[int, int], hw: tuple[int, int]) -> dict | None:
    """COCO polygons (list of [x0, y0, x1, y1, ...]) in `frame` -> RLE at `hw`, None if bad.

    Bad: no polygon, a polygon with fewer than 3 points, an odd number of coordinates or a
    non-finite one (one bad polygon rejects the whole segmentation). Coordinates are scaled by
    hw / frame first, so a rescaled image gets the exactly rescaled outline.
    """
    if not seg or not all(isinstance(p, list | tuple) for p in seg):
        return None
    polys = []
    for poly in seg:
        try:
            xy = np.asarray(poly, np.float64)
        except (TypeError, ValueError):
            return None
        if xy.ndim != 1 or len(xy) < 6 or len(xy) % 2 or not np.isfinite(xy).all():
            return None
        xy = xy.reshape(-1, 2) * [hw[1] / frame[1], hw[0] / frame[0]]
        polys.append(xy.ravel().tolist())
    # frPyObjects reads a 4-number list as a box; every polygon here has >= 6 numbers.
    return mask_util.merge(mask_util.frPyObjects(polys, hw[0], hw[1]))


def _rle_rle(seg: Mapping[str, Any], frame: tuple[int, int], hw: tuple[int, int]) -> dict | None:
    """COCO RLE (uncompressed `counts` list or compressed str/bytes) in `frame` -> RLE at `hw`.

    Bad (None): its `size` is not `frame`, or its runs do not cover size[0] * size[1] pixels.
    A frame other than `hw` (an image rescaled to its file's size) is resampled nearest-neighbour
    at the pixel centres of `hw`.
    """
    size = seg.get("size")
    if not isinstance(size, list | tuple) or [*size] != [frame[0], frame[1]]:
        return None
    counts = seg.get("counts")
    total = frame[0] * frame[1]
    if isinstance(counts, list):
        if not _runs_ok(counts, total):
            return None
        rle = mask_util.frPyObjects({"size": list(frame), "counts": counts}, *frame)
    elif isinstance(counts, str | bytes):
        raw = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
        if not _runs_ok(_rle_string_counts(raw), total):
            return None
        rle = {"size": list(frame), "counts": raw}
    else:
        return None
    if tuple(frame) == tuple(hw):
        return rle
    full = mask_util.decode(rle)
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * frame[0] / hw[0]).astype(np.int64), frame[0] - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * frame[1] / hw[1]).astype(np.int64), frame[1] - 1)
    return encode_mask(full[np.ix_(rows, cols)])


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """bool/uint8[h, w] -> the record's compressed RLE {"size": [h, w], "counts": bytes}."""
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def segmentation_to_rle(
    seg: Any, frame: tuple[int, int], hw: tuple[int, int]
) -> dict[str, Any] | None:
    """One COCO/LVIS `segmentation` in the pixel frame `frame` (h, w) -> compressed RLE at `hw`.

    Accepts polygons (list of [x0, y0, x1, y1, ...]), uncompressed RLE (`counts` a list) and
    compressed RLE (`counts` a str as in COCO json, or bytes). Returns
    {"size": [hw_h, hw_w], "counts": bytes}, or None for a bad segmentation (see `_polygon_rle`,
    `_rle_rle`).
    """
    frame, hw = (int(frame[0]), int(frame[1])), (int(hw[0]), int(hw[1]))
    if isinstance(seg, Mapping):
        rle = _rle_rle(seg, frame, hw)
    elif isinstance(seg, list | tuple):
        rle = _polygon_rle(seg, frame, hw)
    else:
        rle = None
    if rle is None:
        return None
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": bytes(rle["counts"])}


def _sanitize_masks(
    record: Mapping[str, Any],
    keep: np.ndarray,
    height: int,
    width: int,
    repairs: collections.Counter,
) -> list | None:
    """The kept instances' masks of an input record (see `sanitize_record`), or None."""
    masks = record.get("masks")
    if masks is None:
        return None
    if isinstance(masks, str | bytes | Mapping) or len(masks) != len(keep):
        raise SkipRecord("malformed", f"masks must be a list of {len(keep)} (one per box)")
    frame = record.get("masks_frame_hw") or (height, width)
    out = []
    for i in np.flatnonzero(keep):
        seg = masks[int(i)]
        if seg is None:
            repairs["missing_segmentation"] += 1
            out.append(None)
            continue
        rle = segmentation_to_rle(seg, frame, (height, width))
        if rle is None:
            repairs["bad_segmentation"] += 1
        out.append(rle)
    return out


def sanitize_record(
    record: Mapping[str, Any],
    *,
    require_captions: bool = True,
    require_boxes: bool = False,
    check_image: bool = True,
    min_box_size: float = 0.0,
) -> tuple[dict[str, Any], collections.Counter]:
    """Applies the bad-record policy to one input record.

    Policy (every action is counted; nothing is dropped silently):
      skipped (raises `SkipRecord(reason)`):
        - `malformed`: no/empty `id`, no `image`, `captions` not a list of str, arrays of the wrong
          shape, `category_ids`/`iscrowd`/`objectness` lengths that do not match their boxes,
          boxes without `category_ids`;
        - `corrupt_image`: PIL cannot decode the bytes (checked with a full decode when
          `check_image`);
        - `no_captions`: no non-empty caption left and `require_captions`;
        - `no_boxes`: no valid box left and `require_boxes`.
      repaired (counted in the returned Counter):
        - `empty_caption_dropped`: blank captions are removed; others are whitespace-stripped;
        - `size_repaired`: missing or wrong `height`/`width` replaced by the decoded size;
        - `image_reencoded`: formats other than PNG/JPEG (WebP, GIF, BMP...) re-encoded as PNG;
        - `box_nonfinite_dropped`, `box_degenerate_dropped` (width or height <= `min_box_size`
          after clipping; inverted boxes included), `box_clipped` (clipped to the image), and
          the same three for `proposal_*`; `iscrowd` defaults to 0 and `objectness` to 0
          when absent;
        - masks (input `masks`: one COCO `segmentation` per box - polygons, uncompressed or
          compressed RLE - or None, in the pixel frame `masks_frame_hw` (h, w), default the
          image's; each kept box's becomes a compressed RLE in the image's frame, polygons
          scaled and RLEs resampled nearest-neighbour when the frame differs):
          `bad_segmentation` (an empty polygon list, a polygon with < 3 points, odd length or
          non-finite coordinates, an RLE whose size is not the frame or whose runs do not cover
          it) and `missing_segmentation` (None) keep the instance with its box and no mask
          (None): the box is still a valid detection target, and the mask loss ignores it.
          Masks of dropped boxes are dropped with them; `masks` without boxes is `malformed`.

    Args:
      record: input dict with the keys of the schema (`schema_version` is ignored; `source`,
        `captions`, boxes and proposals are optional).
      require_captions: skip records without a caption (image-text data).
      require_boxes: skip records without a valid box (detection training data).
      check_image: fully decode the image (catches truncated files); False trusts the bytes and
        reads only the header for the size.
      min_box_size: boxes with width or height <= this (pixels) are degenerate.

    Returns:
      (record ready for `encode_record`, Counter of repairs).
    """
    repairs: collections.Counter = collections.Counter()
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise SkipRecord("malformed", f"id must be a non-empty str, got {rid!r}")
    image = record.get("image")
    if not isinstance(image, bytes | bytearray | memoryview) or len(image) == 0:
        raise SkipRecord("malformed", "image bytes missing")
    image = bytes(image)

    # Image: decode (or at least parse the header) to learn the real format and size.
    try:
        with Image.open(io.BytesIO(image)) as im:
            fmt = (im.format or "").lower()
            if check_image or fmt not in STORED_IMAGE_FORMATS:
                im.load()
            width, height = im.size
            if fmt not in STORED_IMAGE_FORMATS:
                buf = io.BytesIO()
                im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
                image, fmt = buf.getvalue(), "png"
                repairs["image_reencoded"] += 1
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad bytes
        raise SkipRecord("corrupt_image", f"{type(e).__name__}: {e}") from e
    if record.get("height") != height or record.get("width") != width:
        repairs["size_repaired"] += 1

    captions = record.get("captions")
    if captions is None:
        captions = []
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise SkipRecord("malformed", "captions must be a list of str")
    stripped = [" ".join(c.split()) for c in captions]
    kept_captions = [c for c in stripped if c]
    if len(kept_captions) < len(stripped):
        repairs["empty_caption_dropped"] += len(stripped) - len(kept_captions)
    if require_captions and not kept_captions:
        raise SkipRecord("no_captions", "no non-empty caption")

    out: dict[str, Any] = {
        "id": rid,
        "source": str(record.get("source") or ""),
        "image": image,
        "image_format": fmt,
        "height": height,
        "width": width,
        "captions": kept_captions,
        "boxes": None,
        "category_ids": None,
        "iscrowd": None,
        "proposals": None,
        "objectness": None,
        "masks": None,
    }

    if record.get("boxes") is not None:
        boxes = _box_array(record["boxes"], "boxes", 4)
        if record.get("category_ids") is None:
            raise SkipRecord("malformed", "boxes without category_ids")
        cats = _box_array(record["category_ids"], "category_ids", None)
        crowd = record.get("iscrowd")
        crowd = np.zeros(len(boxes)) if crowd is None else _box_array(crowd, "iscrowd", None)
        if not (len(cats) == len(crowd) == len(boxes)):
            raise SkipRecord(
                "malformed",
                f"{len(boxes)} boxes, {len(cats)} category_ids, {len(crowd)} iscrowd",
            )
        keep = _repair_boxes(boxes, height, width, repairs, "box", min_box_size)
        out["boxes"] = boxes[keep].astype(np.float32)
        out["category_ids"] = cats[keep].astype(np.int32)
        out["iscrowd"] = crowd[keep] != 0
        out["masks"] = _sanitize_masks(record, keep, height, width, repairs)
    elif record.get("category_ids") is not None:
        raise SkipRecord("malformed", "category_ids without boxes")
    elif record.get("masks") is not None:
        raise SkipRecord("malformed", "masks without boxes")
    if require_boxes and (out["boxes"] is None or len(out["boxes"]) == 0):
        raise SkipRecord("no_boxes", "no valid box")

    if record.get("proposals") is not None:
        props = _box_array(record["proposals"], "proposals", 4)
        obj = record.get("objectness")
        obj = np.zeros(len(props)) if obj is None else _box_array(obj, "objectness", None)
        if len(obj) != len(props):
            raise SkipRecord("malformed", f"{len(props)} proposals, {len(obj)} objectness")
        keep = _repair_boxes(props, height, width, repairs, "proposal", min_box_size)
        out["proposals"] = props[keep].astype(np.float32)
        out["objectness"] = obj[keep].astype(np.float32)
    return out, repairs
