"""RegionCLIP's 81 prompt templates and class-name cleaning (spec §3).

`TEMPLATES` is the list returned by RegionCLIP's `get_prompt_templates()`
(`detectron2/data/datasets/clip_prompt_utils.py`; the same list is in
`detectron2/data/clip_datasets/clip_prompt_engineering.py`): the 80 CLIP ImageNet templates plus
'{}.', in RegionCLIP's order. The order does not change a template mean, but it fixes the row order
of per-template outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

TEMPLATES: tuple[str, ...] = (
    "{}.",
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def get_prompt_templates() -> list[str]:
    """A fresh list of the 81 RegionCLIP templates (RegionCLIP's function name)."""
    return list(TEMPLATES)


def clean_class_name(name: str) -> str:
    """RegionCLIP's `prompt_engineering` name cleaning: drop ',' and turn '+' into ' '."""
    return name.replace(",", "").replace("+", " ")


def clean_lvis_name(name: str) -> str:
    """RegionCLIP's LVIS name cleaning (`get_cls_names`): '_' -> ' ', parentheses removed.

    E.g. 'bow_(weapon)' -> 'bow weapon'.
    """
    return name.replace("_", " ").replace("(", "").replace(")", "")


def expand_templates(
    name: str, templates: Sequence[str] = TEMPLATES, *, clean: bool = True
) -> list[str]:
    """The prompts for one class name, one per template, in template order.

    Substitution is by `str.replace('{}', name)` as in RegionCLIP (not `str.format`, so names
    with braces are safe). With `clean=True` the name first goes through `clean_class_name`,
    which RegionCLIP's `prompt_engineering` always applies.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if clean:
        name = clean_class_name(name)
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder")
    return [t.replace("{}", name) for t in templates]
