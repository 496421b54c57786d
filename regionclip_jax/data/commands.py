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
