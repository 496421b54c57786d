"""regionclip_jax.models: CLIP towers (ModifiedResNet, ViT, text) in Flax NNX."""

from regionclip_jax.models.clip import CLIP
from regionclip_jax.models.presets import PRESETS, CLIPConfig, get_preset
from regionclip_jax.models.resnet import ModifiedResNet
from regionclip_jax.models.vit import VisionTransformer

__all__ = ["CLIP", "PRESETS", "CLIPConfig", "ModifiedResNet", "VisionTransformer", "get_preset"]
