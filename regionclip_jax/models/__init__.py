"""regionclip_jax.models: the Flax NNX models and how to hold them.

CLIP (`clip`, `resnet`, `vit`, `text`, `layers`, `presets`), the RoI head (`region`), the
open-vocabulary Fast R-CNN (`detector`), detectron2's RPN (`rpn`) and an RPN on CLIP's res4
(`clip_rpn`); CLIP's input normalisation (`normalize`); a model as (graphdef, params, rest) and
the jitted merge of it (`split`).
"""

from regionclip_jax.models.clip import CLIP
from regionclip_jax.models.presets import PRESETS, CLIPConfig, get_preset
from regionclip_jax.models.resnet import ModifiedResNet
from regionclip_jax.models.vit import VisionTransformer

__all__ = ["CLIP", "PRESETS", "CLIPConfig", "ModifiedResNet", "VisionTransformer", "get_preset"]
