"""Detection converters: COCO-format instances json (users' own data sets too) and LVIS v1 json.

  regionclip-jax make-shards detection --annotations instances_train2017.json \
      --image-root coco/train2017 --out shards/coco_train_base --split coco48_17 --keep base \
      --empty-images skip --workers 8

Each image becomes one record: its boxes (COCO `[x, y, w, h]` -> `[x, y, x + w, y + h]` float32
xyxy pixels), `category_ids` (the json's ids, not contiguous indices) and `iscrowd` (0 when absent,
as in LVIS). Captions are empty. Writing, parallelism, resuming and the merged manifest are those
of `convert_imagetext.convert_parts`.

Checks of the json (a user's own data set is checked the same way):
  - a file that is empty, not UTF-8 or not valid JSON: an error naming it (and the line);
  - missing or empty `images` / `annotations`, missing `categories`, an image without `id` (or without
    `file_name` and `coco_url`), an annotation without `image_id` / `category_id` / a 4-number
    `bbox`: `AnnotationError` naming the first offending entries and how many there are
    (nothing is written);
  - annotation whose `category_id` is not in `categories`: dropped and counted
    (`repaired.annotation_unknown_category_dropped`), or `AnnotationError` with
    `unknown_categories="error"`;
  - annotation whose `image_id` is not in `images`: dropped, counted
    (`repaired.annotation_unknown_image_dropped`);
  - image with no annotation: kept with an empty [0, 4] box array (`empty_images="keep"`, the
    default: evaluation sets need them) or skipped and counted as `skipped.no_boxes`
    (`empty_images="skip"`, what OVR-CNN does for its base training json);
  - an image whose `width` / `height` differ from the image file's: `SizeMismatchError` naming
    the image, the recorded and the real size (`size_mismatch="error"`, the default; detectron2
    raises too), or its boxes are scaled to the real size (`size_mismatch="rescale"`, counted as
    `repaired.boxes_rescaled_to_image`). The check reads the image header while writing;
  - boxes partly outside the image are clipped, degenerate (w or h <= 0 after clipping) and
    non-finite boxes dropped, each counted (schema.sanitize_record); an image file that is
    missing is skipped as `missing_file`, one that does not decode as `corrupt_image`.

Instance masks: when any annotation of the json has a `segmentation`, every record stores
`masks` (schema.py), one per kept box: the annotation's polygons (list of [x0, y0, x1, y1, ...]),
uncompressed RLE (`counts` a list, as COCO's crowd annotations) or compressed RLE (`counts` a
str), rasterised / re-encoded with `pycocotools.mask` (frPyObjects, merge) into a compressed RLE
in the stored image's frame. With `size_mismatch="rescale"` masks scale with the boxes (polygon
coordinates scaled exactly, RLEs resampled nearest-neighbour). Counted, never silently kept:
  - `repaired.bad_segmentation`: an empty polygon list, a polygon with < 3 points, an odd number
    of or non-finite coordinates, an RLE whose `size` is not the image's (json) size or whose runs
    do not cover it;
  - `repaired.missing_segmentation`: an annotation without `segmentation` in a json that has them
    elsewhere.
Both keep the instance with its box and no mask (None; the pipeline's `mask_valid` is False, so
the mask loss ignores it): the box is still a valid box target. A json without any segmentation
writes `masks` None (and the same parts as before masks existed); `metadata.masks` says which.

Open-vocabulary splits (`split`, `keep`; ov_splits.py): with `split="coco48_17"` annotations of
the 15 COCO categories outside the 65 are removed (as OVR-CNN does; counted in
`metadata.annotations.outside_split`); `keep="base"` / `"novel"` keeps one side (the other side's
annotations counted in `metadata.annotations.other_side`). `split="lvis"`: base = frequent +
common, novel = rare (from `frequency`). The manifest's `metadata.categories` lists every category
with its `split`, and `metadata.category_map` maps the kept category ids to contiguous labels
0..C-1 in id order (pass it to the pipelines' `category_map`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from typing import Any

from regionclip_jax.data.convert_imagetext import (
    SizeMismatchError,
    _chunk_parts,
    _describe_item,
    convert_parts,
)
from regionclip_jax.data.input_files import load_json_file

__all__ = ["AnnotationError", "SizeMismatchError", "convert_detection", "load_detection_json"]
from regionclip_jax.data.ov_splits import category_split


class AnnotationError(ValueError):
    """The annotation json cannot be converted; the message names the offending entries."""


def _fail_if(bad: list, what: str, path: str) -> None:
    if bad:
        shown = "; ".join(str(b) for b in bad[:3])
        raise AnnotationError(f"{path}: {len(bad)} {what}, e.g. {shown}")


def _image_path(img: Mapping[str, Any], image_root: str) -> str:
    if img.get("file_name"):
        return os.path.join(image_root, img["file_name"])
    # LVIS v1 has no file_name: its images are COCO's, named by coco_url ".../train2017/X.jpg".
    split_dir, name = img["coco_url"].rstrip("/").split("/")[-2:]
    nested = os.path.join(image_root, split_dir, name)
    return nested if os.path.exists(nested) else os.path.join(image_root, name)


def load_detection_json(
    path: str,
    *,
    split: str | None = None,
    keep: str = "all",
    unknown_categories: str = "drop",
) -> tuple[dict, dict[int, list[dict]], dict[str, Any], collections.Counter]:
    """Reads and checks a COCO/LVIS instances json (see the module docstring).

    Returns:
      (data, annotations per image id (filtered), category metadata
      {"categories": [...], "category_map": {id: label}}, counts of dropped annotations).
    """
    if keep not in ("all", "base", "novel"):
        raise ValueError(f"keep must be 'all', 'base' or 'novel', got {keep!r}")
    if keep != "all" and split is None:
        raise ValueError(f"keep={keep!r} needs a split (coco48_17 or lvis)")
    if unknown_categories not in ("drop", "error"):
        raise ValueError("unknown_categories must be 'drop' or 'error'")
    data = load_json_file(path, "COCO-format instances json")
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: not a COCO-format json object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: no {key!r} list: not a COCO-format instances json")
    for key in ("images", "annotations"):
        if not data[key]:
            raise AnnotationError(f"{path}: the {key!r} list is empty: nothing to convert")
    _fail_if(
        [f"categories[{i}]={c}" for i, c in enumerate(data["categories"]) if "id" not in c],
        "categories without 'id'",
        path,
    )
    _fail_if(
        [
            f"images[{i}]={img}"
            for i, img in enumerate(data["images"])
            if "id" not in img or not (img.get("file_name") or img.get("coco_url"))
        ],
        "images without 'id' or 'file_name'",
        path,
    )

    def bad_ann(a):
        if "image_id" not in a or "category_id" not in a or "bbox" not in a:
            return True
        b = a["bbox"]
        return not (
            isinstance(b, list | tuple)
            and len(b) == 4
            and all(isinstance(v, int | float) for v in b)
        )

    _fail_if(
        [
            f"annotations[{i}] (id {a.get('id')}): keys {sorted(a)}"
            for i, a in enumerate(data["annotations"])
            if bad_ann(a)
        ],
        "annotations without 'image_id', 'category_id' or a 4-number 'bbox'",
        path,
    )

    cats = data["categories"]
    sides = category_split(split, cats) if split else {int(c["id"]): "base" for c in cats}
    cat_ids = {int(c["id"]) for c in cats}
    image_ids = {img["id"] for img in data["images"]}
    unknown = [a for a in data["annotations"] if int(a["category_id"]) not in cat_ids]
    if unknown and unknown_categories == "error":
        _fail_if(
            [f"annotation {a.get('id')}: category_id {a['category_id']}" for a in unknown],
            "annotations with a category_id not in 'categories'",
            path,
        )
    counts: collections.Counter = collections.Counter()
    per_image: dict[Any, list[dict]] = collections.defaultdict(list)
    for a in data["annotations"]:
        cid = int(a["category_id"])
        if cid not in cat_ids:
            counts["annotation_unknown_category_dropped"] += 1
        elif a["image_id"] not in image_ids:
            counts["annotation_unknown_image_dropped"] += 1
        elif sides[cid] == "excluded":
            counts["outside_split"] += 1
        elif keep != "all" and sides[cid] != keep:
            counts["other_side"] += 1
        else:
            per_image[a["image_id"]].append(a)
    kept_ids = sorted(
        cid for cid, s in sides.items() if s != "excluded" and (keep == "all" or s == keep)
    )
    meta = {
        "categories": [
            {
                "id": int(c["id"]),
                "name": c.get("name"),
                "split": sides[int(c["id"])] if split else None,
                **({"frequency": c["frequency"]} if "frequency" in c else {}),
            }
            for c in cats
        ],
        "category_map": {str(cid): k for k, cid in enumerate(kept_ids)},
    }
    return data, per_image, meta, counts


def has_segmentation(data: Mapping[str, Any]) -> bool:
    """Whether any annotation of the json carries a `segmentation` (then masks are stored)."""
    return any(a.get("segmentation") is not None for a in data["annotations"])


def _mask_fields(img: Mapping[str, Any], anns: list[dict]) -> dict[str, Any]:
    """The item's raw segmentations (one per annotation, None where absent) and their frame.

    They are rasterised by the part writers (schema.sanitize_record, in parallel), once the
    image's real size is known: with `size_mismatch="rescale"` the frame (the json's size)
    differs from the file's and the masks are scaled with the boxes.
    """
    frame = None
    if img.get("height") is not None and img.get("width") is not None:
        frame = [int(img["height"]), int(img["width"])]
    return {"masks": [a.get("segmentation") for a in anns], "masks_frame_hw": frame}


def detection_parts(
    data: dict,
    per_image: Mapping[Any, list[dict]],
    image_root: str,
    source: str,
    part_size: int,
    size_mismatch: str = "error",
    masks: bool = False,
):
    """Parts of the images of a loaded json (records in the json's image order).

    With `masks`, items carry each annotation's `segmentation` (`_mask_fields`); without, they
    are the items (and part fingerprints) of a json without segmentations.
    """
    items = []
    for img in data["images"]:
        anns = per_image.get(img["id"], [])
        items.append(
            {
                "id": str(img["id"]),
                "source": source,
                "path": _image_path(img, image_root),
                "captions": [],
                "height": img.get("height"),
                "width": img.get("width"),
                "boxes": [
                    [float(x), float(y), float(x) + float(w), float(y) + float(h)]
                    for x, y, w, h in (a["bbox"] for a in anns)
                ],
                "category_ids": [int(a["category_id"]) for a in anns],
                "iscrowd": [int(a.get("iscrowd", 0)) for a in anns],
                "size_mismatch": size_mismatch,
                **(_mask_fields(img, anns) if masks else {}),
            }
        )
    return list(_chunk_parts(items, part_size, _describe_item))


def convert_detection(
    annotations: str,
    image_root: str,
    out_dir: str,
    *,
    split: str | None = None,
    keep: str = "all",
    empty_images: str = "keep",
    unknown_categories: str = "drop",
    size_mismatch: str = "error",
    source: str | None = None,
    part_size: int = 2000,
    num_workers: int = 0,
    resume: bool = True,
    check_images: bool = True,
    min_box_size: float = 0.0,
    progress: Callable[[int], Any] | None = None,
    set_total: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Converts a COCO/LVIS instances json + image folder to shards; returns the manifest.

    Args:
      annotations: the json file.
      image_root: folder the images' `file_name`s (LVIS: `coco_url` tails) are relative to.
      out_dir: output folder.
      split: None, "coco48_17" or "lvis" (ov_splits.py).
      keep: "all", "base" or "novel" annotations (with a split).
      empty_images: "keep" (empty box array) or "skip" (counted as `no_boxes`).
      unknown_categories: "drop" (counted) or "error".
      size_mismatch: an image whose json size differs from its file's: "error"
        (`SizeMismatchError` naming it) or "rescale" (boxes scaled to the file's size).
      source: records' `source` (default: the json's base name).
      part_size: images per part (unit of parallel work and of resuming).
      num_workers, resume, check_images, min_box_size, progress, set_total: see
        `convert_parts`.
    """
    if empty_images not in ("keep", "skip"):
        raise ValueError(f"empty_images must be 'keep' or 'skip', got {empty_images!r}")
    if size_mismatch not in ("error", "rescale"):
        raise ValueError(f"size_mismatch must be 'error' or 'rescale', got {size_mismatch!r}")
    data, per_image, meta, counts = load_detection_json(
        annotations, split=split, keep=keep, unknown_categories=unknown_categories
    )
    source = source or os.path.splitext(os.path.basename(annotations))[0]
    masks = has_segmentation(data)
    parts = detection_parts(data, per_image, image_root, source, part_size, size_mismatch, masks)
    repaired = {k: v for k, v in counts.items() if k.startswith("annotation_")}
    meta.update(
        converter="detection",
        annotations_file=os.path.abspath(annotations),
        split=split,
        keep=keep,
        empty_images=empty_images,
        size_mismatch=size_mismatch,
        masks=masks,
        annotations={
            "in_json": len(data["annotations"]),
            "kept": sum(len(v) for v in per_image.values()),
            "outside_split": counts.get("outside_split", 0),
            "other_side": counts.get("other_side", 0),
            **repaired,
        },
    )
    return convert_parts(
        out_dir,
        parts,
        source=source,
        require_captions=False,
        require_boxes=empty_images == "skip",
        check_images=check_images,
        min_box_size=min_box_size,
        num_workers=num_workers,
        resume=resume,
        metadata=meta,
        extra_repaired=repaired,
        progress=progress,
        set_total=set_total,
    )
