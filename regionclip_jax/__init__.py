"""regionclip_jax: RegionCLIP in JAX/Flax NNX.

The top-level names are imported lazily so that `import regionclip_jax` stays cheap (no JAX
initialisation) for the command-line tools:

  - `tokenize(texts, context_length=77) -> int32[N, 77]`: CLIP BPE tokens.
  - `load_clip(directory_or_name) -> CLIP`: a converted checkpoint (`regionclip-jax convert`), or
    OpenAI's weights by name, `load_clip("openai:RN50")` (downloaded on first use: `convert.hub`).
  - `CLIP`: the two-tower model (`regionclip_jax.models.clip.CLIP`).

The packages and the order in which they may import one another: README "Architecture".
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "tokenize": ("regionclip_jax.text.tokenizer", "tokenize"),
    "load_clip": ("regionclip_jax.convert.hub", "load_clip"),
    "save_clip": ("regionclip_jax.convert.checkpoint", "save_clip"),
    "CLIP": ("regionclip_jax.models.clip", "CLIP"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'regionclip_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)
