"""Data subcommands of `regionclip-jax` (wired into cli.py).

  regionclip-jax shapesworld --out data/shapesworld --num-train 1000 --num-val 200 --seed 0

Each command has `add_<name>_arguments(parser)` (for cli.py's `@command` registry),
`add_<name>_parser(subparsers)` (plain argparse) and `<name>_command(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_shapesworld_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--num-train", type=int, default=1000, metavar="N", help="training images")
    p.add_argument("--num-val", type=int, default=200, metavar="M", help="validation images")
    p.add_argument("--seed", type=int, default=0, help="data set seed (same seed, same files)")
    p.add_argument("--image-size", type=int, default=128, metavar="PX", help="image side")
    p.add_argument("--min-objects", type=int, default=2, help="fewest objects drawn per image")
    p.add_argument("--max-objects", type=int, default=5, help="most objects drawn per image")
    p.add_argument(
        "--min-visible",
        type=float,
        default=0.3,
        help="objects less visible than this fraction are left out of boxes and captions",
    )
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument(
        "--categories",
        choices=("shape", "shape_color"),
        default="shape",
        help="detection categories: the 10 shapes, or the 80 shape x colour pairs",
    )
    p.add_argument(
        "--train-novel-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="how likely each novel shape is, relative to a base shape, in the train split "
        "(default 1: all equally likely; e.g. 0.39: novel objects are 1 in 7, as in COCO's OVD split)",
    )
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png")
    p.add_argument("--records-per-shard", type=int, default=5000, metavar="N")
    p.add_argument(
        "--workers", type=int, default=0, metavar="K", help="processes rendering in parallel"
    )
    p.add_argument(
        "--write-images", action="store_true", help="also write the image files the COCO json names"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_shapesworld_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `shapesworld` to an argparse subparsers object; `func` is set to the command."""
    help_ = "generate the ShapesWorld data set (image-text shards + COCO json)"
    p = subparsers.add_parser("shapesworld", help=help_, description=help_)
    add_shapesworld_arguments(p)
    p.set_defaults(func=shapesworld_command)
    return p


def shapesworld_command(args: argparse.Namespace) -> int:
    """Generates ShapesWorld with a progress bar and prints a summary; returns 0."""
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from tqdm import tqdm

    from regionclip_jax.data import shapesworld

    total = max(args.num_train, 0) + max(args.num_val, 0)
    if total == 0:
        raise ValueError("nothing to generate: --num-train and --num-val are both 0")
    with tqdm(
        total=total, unit="img", desc="shapesworld", disable=args.quiet, file=sys.stderr
    ) as bar:
        summary = shapesworld.generate(
            args.out,
            args.num_train,
            args.num_val,
            args.seed,
            args.image_size,
            records_per_shard=args.records_per_shard,
            num_workers=args.workers,
            write_images=args.write_images,
            overwrite=args.overwrite,
            progress=bar.update,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            min_visible=args.min_visible,
            captions_per_image=args.captions_per_image,
            categories=args.categories,
            image_format=args.image_format,
            train_novel_weight=args.train_novel_weight,
        )
    print(format_shapesworld_summary(args.out, summary))
    return 0


