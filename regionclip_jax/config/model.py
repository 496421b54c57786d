"""The model configs a run config describes: the CLIP (`clip_config`) and the RPN (`rpn_spec`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from regionclip_jax.convert.checkpoint import read_metadata
from regionclip_jax.convert.rpn import load_rpn_spec
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


def rpn_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture of the RPN that mode `rpn` trains."""
    r, t = config.rpn, config.detect
    spec = {
        "kind": str(r.kind),
        "depth": int(r.depth),
        "base_width": int(r.base_width),
        "anchor_sizes": [float(x) for x in r.anchor_sizes],
        "aspect_ratios": [float(x) for x in r.aspect_ratios],
        "pre_nms_topk": int(t.rpn_pre_nms_topk),
        "post_nms_topk": int(t.rpn_post_nms_topk),
        "nms_thresh": float(t.rpn_nms_thresh),
        "init": str(r.init),
    }
    if spec["kind"] == "clip":
        spec["clip_config"] = clip_config(config).to_dict()
    return spec


def rpn_spec_from_init(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The spec of a trained RPN: an `rpn` workdir / its export dir, or a detectron2 .pth.

    The test-time settings (pre/post-NMS top-k, NMS threshold) come from `config.detect`.
    """
    t = config.detect
    if path == "random":  # smoke runs: an untrained RPN of config.rpn's architecture
        return dict(rpn_spec(config), weights="")
    return load_rpn_spec(
        path,
        pre_nms_topk=int(t.rpn_pre_nms_topk),
        post_nms_topk=int(t.rpn_post_nms_topk),
        nms_thresh=float(t.rpn_nms_thresh),
    )
