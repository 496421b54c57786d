"""Zero-shot region recognition and detection with RegionCLIP / CLIP checkpoints.

    from regionclip_jax.inference import RegionCLIP
    model = RegionCLIP.from_checkpoint("ckpt/regionclip_rn50")
    dets = model.detect("street.jpg", ["car", "bus", "person"], boxes=[[10, 20, 200, 180]])
    print(dets.to_json())

Modules: `recognizer` (`RegionCLIP`), `preprocess` (image loading, resize/normalise/pad, box
frames), `vocabulary` (word lists, the on-disk class-embedding cache), `visualize` (PNG drawing),
`proposals` (offline RPN proposals into shards: `add-proposals`), `random_model` (the notebook's
random-model factory), `commands` (the inference subcommands of `regionclip-jax`).
"""

import importlib
from typing import Any

__all__ = ["Detections", "RegionCLIP", "RegionScores"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports `inference.commands` for --help without loading JAX.
    if name in __all__:
        return getattr(importlib.import_module("regionclip_jax.inference.recognizer"), name)
    raise AttributeError(f"module 'regionclip_jax.inference' has no attribute {name!r}")
