"""Zero-shot region recognition with RegionCLIP / CLIP checkpoints (issue 4).

    from regionclip_jax.inference import RegionCLIP
    model = RegionCLIP.from_checkpoint("ckpt/regionclip_rn50")
    dets = model.detect("street.jpg", ["car", "bus", "person"], boxes=[[10, 20, 200, 180]])
    print(dets.to_json())

Modules: `preprocess` (image loading, resize/normalise/pad, box frames), `vocabulary` (word
lists, the on-disk class-embedding cache), `recognizer` (`RegionCLIP`), `visualize` (PNG
drawing), `commands` (the `embed-text`, `region-features` and `classify` CLI subcommands).
"""

import importlib
from typing import Any

__all__ = ["Detections", "RegionCLIP", "RegionScores"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports `inference.commands` for --help without loading JAX.
    if name in __all__:
        return getattr(importlib.import_module("regionclip_jax.inference.recognizer"), name)
    raise AttributeError(f"module 'regionclip_jax.inference' has no attribute {name!r}")
