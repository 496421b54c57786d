"""CLIP hyper-parameters: the `CLIPConfig` dataclass and OpenAI's published model presets.

The field names follow OpenAI's `CLIP.__init__` (`clip/model.py`), so a config reads like the
arguments `build_model` infers from a state dict (see `regionclip_jax.convert.state_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Shape hyper-parameters of a two-tower CLIP model.

    Attributes:
      embed_dim: joint embedding dimension E (output of both towers).
      image_resolution: square input side in pixels (224, 288, ...). For a ResNet it fixes the
        attention-pool positional embedding to (res/32)^2 + 1 rows; for a ViT (res/patch)^2 + 1.
      vision_layers: blocks per stage `(n1, n2, n3, n4)` for the ModifiedResNet, or the number of
        transformer blocks (an int) for the ViT.
      vision_width: ResNet stem width w (stage channels 4w, 8w, 16w, 32w) or ViT width.
      vision_patch_size: ViT patch side; None for a ResNet.
      context_length: text length L (positional-embedding rows and causal-mask size).
      vocab_size: BPE vocabulary size.
      transformer_width: text transformer width W.
      transformer_heads: text attention heads.
      transformer_layers: text transformer blocks.
      activation: MLP activation of both transformers: "quick_gelu" (OpenAI's released models
        and open_clip's `*-quickgelu`/RN configs) or "gelu" (exact erf GELU, open_clip's default for
        models it trained itself). A state dict does not record it: pass it when converting.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: tuple[int, int, int, int] | int
    vision_width: int
    vision_patch_size: int | None
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    activation: str = "quick_gelu"

    def __post_init__(self):
        # Lists (e.g. from JSON) become tuples so the config stays hashable.
        if isinstance(self.vision_layers, list | tuple):
            layers = tuple(int(n) for n in self.vision_layers)
            if len(layers) != 4:
                raise ValueError(f"ResNet vision_layers must have 4 entries, got {layers}")
            object.__setattr__(self, "vision_layers", layers)
            if self.vision_patch_size is not None:
                raise ValueError(
                    "a ResNet config (tuple vision_layers) takes vision_patch_size=None"
                )
        else:
            object.__setattr__(self, "vision_layers", int(self.vision_layers))
            if self.vision_patch_size is None:
                raise ValueError("a ViT config (int vision_layers) needs vision_patch_size")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.transformer_width % self.transformer_heads:
            raise ValueError(
                f"transformer_width {self.transformer_width} is not divisible by "
                f"transformer_heads {self.transformer_heads}"
            )

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    @property
    def vision_heads(self) -> int:
        """Attention heads of the image tower (head width 64, as in OpenAI's `CLIP.__init__`)."""
        if self.is_resnet:
            return self.vision_width * 32 // 64
        return self.vision_width // 64

    @property
    def grid_size(self) -> int:
        """Side of the final feature grid: res/32 (ResNet) or res/patch (ViT)."""
        if self.is_resnet:
            return self.image_resolution // 32
        return self.image_resolution // self.vision_patch_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        if isinstance(d["vision_layers"], tuple):
            d["vision_layers"] = list(d["vision_layers"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**dict(d))

    def replace(self, **overrides: Any) -> CLIPConfig:
        return dataclasses.replace(self, **overrides)


def _rn(embed, res, layers, width, tw, th) -> CLIPConfig:
    return CLIPConfig(embed, res, layers, width, None, 77, 49408, tw, th, 12)


def _vit(embed, res, layers, width, patch, tw, th) -> CLIPConfig:
    return CLIPConfig(embed, res, layers, width, patch, 77, 49408, tw, th, 12)


# OpenAI's released models (hyper-parameters as inferred by `clip.model.build_model`).
PRESETS: dict[str, CLIPConfig] = {
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B/32": _vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B/16": _vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L/14": _vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L/14@336": _vit(768, 336, 24, 1024, 14, 768, 12),
}


def get_preset(name: str) -> CLIPConfig:
    """The config of an OpenAI CLIP model by its OpenAI name (e.g. 'RN50', 'ViT-B/16').

    Raises:
      ValueError: naming the valid presets if `name` is unknown.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown CLIP preset {name!r}; valid names: {', '.join(PRESETS)}"
        ) from None