def format_shapesworld_summary(out: str, summary: dict) -> str:
    size = summary["config"]["image_size"]
    splits = summary["splits"]
    total = sum(s["images"] for s in splits.values())
    lines = [
        f"ShapesWorld: {total:,} images of {size}x{size} in {summary['seconds']:.1f} s "
        f"({summary['images_per_second']:,.0f} images/s), seed {summary['seed']} -> {out}",
        f"  categories: {len(summary['categories'])}; base {len(summary['base_categories'])}: "
        f"{', '.join(summary['base_categories'][:10])}"
        + (" ..." if len(summary["base_categories"]) > 10 else ""),
        f"  novel {len(summary['novel_categories'])}: {', '.join(summary['novel_categories'][:10])}"
        + (" ..." if len(summary["novel_categories"]) > 10 else ""),
    ]
    for name, s in splits.items():
        lines.append(
            f"  {name}: {s['images']:,} images, {s['objects']:,} boxes, {s['captions']:,} captions; "
            f"shards {os.path.join(out, s['shards'])}, COCO {os.path.join(out, s['instances'])}"
        )
    lines.append(
        "  read it with regionclip_jax.data.pipeline.make_pretrain_dataset("
        f"'{os.path.join(out, 'train')}', batch_size=..., canvas=({size}, {size}), "
        f"min_size={size}, max_size={size})"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# make-shards


def add_make_shards_arguments(p: argparse.ArgumentParser) -> None:
    """`make-shards imagetext ...` / `make-shards detection ...`."""
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    it = sub.add_parser(
        "imagetext",
        help="images + captions: JSONL/TSV/CSV list, folder, img2dataset tars, COCO captions",
        description="Converts image-text data to shards (regionclip_jax.data.convert_imagetext).",
    )
    it.add_argument("inputs", nargs="+", help="list file(s), tar files or globs, a folder, a json")
    it.add_argument(
        "--format",
        choices=("auto", "list", "folder", "webdataset", "coco_captions"),
        default="auto",
    )
    it.add_argument("--image-root", help="folder relative image paths point into")
    it.add_argument("--part-size", type=int, default=5000, help="images per part (list inputs)")
    _common_shard_arguments(it)
    det = sub.add_parser(
        "detection",
        help="COCO-format instances json (own data sets too) or LVIS v1 json",
        description="Converts detection annotations to shards (convert_detection).",
    )
    det.add_argument("--annotations", required=True, metavar="JSON")
    det.add_argument("--image-root", required=True, metavar="DIR")
    det.add_argument("--split", choices=("coco48_17", "lvis"), help="open-vocabulary split")
    det.add_argument("--keep", choices=("all", "base", "novel"), default="all")
    det.add_argument(
        "--empty-images",
        choices=("keep", "skip"),
        default="keep",
        help="images without a (kept) box: keep (evaluation) or skip (OVR-CNN training json)",
    )
    det.add_argument("--unknown-categories", choices=("drop", "error"), default="drop")
    det.add_argument(
        "--size-mismatch",
        choices=("error", "rescale"),
        default="error",
        help="an image whose json width/height differ from the file's: stop with an error naming "
        "it (default), or scale its boxes (and masks) to the file's size",
    )
    det.add_argument("--part-size", type=int, default=2000, help="images per part")
    det.add_argument("--min-box-size", type=float, default=0.0, metavar="PX")
    _common_shard_arguments(det)


def _common_shard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", required=True, metavar="DIR")
    p.add_argument("--source", help="the records' source field (default: the format / json name)")
    p.add_argument("--workers", type=int, default=0, metavar="K", help="worker processes")
    p.add_argument(
        "--no-resume", action="store_true", help="rewrite parts already complete in --out"
    )
    p.add_argument(
        "--no-check-images", action="store_true", help="read image headers only (faster)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def make_shards_command(args: argparse.Namespace) -> int:
    """Runs a converter with a progress bar; prints the summary; returns 0."""
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from tqdm import tqdm

    from regionclip_jax.data.convert_imagetext import format_summary

    with tqdm(
        unit="img", desc=f"make-shards {args.kind}", disable=args.quiet, file=sys.stderr
    ) as bar:
        common = dict(
            source=args.source,
            part_size=args.part_size,
            num_workers=args.workers,
            resume=not args.no_resume,
            check_images=not args.no_check_images,
            progress=bar.update,
            set_total=lambda n: setattr(bar, "total", n),
        )
        if args.kind == "imagetext":
            # lazy: a CLI command module; each command loads only what it runs (fast --help)
            from regionclip_jax.data.convert_imagetext import convert_imagetext

            manifest = convert_imagetext(
                args.inputs,
                args.out,
                input_format=args.format,
                image_root=args.image_root,
                **common,
            )
        else:
            # lazy: a CLI command module; each command loads only what it runs (fast --help)
            from regionclip_jax.data.convert_detection import convert_detection

            manifest = convert_detection(
                args.annotations,
                args.image_root,
                args.out,
                split=args.split,
                keep=args.keep,
                empty_images=args.empty_images,
                unknown_categories=args.unknown_categories,
                size_mismatch=args.size_mismatch,
                min_box_size=args.min_box_size,
                **common,
            )
    print(format_summary(args.out, manifest))
    return 0


# ---------------------------------------------------------------------------------------------
# concepts


def add_concepts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="+", help="shard folders, COCO captions json, JSONL or text (one per line)"
    )
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="concept file to write")
    p.add_argument(
        "--min-count", type=int, default=100, help="keep concepts mentioned this often (paper: 100)"
    )
    p.add_argument("--max-concepts", type=int, default=None, help="keep at most this many")
    p.add_argument(
        "--method",
        choices=("auto", "spacy", "rules"),
        default="auto",
        help="auto: spaCy noun chunks when an English model is installed, else the rules",
    )


def concepts_command(args: argparse.Namespace) -> int:
    """Builds the concept pool; prints a summary; returns 0."""
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from regionclip_jax.data.concepts import build_concept_pool

    s = build_concept_pool(
        args.inputs,
        args.out,
        min_count=args.min_count,
        method=args.method,
        max_concepts=args.max_concepts,
    )
    top = ", ".join(f"{c} ({n})" for c, n in s["top"])
    print(
        f"{s['concepts']:,} concepts (of {s['distinct']:,} distinct, count >= {s['min_count']}) "
        f"from {s['captions']:,} captions by {s['method']} -> {s['output']} "
        f"(+ {s['output']}.counts.tsv)\n  most frequent: {top or 'none'}"
    )
    return 0
