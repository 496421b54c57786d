"""Open-vocabulary category splits: COCO 48 base / 17 novel (OVR-CNN) and LVIS base / novel.

COCO (spec §5.1): RegionCLIP uses the split of OVR-CNN (Zareian et al., CVPR 2021), itself from
Bansal et al. (zero-shot detection, ECCV 2018): 65 of the 80 COCO categories, 48 base (boxes used
in training) and 17 novel (evaluated only). The other 15 COCO categories are not part of the
benchmark: OVR-CNN removes their annotations. The names below are data facts (RegionCLIP's
`coco_zeroshot_categories.py`, OVR-CNN's notebook 001), listed in COCO id order.

LVIS v1: base = frequent ("f") + common ("c") categories, novel = rare ("r"), read from each
category's `frequency` field (866 base, 337 novel in LVIS v1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COCO_BASE_48 = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee",
    "skis", "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet",
    "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book",
    "clock", "vase", "toothbrush",
)  # fmt: skip

COCO_NOVEL_17 = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip

SPLITS = ("coco48_17", "lvis")


def coco_ovd_split(categories: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Category id -> "base" | "novel" | "excluded" for a COCO-style category list.

    Names are matched case-insensitively. The 15 COCO categories outside the 65 are "excluded".

    Raises:
      ValueError: when a base or novel name is missing from `categories` (not a COCO json).
    """
    by_name = {str(c["name"]).strip().lower(): int(c["id"]) for c in categories}
    missing = [n for n in (*COCO_BASE_48, *COCO_NOVEL_17) if n not in by_name]
    if missing:
        raise ValueError(
            f"the COCO 48/17 split needs the COCO category names; missing {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    base, novel = set(COCO_BASE_48), set(COCO_NOVEL_17)
    out = {}
    for name, cid in by_name.items():
        out[cid] = "base" if name in base else "novel" if name in novel else "excluded"
    return out


def lvis_split(categories: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Category id -> "base" (frequency "f" or "c") | "novel" ("r").

    Raises:
      ValueError: a category without a valid `frequency` field (not an LVIS v1 json).
    """
    out = {}
    for c in categories:
        f = c.get("frequency")
        if f not in ("f", "c", "r"):
            raise ValueError(
                f"LVIS split: category {c.get('id')} ({c.get('name')!r}) has frequency {f!r}; "
                "expected 'f', 'c' or 'r' (an LVIS v1 json)"
            )
        out[int(c["id"])] = "novel" if f == "r" else "base"
    return out


def category_split(name: str, categories: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Dispatches on `name` in SPLITS."""
    if name == "coco48_17":
        return coco_ovd_split(categories)
    if name == "lvis":
        return lvis_split(categories)
    raise ValueError(f"unknown split {name!r}; choose from {SPLITS}")
