"""The model configs a run config describes: the CLIP (`clip_config`) and the RPN (`rpn_arch`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from regionclip_jax.convert.checkpoint import read_metadata
from regionclip_jax.convert.rpn import load_rpn_arch
from regionclip_jax.models.presets import CLIPConfig, get_preset


def clip_config(config: ml_collections.ConfigDict):
    """The CLIPConfig of `config.model`: the `init` checkpoint's, else preset then overrides."""
    init = str(config.model.get("init", ""))
    if init:  # `validate` has checked that it holds a model.json and nothing overrides it
        return CLIPConfig.from_dict(read_metadata(init)["config"])

    overrides = dict(config.model.overrides)
    if "vision_layers" in overrides and not isinstance(overrides["vision_layers"], int):
        overrides["vision_layers"] = tuple(overrides["vision_layers"])
    if config.model.preset:
        return get_preset(config.model.preset).replace(**overrides)
    return CLIPConfig.from_dict(overrides)


def rpn_arch(
    config: ml_collections.ConfigDict, model_config: CLIPConfig | None = None
) -> dict[str, Any]:
    """The architecture of the RPN that mode `rpn` trains.

    `model_config`: `clip_config(config)` when the caller has it (a run computes it once).
    """
    r = config.rpn
    arch = {
        "kind": str(r.kind),
        "depth": int(r.depth),
        "base_width": int(r.base_width),
        "anchor_sizes": [float(x) for x in r.anchor_sizes],
        "aspect_ratios": [float(x) for x in r.aspect_ratios],
        "pre_nms_topk": int(r.pre_nms_topk),
        "post_nms_topk": int(r.post_nms_topk),
        "nms_thresh": float(r.nms_thresh),
        "init": str(r.init),
    }
    if arch["kind"] == "clip":
        arch["clip_config"] = (model_config or clip_config(config)).to_dict()
    return arch


def rpn_arch_from_init(
    path: str, config: ml_collections.ConfigDict, model_config: CLIPConfig | None = None
) -> dict[str, Any]:
    """The architecture of a trained RPN: an `rpn` workdir / its export dir, or a detectron2 .pth.

    The test-time settings (pre/post-NMS top-k, NMS threshold) come from `config.rpn`.
    `model_config` as in `rpn_arch` (used for path "random" only).
    """
    r = config.rpn
    if path == "random":  # smoke runs: an untrained RPN of config.rpn's architecture
        return dict(rpn_arch(config, model_config), weights="")
    return load_rpn_arch(
        path,
        pre_nms_topk=int(r.pre_nms_topk),
        post_nms_topk=int(r.post_nms_topk),
        nms_thresh=float(r.nms_thresh),
    )
