"""The shard record schema (version 1): one image with its captions, boxes and proposals.

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
  | `proposals`      | float32[P, 4] xyxy pixels, or None   | array map or nil                     |
  | `objectness`     | float32[P], or None                  | array map or nil                     |

Boxes are absolute `xyxy` in the pixel frame of the stored image: pixel (i, j) covers
[j, j+1) x [i, i+1), so a box enclosing pixel columns 3..7 is x1=3, x2=8 (COCO's `xywh` becomes
`[x, y, x + w, y + h]`). `category_ids` are the data set's own ids (COCO ids, not contiguous
indices). `boxes`, `category_ids` and `iscrowd` are present together or not at all; so are
`proposals` and `objectness`. None means "not annotated"; an empty [0, 4] array means "annotated,
no objects".

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
    return msgpack.packb(out, use_bin_type=True)


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
          when absent.

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
    elif record.get("category_ids") is not None:
        raise SkipRecord("malformed", "category_ids without boxes")
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
