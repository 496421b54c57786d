"""regionclip_jax.data: shards, converters, grain pipelines, ShapesWorld, a run's inputs.

  - schema.py, shards.py: the versioned record schema (msgpack), the bad-record policy, and
    ArrayRecord shards (`ShardWriter`, `open_shards`, `ShardReader`);
  - convert_imagetext.py, convert_detection.py: image-text and COCO / LVIS json -> shards;
    input_files.py: users' input files read with errors naming the file and line;
  - ov_splits.py: open-vocabulary category splits (COCO 48/17, LVIS base/novel);
    concepts.py: the concept pool (frequent caption nouns);
  - transforms.py, pipeline.py, detection_pipeline.py: NumPy transforms and the grain pipelines of
    pretraining and detection;
  - shapesworld.py: the procedural data set (`generate`, `render_scene`); tfds_shapesworld.py: it and
    tfds detection data as tensorflow-datasets sources;
  - inputs.py: the inputs of a training run, resolved from its config;
  - commands.py: the data subcommands of `regionclip-jax`.

Names are imported lazily: `pipeline` imports grain (and with it JAX), the rest does not.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SCHEMA_VERSION": "regionclip_jax.data.schema",
    "SchemaVersionError": "regionclip_jax.data.schema",
    "RecordError": "regionclip_jax.data.schema",
    "encode_record": "regionclip_jax.data.schema",
    "decode_record": "regionclip_jax.data.schema",
    "sanitize_record": "regionclip_jax.data.schema",
    "ShardWriter": "regionclip_jax.data.shards",
    "ShardReader": "regionclip_jax.data.shards",
    "ShardSet": "regionclip_jax.data.shards",
    "ShardError": "regionclip_jax.data.shards",
    "open_shards": "regionclip_jax.data.shards",
    "load_manifest": "regionclip_jax.data.shards",
    "make_pretrain_dataset": "regionclip_jax.data.pipeline",
    "pretrain_batch_spec": "regionclip_jax.data.pipeline",
    "ShapesWorldConfig": "regionclip_jax.data.shapesworld",
    "generate_shapesworld": ("regionclip_jax.data.shapesworld", "generate"),
    "render_scene": "regionclip_jax.data.shapesworld",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        target = _LAZY[name]
        module, attr = target if isinstance(target, tuple) else (target, name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'regionclip_jax.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
