"""Helpers shared by the experiment configs (big_vision style `get_config(arg)`).

Config files load this module by path (`load_common()` in each file) so they work whatever the
current directory is: ml_collections imports config files by file path, not as a package.
"""

from __future__ import annotations

import ml_collections

from regionclip_jax.train.config_validation import base_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `"runlocal,res=64,steps=300"` into a ConfigDict over `defaults`.

    A bare word sets a bool default to True; `key=value` casts to the default's type. Unknown
    keys fail naming the key and the valid ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; valid: {sorted(defaults)}")
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "y")
        else:
            out[key] = type(default)(value)
    return out


def training_config(mode: str) -> ml_collections.ConfigDict:
    """The full schema with defaults (regionclip_jax.train.config_validation) for `mode`."""
    c = base_config()
    c.mode = mode
    return c


def tiny_clip_model(resolution: int = 64, embed: int = 64, context_length: int = 32) -> dict:
    """CLIPConfig fields of the small ResNet CLIP used on ShapesWorld (see clip_shapesworld)."""
    return dict(
        embed_dim=embed,
        image_resolution=resolution,
        vision_layers=(1, 1, 1, 1),
        vision_width=16,
        vision_patch_size=None,
        context_length=context_length,
        vocab_size=49408,
        transformer_width=128,
        transformer_heads=2,
        transformer_layers=4,
        activation="quick_gelu",
    )


def scale_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """Linear LR scaling (Goyal et al.; detectron2's rule): lr * batch / base_batch."""
    return base_lr * batch / base_batch
