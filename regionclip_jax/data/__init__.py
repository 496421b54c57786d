"""regionclip_jax.data: shard format, grain pipelines, ShapesWorld.

  - schema.py: the versioned record schema (msgpack) and the bad-record policy;
  - shards.py: `ShardWriter`, `open_shards`, `ShardReader` (ArrayRecord files + manifest.json);
  - transforms.py: resize / flip / normalise / pad, NumPy;
  - pipeline.py: `make_pretrain_dataset` (grain);
  - shapesworld.py: the procedural data set (`generate`, `render_scene`);
  - commands.py: the `regionclip-jax shapesworld` command.

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
