"""tensorflow-datasets as a data source: a ShapesWorld builder, and an adapter for tfds detection data.

No TensorFlow is needed (checked with tfds 4.9.10 and no `tensorflow` installed): building works
because images are handed to tfds already encoded (PNG bytes), the files are ArrayRecord, and
reading goes through `builder.as_data_source()` / `tfds.data_source(...)` (NumPy, no tf.data).
`tfds.load` and `builder.as_dataset` need TensorFlow and are not used.

Build ShapesWorld as a tfds data set::

    builder = build_shapesworld_tfds("~/tensorflow_datasets", num_train=1000, num_val=200)
    source = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})["train"]

Its features follow the layout of tfds `coco/2017`: `image` (PNG), `image/id` (int64, the scene
index), `image/filename`, `objects/bbox` (tfds BBox: normalised [ymin, xmin, ymax, xmax]),
`objects/label` (ClassLabel over the 10 shape names: label = category id - 1),
`objects/is_crowd`, plus `captions` (the 5 ShapesWorld captions). Scenes are those of
`shapesworld.render_scene(index, seed=seed, split=...)` (splits "train" and "validation"; the
latter is ShapesWorld's "val"). tfds stores examples in a hash order, not index order: look
scenes up by `image/id`.

`TfdsDetectionSource` turns any tfds detection data source with that layout (e.g. `coco/2017`
prepared as ArrayRecord elsewhere) into our records: boxes become absolute xyxy pixels
(x = xmin * width, y = ymin * height), category ids are the ClassLabel indices plus
`label_offset` (they are the tfds data set's own ids; map them with `category_map` in the
pipelines), crowd flags come from `objects/is_crowd` when present. `source[i]` gives
`(i, encoded record bytes)`, the element type of our shard sources, so the detection pipeline
reads it directly (`detection_pipeline.make_detection_dataset(source=...)`); `write_shards`
materialises it as shards. Records go through the bad-record policy (boxes clipped, degenerate
boxes dropped, undecodable images skipped with a warning).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from regionclip_jax.data import shapesworld
from regionclip_jax.data.schema import SkipRecord, encode_record, sanitize_record
from regionclip_jax.data.shards import ShardWriter

log = logging.getLogger(__name__)

try:  # tfds is optional: everything else in regionclip_jax.data works without it
    import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover - exercised only where tfds is missing
    tfds = None


def _require_tfds():
    if tfds is None:
        raise ImportError("tensorflow-datasets is not installed: pip install tensorflow-datasets")
    return tfds


if tfds is not None:

    @dataclasses.dataclass
    class ShapesWorldTfdsConfig(tfds.core.BuilderConfig):
        """Sizes and seed of the generated data set (ShapesWorld's arguments)."""

        num_train: int = 1000
        num_val: int = 200
        seed: int = 0
        image_size: int = 128

    class ShapesWorldTfds(tfds.core.GeneratorBasedBuilder):
        """ShapesWorld (docs/shapesworld.md) as a tfds builder; write with file_format="array_record"."""

        name = "shapesworld"
        VERSION = tfds.core.Version(f"1.0.{shapesworld.GENERATOR_VERSION}")
        RELEASE_NOTES = {
            str(VERSION): f"ShapesWorld generator version {shapesworld.GENERATOR_VERSION}"
        }
        BUILDER_CONFIGS = [ShapesWorldTfdsConfig(name="default")]
        # tfds 4.9.10 locates a builder's code folder (for a checksums file) with
        # `importlib_resources`, a package it does not depend on, and fails for builders defined
        # in an installed package. This builder downloads nothing, so it has no checksums: no path.
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "image/id": tfds.features.Scalar(np.int64),
                    "image/filename": tfds.features.Text(),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=list(shapesworld.SHAPES)),
                            "is_crowd": tfds.features.Scalar(np.bool_),
                        }
                    ),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self,
                description="ShapesWorld: procedural scenes of shapes with boxes and captions.",
                features=features,
                homepage="docs/shapesworld.md",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            c = self.builder_config
            # tfds refuses empty splits: a split of 0 scenes is left out.
            splits = {"train": ("train", c.num_train), "validation": ("val", c.num_val)}
            return {
                name: self._generate_examples(split, num)
                for name, (split, num) in splits.items()
                if num > 0
            }

        def _generate_examples(self, split: str, num: int):
            c = self.builder_config
            config = shapesworld.ShapesWorldConfig(image_size=c.image_size)
            s = float(c.image_size)
            for index in range(num):
                scene = shapesworld.render_scene(index, seed=c.seed, split=split, config=config)
                objects = [
                    {
                        "bbox": tfds.features.BBox(
                            ymin=o.box[1] / s,
                            xmin=o.box[0] / s,
                            ymax=o.box[3] / s,
                            xmax=o.box[2] / s,
                        ),
                        "label": shapesworld.SHAPES.index(o.shape),
                        "is_crowd": False,
                    }
                    for o in scene.kept
                ]
                yield (
                    index,
                    {
                        "image": shapesworld.encode_image(scene.image, "png"),
                        "image/id": index,
                        "image/filename": f"{split}/{index:08d}.png",
                        "captions": list(scene.captions),
                        "objects": objects,
                    },
                )


