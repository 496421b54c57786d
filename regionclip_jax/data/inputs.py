"""The inputs of a training run, resolved from its config (the trainers' one input module).

ShapesWorld (`prepare_shapesworld`): generated into `data.shapesworld.dir` on first use, and
`data.train` / `data.val` pointed at it. Image-text pipelines (`image_text_dataset`): the pretraining
pipeline with `config.data`'s settings, for modes `clip` and `pretrain`.

Detection data (`prepare`, `training_dataset`, `evaluation_dataset`), for modes `detect` and `rpn`:

`prepare(config, workdir)` resolves where a detection run reads from:
  - `data.shapesworld.dir`: ShapesWorld (generated there on first use); its categories carry
    their open-vocabulary `split` (7 base shapes, 3 novel);
  - `detect.train_json` / `detect.val_json`: COCO-format instances jsons (a user's own data set
    needs nothing else). Each is converted once into shards under `WORKDIR/shards/{train,val}`
    (resumable; a later run reuses them when the json has not changed). Images are read from
    `detect.image_root` (`val_image_root`), or from the json's own directory when empty;
  - `data.train` / `data.val`: shards converted beforehand (`regionclip-jax make-shards
    detection`), with `detect.val_json` for evaluation.

Categories and classes: the evaluated categories are those of the evaluation json (for
`detect.split = "coco48_17"` the 65 of the OVR-CNN benchmark, for "lvis" all 1203), each with its
split: from `detect.split`, else the json's own `split` field, else "base". Train classes are the
base categories (`detect.train_classes = "base"`, OVD) or all of them ("all", fully supervised),
in category-id order; test classes are all evaluated categories in id order. Boxes of categories
outside the train classes are dropped from training (the pipeline's `category_map`); with a
named split the training json is also converted with `keep="base"` and images left without boxes
are skipped, as OVR-CNN's base json does (detectron2 FILTER_EMPTY_ANNOTATIONS).

Checks of a user's json (before anything trains) name the problem: a json that is not
COCO-format, entries missing required fields, annotations with category ids not in
`categories` (an error here, not silently dropped: a typo in a class list would otherwise lose
boxes), no images, or a training set with no box of a training class.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import msgpack
import numpy as np
from jax.experimental import multihost_utils

from regionclip_jax.data import shapesworld
from regionclip_jax.data.convert_detection import AnnotationError, convert_detection
from regionclip_jax.data.detection_pipeline import make_detection_dataset, record_category_sets
from regionclip_jax.data.ov_splits import category_split
from regionclip_jax.data.pipeline import make_pretrain_dataset


def prepare_shapesworld(config: ml_collections.ConfigDict) -> None:
    """Generates ShapesWorld into `config.data.shapesworld.dir` if it is not there yet and points
    `data.train` / `data.val` at it (in place; the config must be unlocked or have the keys)."""
    sw = config.data.shapesworld
    if not sw.dir:
        return
    if not os.path.exists(os.path.join(sw.dir, "shapesworld.json")):
        if jax.process_index() == 0:
            print(f"generating ShapesWorld ({sw.num_train} + {sw.num_val} images) in {sw.dir}")
            shapesworld.generate(
                sw.dir,
                num_train=int(sw.num_train),
                num_val=int(sw.num_val),
                seed=int(sw.seed),
                image_size=int(sw.image_size),
                min_objects=int(sw.min_objects),
                max_objects=int(sw.max_objects),
                small_size=tuple(float(x) for x in sw.small_size),
                large_size=tuple(float(x) for x in sw.large_size),
                color_mention=float(sw.color_mention),
                size_mention=float(sw.size_mention),
                max_mentions=int(sw.get("max_mentions", 3)),
                train_novel_weight=float(sw.get("train_novel_weight", 1.0)),
            )
        # Multi-host: other processes must wait for process 0 (shared file system assumed).
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("shapesworld_generated")
    if not config.data.train:
        config.data.train = os.path.join(sw.dir, "train")
    if not config.data.val and int(sw.num_val) > 0:
        config.data.val = os.path.join(sw.dir, "val")


def image_text_dataset(
    config: ml_collections.ConfigDict,
    path: str,
    batch: int,
    shard_index: int,
    shard_count: int,
    *,
    train: bool,
    boxes: str | None = None,
    max_boxes: int = 100,
) -> grain.IterDataset:
    """The pretraining pipeline with `config.data`'s resize/canvas/caption settings.

    train=True: shuffled, endless, workers and flips as configured; False: one ordered epoch.
    """
    d = config.data
    return make_pretrain_dataset(
        path,
        batch_size=batch,
        canvas=tuple(int(x) for x in d.canvas),
        min_size=int(d.min_size),
        max_size=int(d.max_size) if d.max_size else None,
        boxes=boxes,
        max_boxes=max_boxes,
        seed=int(config.seed),
        shard_index=shard_index,
        shard_count=shard_count,
        num_workers=int(d.num_workers) if train else 0,
        flip=bool(d.flip) and train,
        shuffle=train,
        num_epochs=None if train else 1,
        drop_remainder=True,
        context_length=int(d.context_length),
    )


@dataclasses.dataclass
class DetectionData:
    """Where a detection run reads from, and its classes.

    Attributes:
      train: training shards ("" for zero-shot evaluation without a training set).
      val: evaluation shards.
      val_json: COCO-format json of the evaluation set (pycocotools / LVIS ground truth).
      categories: the evaluated categories (json entries, id order), each with "split".
      train_ids: category ids of the train classes (label k = train_ids[k]).
      test_ids: category ids of the test classes (label k = test_ids[k]).
    """

    train: str
    val: str
    val_json: str
    categories: list[dict[str, Any]]
    train_ids: list[int]
    test_ids: list[int]

    @property
    def train_names(self) -> list[str]:
        return [class_name(self._by_id[i]) for i in self.train_ids]

    @property
    def test_names(self) -> list[str]:
        return [class_name(self._by_id[i]) for i in self.test_ids]

    @property
    def _by_id(self) -> dict[int, dict]:
        return {int(c["id"]): c for c in self.categories}

    def train_category_map(self) -> dict[int, int]:
        return {cid: k for k, cid in enumerate(self.train_ids)}

    def test_category_map(self) -> dict[int, int]:
        return {cid: k for k, cid in enumerate(self.test_ids)}

    def splits(self) -> dict[int, str]:
        return {int(c["id"]): c["split"] for c in self.categories}


def class_name(category: Mapping[str, Any]) -> str:
    """The prompt name of a category: LVIS-style `baseball_bat` -> "baseball bat"."""
    return str(category["name"]).replace("_", " ").strip()


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise AnnotationError(f"{what} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{what} {path}: not valid json ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise AnnotationError(f"{what} {path}: no 'categories' list: not a COCO-format json")
    if not isinstance(data.get("images"), list) or not data["images"]:
        raise AnnotationError(f"{what} {path}: no images (the 'images' list is empty or missing)")
    return data


def split_categories(categories: list[dict], split: str) -> list[dict]:
    """Categories (id order) with their "split"; "excluded" ones (COCO's 15) left out."""
    if split:
        sides = category_split(split, categories)
    else:
        sides = {int(c["id"]): str(c.get("split", "base")) for c in categories}
    bad = sorted({s for s in sides.values()} - {"base", "novel", "excluded"})
    if bad:
        raise AnnotationError(f"category 'split' values must be base/novel, found {bad}")
    out = [dict(c, split=sides[int(c["id"])]) for c in categories]
    return sorted((c for c in out if c["split"] != "excluded"), key=lambda c: int(c["id"]))


def _convert(
    json_path: str, image_root: str, out_dir: str, *, split: str, keep: str, empty: str
) -> None:
    manifest = os.path.join(out_dir, "manifest.json")
    stamp = (
        f"{os.path.abspath(json_path)}:{os.path.getsize(json_path)}:{os.path.getmtime(json_path)}"
    )
    stamp_file = os.path.join(out_dir, "source.txt")
    if os.path.exists(manifest) and os.path.exists(stamp_file):
        with open(stamp_file) as f:
            same = f.read() == stamp
        if same:
            return
        raise AnnotationError(
            f"{out_dir} holds shards of a different version of {json_path}: delete it to "
            "convert again"
        )
    print(f"converting {json_path} -> {out_dir} (images from {image_root})", flush=True)
    convert_detection(
        json_path,
        image_root,
        out_dir,
        split=split or None,
        keep=keep,
        empty_images=empty,
        unknown_categories="error",
    )
    with open(stamp_file, "w") as f:
        f.write(stamp)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> DetectionData:
    """Resolves (and if needed generates / converts) the data of a detection run."""
    d, t = config.data, config.detect
    split = str(t.split)
    if d.shapesworld.dir:
        prepare_shapesworld(config)
        root = str(d.shapesworld.dir)
        train, val = str(d.train), str(d.val)
        val_json = str(t.val_json) or os.path.join(root, "annotations", "instances_val.json")
    else:
        val_json = str(t.val_json)
        train, val = str(d.train), str(d.val)
        if jax.process_index() == 0:
            if t.train_json and not train:
                named = split in ("coco48_17", "lvis") and t.train_classes == "base"
                _read_json(str(t.train_json), "detect.train_json")
                _convert(
                    str(t.train_json),
                    str(t.image_root) or os.path.dirname(os.path.abspath(str(t.train_json))),
                    os.path.join(workdir, "shards", "train"),
                    split=split,
                    keep="base" if named else "all",
                    empty="skip",
                )
            if val_json and not val:
                _read_json(val_json, "detect.val_json")
                root = str(t.val_image_root) or str(t.image_root)
                _convert(
                    val_json,
                    root or os.path.dirname(os.path.abspath(val_json)),
                    os.path.join(workdir, "shards", "val"),
                    split=split,
                    keep="all",
                    empty="keep",
                )
        _barrier("detection_data_converted")
        if t.train_json and not train:
            train = os.path.join(workdir, "shards", "train")
        if val_json and not val:
            val = os.path.join(workdir, "shards", "val")
    if not val_json:
        raise AnnotationError("detect.val_json: the evaluation set's COCO-format json is needed")
    categories = split_categories(_read_json(val_json, "detect.val_json")["categories"], split)
    if not categories:
        raise AnnotationError(f"{val_json}: no category left to evaluate")
    test_ids = [int(c["id"]) for c in categories]
    if t.train_classes == "all":
        train_ids = list(test_ids)
    else:
        train_ids = [int(c["id"]) for c in categories if c["split"] == "base"]
    if not train_ids:
        raise AnnotationError(f"{val_json}: no base category to train on")
    return DetectionData(train, val, val_json, categories, train_ids, test_ids)


def check_training_boxes(source: Any, category_map: Mapping[int, int], where: str) -> int:
    """Number of training records with a box of a train class; raises when there is none."""
    sets = record_category_sets(source, category_map)
    n = sum(1 for s in sets if len(s))
    if n == 0:
        raise AnnotationError(
            f"{where}: no training image has a box of the {len(category_map)} training classes "
            f"(category ids {sorted(category_map)[:10]}...)"
        )
    return n


def _has_masks_fast(data: bytes) -> bool:
    """Whether an encoded record has at least one instance mask, without decoding its image."""
    up = msgpack.Unpacker(io.BytesIO(data), raw=False)
    for _ in range(up.read_map_header()):
        key = up.unpack()
        if key == "masks":
            masks = up.unpack()  # nil, or one RLE map (or nil: no usable mask) per box
            return masks is not None and any(m is not None for m in masks)
        up.skip()
    return False


def check_training_masks(source: Any, where: str) -> int:
    """Number of training records that carry instance masks; raises when none does.

    With `detect.mask_on` and no mask in the data the mask head would get no loss at all (every
    instance `mask_valid` False): shards written before masks existed, or converted from a json
    without `segmentation`. That is refused before training, naming the data and the way out.
    """
    n = 0
    for i in range(len(source)):
        _, data = source[i]
        n += data is not None and _has_masks_fast(data)
    if n == 0:
        raise AnnotationError(
            f"{where}: detect.mask_on is set but no training record carries instance masks "
            "(the annotations have no `segmentation`, or the shards / ShapesWorld data were made "
            "before masks existed: regenerate them), so the mask head would learn nothing; "
            "convert a json with segmentations or set detect.mask_on=False"
        )
    return n


def _record_id_fast(data: bytes) -> str | None:
    up = msgpack.Unpacker(io.BytesIO(data), raw=False)
    for _ in range(up.read_map_header()):
        key = up.unpack()
        if key == "id":
            return str(up.unpack())
        up.skip()
    return None


def record_image_ids(source: Any, val_json: str) -> np.ndarray:
    """int64[N]: the json image id of every record of an evaluation source (-1 if unknown).

    Records converted from a json carry the image id as their `id`; ShapesWorld records carry a
    record id the json lists as `record_id`.
    """
    data = _read_json(val_json, "detect.val_json")
    lookup: dict[str, int] = {}
    for img in data["images"]:
        lookup[str(img["id"])] = int(img["id"])
        if "record_id" in img:
            lookup[str(img["record_id"])] = int(img["id"])
    out = np.full((len(source),), -1, np.int64)
    for i in range(len(source)):
        _, raw = source[i]
        rid = None if raw is None else _record_id_fast(raw)
        if rid is not None:
            out[i] = lookup.get(rid, -1)
    return out


def training_dataset(
    config: ml_collections.ConfigDict,
    category_map: Mapping[int, int],
    shard_index: int,
    shard_count: int,
    *,
    repeat_threshold: float | None = None,
):
    """This process's uint8 training batches (`make_detection_dataset`) under `config`'s
    data / detect settings: multi-scale `detect.train_sizes`, flips, `category_map` labels, and
    with `detect.mask_on` the GT instance masks (`gt_masks`, `mask_valid`) at
    `detect.mask_scale` of the canvas."""
    d, t = config.data, config.detect
    mask_scale = float(t.get("mask_scale", 0.25)) if bool(t.mask_on) else None
    return make_detection_dataset(
        d.train,
        batch_size=int(d.batch_size) // shard_count,
        canvas=tuple(int(x) for x in d.canvas),
        train_sizes=tuple(int(x) for x in t.train_sizes),
        max_size=int(d.max_size) or None,
        max_boxes=int(t.max_boxes),
        category_map=category_map,
        repeat_threshold=repeat_threshold,
        seed=int(config.seed),
        shard_index=shard_index,
        shard_count=shard_count,
        num_workers=int(d.num_workers),
        flip=bool(d.flip),
        normalize=False,
        mask_scale=mask_scale,
    )


def evaluation_dataset(
    config: ml_collections.ConfigDict,
    source: Any,
    category_map: Mapping[int, int],
    *,
    shard_index: int = 0,
    shard_count: int = 1,
):
    """One ordered epoch of uint8 evaluation batches of `detect.eval_batch_size` at
    `detect.test_size`, no flips; the last batch may be short (see `pad_batch`)."""
    d, t = config.data, config.detect
    return make_detection_dataset(
        source=source,
        batch_size=int(t.eval_batch_size),
        canvas=tuple(int(x) for x in d.canvas),
        train_sizes=(int(t.test_size),),
        max_size=int(d.max_size) or None,
        max_boxes=int(t.max_boxes),
        category_map=category_map,
        shard_index=shard_index,
        shard_count=shard_count,
        flip=False,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        normalize=False,
    )


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
    """`batch` zero-padded to `size` examples (one compiled shape for a short last batch);
    returns it and the number of real examples."""
    n = len(batch["image_hw"])
    if n == size:
        return dict(batch), n
    out = {}
    for k, v in batch.items():
        pad = np.zeros((size - n,) + v.shape[1:], v.dtype)
        if k == "image_hw":
            pad[:] = 32  # any valid size: padded examples are discarded
        out[k] = np.concatenate([v, pad])
    return out, n
