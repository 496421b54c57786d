"""Checkpoints in, checkpoints out: other frameworks' files -> our models, and ours on disk.

  - `torch_files`: `load_state_dict_file(path) -> {name: np.ndarray}` (OpenAI `.pt` TorchScript,
    `torch.save`d state dicts, `.npz`, `.safetensors`);
  - `state_dict`: `infer_config`, `clip_from_state_dict`, `clip_to_state_dict` (OpenAI / open_clip
    CLIP names <-> our CLIP);
  - `regionclip`: RegionCLIP (detectron2) checkpoints -> our CLIP + the detector's head weights;
  - `detectron2_rpn`: the original's RPN `.pth` files -> `models.rpn.RPN`;
  - `rpn`: our RPN file format (`rpn.json` + `params.npz`), `load_offline_rpn`, `build_rpn`;
  - `checkpoint`: `save_clip(model, dir)`, `load_clip(dir) -> CLIP` (Orbax + `model.json`);
  - `hub`: weights by name (`download("RN50")`: fetched on request, SHA-256-checked, converted once,
    cached); `load_clip` here is `hub.load_clip`, which also takes `"openai:RN50"`;
  - `export_weights`: a converted checkpoint back to PyTorch naming (`.safetensors` / `.npz`).

Names are imported lazily so that `regionclip_jax.convert.torch_files` (and the CLI's `--help`)
do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "clip_from_state_dict": "regionclip_jax.convert.state_dict",
    "clip_to_state_dict": "regionclip_jax.convert.state_dict",
    "infer_config": "regionclip_jax.convert.state_dict",
    "load_state_dict_file": "regionclip_jax.convert.torch_files",
    "CheckpointFormatError": "regionclip_jax.convert.torch_files",
    "save_clip": "regionclip_jax.convert.checkpoint",
    "load_clip": "regionclip_jax.convert.hub",  # directories, and names ("openai:RN50")
    "read_metadata": "regionclip_jax.convert.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regionclip_jax.convert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY)