def build_shapesworld_tfds(
    data_dir: str | os.PathLike,
    *,
    num_train: int = 1000,
    num_val: int = 200,
    seed: int = 0,
    image_size: int = 128,
    config_name: str | None = None,
):
    """Builds (or finds already built) ShapesWorld in tfds ArrayRecord format; returns the builder.

    `config_name` names the builder config (a folder under `data_dir/shapesworld/`); by default
    it encodes the arguments, so different sizes do not overwrite each other.
    """
    _require_tfds()
    name = config_name or f"n{num_train}_v{num_val}_s{seed}_px{image_size}"
    config = ShapesWorldTfdsConfig(
        name=name, num_train=num_train, num_val=num_val, seed=seed, image_size=image_size
    )
    builder = ShapesWorldTfds(
        config=config, data_dir=os.fspath(os.path.expanduser(data_dir)), file_format="array_record"
    )
    builder.download_and_prepare()
    return builder


def _get(example: Mapping[str, Any], key: str):
    """Looks up "a/b" in a nested dict or as a flat key."""
    if key in example:
        return example[key]
    node: Any = example
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


class TfdsDetectionSource:
    """Random-access records (schema.py) over a tfds detection data source.

    Args:
      data_source: a tfds data source for one split (`builder.as_data_source(...)[split]` or
        `tfds.data_source(name, split=...)`); pass `decoders={"image": SkipDecoding()}` to keep
        the encoded bytes (otherwise decoded images are re-encoded as PNG).
      image_key, bbox_key, label_key, crowd_key, id_key, captions_key: feature paths ("a/b" for
        nested features). Missing crowd / captions features mean none.
      label_offset: category id = label + label_offset.
      source_name: the records' `source`.
    """

    def __init__(
        self,
        data_source,
        *,
        image_key: str = "image",
        bbox_key: str = "objects/bbox",
        label_key: str = "objects/label",
        crowd_key: str = "objects/is_crowd",
        id_key: str = "image/id",
        captions_key: str | None = "captions",
        label_offset: int = 0,
        source_name: str = "tfds",
    ):
        self.data_source = data_source
        self.keys = dict(
            image=image_key, bbox=bbox_key, label=label_key, crowd=crowd_key, id=id_key,
            captions=captions_key,
        )  # fmt: skip
        self.label_offset = int(label_offset)
        self.source_name = source_name

    def __len__(self) -> int:
        return len(self.data_source)

    def record(self, index: int) -> dict[str, Any]:
        """The sanitised record dict of example `index` (raises `SkipRecord` for bad ones)."""
        ex = self.data_source[int(index)]
        k = self.keys
        image = _get(ex, k["image"])
        if isinstance(image, np.ndarray):
            buf = io.BytesIO()
            Image.fromarray(image.astype(np.uint8)).save(buf, format="PNG", compress_level=1)
            image = buf.getvalue()
        with Image.open(io.BytesIO(image)) as im:
            width, height = im.size
        bbox = _get(ex, k["bbox"])
        bbox = np.asarray(bbox if bbox is not None else [], np.float64).reshape(-1, 4)
        boxes = np.stack(
            [bbox[:, 1] * width, bbox[:, 0] * height, bbox[:, 3] * width, bbox[:, 2] * height],
            axis=1,
        )
        labels = np.asarray(_get(ex, k["label"]) or [], np.int64).reshape(-1)
        crowd = _get(ex, k["crowd"])
        crowd = np.zeros(len(boxes), bool) if crowd is None else np.asarray(crowd, bool).reshape(-1)
        captions = _get(ex, k["captions"]) if k["captions"] else None
        captions = [c.decode() if isinstance(c, bytes) else str(c) for c in (captions or [])]
        rid = _get(ex, k["id"])
        rid = f"{self.source_name}-{int(rid) if rid is not None else index}"
        rec, _ = sanitize_record(
            {
                "id": rid,
                "source": self.source_name,
                "image": image,
                "height": height,
                "width": width,
                "captions": captions,
                "boxes": boxes,
                "category_ids": labels + self.label_offset,
                "iscrowd": crowd,
            },
            require_captions=False,
            check_image=False,
        )
        return rec

    def __getitem__(self, index: int) -> tuple[int, bytes | None]:
        index = int(index)
        try:
            return index, encode_record(self.record(index))
        except (SkipRecord, OSError, ValueError, KeyError) as e:
            log.warning("skipping tfds example %d: %s", index, e)
            return index, None

    def __repr__(self) -> str:
        return f"TfdsDetectionSource({self.data_source!r}, {len(self)} examples)"

    def write_shards(self, out_dir: str, *, records_per_shard: int = 5000, **kwargs) -> dict:
        """Materialises the source as shards (ShardWriter policy; no caption required)."""
        kwargs.setdefault("require_captions", False)
        with ShardWriter(out_dir, "data", records_per_shard, **kwargs) as w:
            for i in range(len(self)):
                try:
                    w.write(self.record(i))
                except SkipRecord as e:
                    w.input_records += 1
                    w._skip(e.reason, i, e.detail)
        return w.manifest
