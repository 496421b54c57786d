"""Helpers several test modules share: the experiment configs and the tiny model sizes.

Import them as `from helpers import ...` (pytest puts `tests/` on sys.path: the folder has no
`__init__.py`). PyTorch references live in `torch_reference.py`, the tiny RPN export in `tiny_rpn.py`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import ml_collections

from regionclip_jax.inference.random_model import TINY_CONFIG


def config_module(name: str) -> ModuleType:
    """The experiment config `configs/<name>.py` (installed as the package regionclip_jax.configs)."""
    return importlib.import_module(f"regionclip_jax.configs.{name}")


def experiment_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
    """`configs/<name>.py`'s `get_config(arg)`, as `main.py --config=configs/<name>.py:arg` gives."""
    return config_module(name).get_config(arg)


# CLIPConfig fields of the tiny random CLIP (the random-model factory's TINY_CONFIG, its joint
# embedding narrowed to 32): the inference, mask and RPN-export tests.
TINY_CLIP = dict(TINY_CONFIG, embed_dim=32)

# `config.model.overrides` that shrink clip_shapesworld:runlocal (and the pretraining configs) to a
# model that compiles and steps fast on 2 cores.
TINY_TRAIN_OVERRIDES = dict(
    embed_dim=32,
    vision_width=8,
    transformer_width=32,
    transformer_heads=1,
    transformer_layers=1,
    context_length=16,
)
