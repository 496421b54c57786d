"""The `regionclip-jax` command.

  regionclip-jax convert --input ViT-B-16.pt --output ckpt/vit_b16 [--overwrite]
  regionclip-jax info ckpt/vit_b16
  regionclip-jax download RN50 --output ckpt/rn50
  regionclip-jax export-weights --checkpoint ckpt/rn50 --out rn50.safetensors
  regionclip-jax classify | export | ...   (the inference commands: inference/commands.py)

Each subcommand is one function registered with `@command`; its argument set-up is a second small
function. Heavy imports (JAX, torch) happen inside the subcommand, so `--help` stays fast.
Expected failures (unreadable input, existing output, missing dependency) print one
`regionclip-jax <cmd>: error: ...` line on stderr and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

PROG = "regionclip-jax"
EXIT_USER_ERROR = 2


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
):
    """Registers `run(args) -> exit code` as the subcommand `name`."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, help, arguments, run)
        return run

    return register


# ---------------------------------------------------------------------------------------------
# convert


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        "-i",
        required=True,
        metavar="FILE",
        help="OpenAI CLIP .pt (TorchScript), torch.save'd state dict (.pt/.pth), .npz or .safetensors",
    )
    p.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="checkpoint directory to write"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DIR")
    p.add_argument(
        "--activation",
        choices=["quick_gelu", "gelu"],
        default="quick_gelu",
        help="MLP activation the weights were trained with: quick_gelu for OpenAI's models and "
        "open_clip's RN / *-quickgelu configs, gelu for open_clip's own ViT trainings "
        "(a state dict does not record it; default: quick_gelu)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow arbitrary pickled Python objects in a torch.save'd file (only for trusted files)",
    )


@command(
    "convert",
    help="convert a PyTorch CLIP checkpoint into a regionclip_jax checkpoint",
    arguments=_convert_arguments,
)
def _convert(args: argparse.Namespace) -> int:
    from regionclip_jax.convert.checkpoint import read_metadata
    from regionclip_jax.convert.hub import convert_clip_file

    dest = convert_clip_file(
        args.input,
        args.output,
        overwrite=args.overwrite,
        activation=args.activation,
        trust_pickle=args.trust_pickle,
    )
    meta = read_metadata(dest)
    print(f"Architecture: {_describe_dict(meta['config'], meta.get('preset'))}")
    print(f"Parameters:   {meta['param_count']:,}")
    print(f"Wrote:        {dest}")
    return 0


def _describe(config) -> str:
    from regionclip_jax.models.presets import PRESETS

    name = next((n for n, c in PRESETS.items() if c == config), None)
    return name if name else _describe_dict(config.to_dict(), None)


def _describe_dict(cfg: dict, preset: str | None) -> str:
    if preset:
        return preset
    if isinstance(cfg.get("vision_layers"), list):
        vision = f"ModifiedResNet layers={tuple(cfg['vision_layers'])} width={cfg['vision_width']}"
    else:
        vision = (
            f"ViT layers={cfg.get('vision_layers')} width={cfg.get('vision_width')} "
            f"patch={cfg.get('vision_patch_size')}"
        )
    return (
        f"custom (no OpenAI preset matches): {vision}, image {cfg.get('image_resolution')}px; "
        f"text width={cfg.get('transformer_width')} layers={cfg.get('transformer_layers')} "
        f"heads={cfg.get('transformer_heads')}; embed_dim={cfg.get('embed_dim')}"
    )


# ---------------------------------------------------------------------------------------------
# info


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a checkpoint written by `convert`")


@command(
    "info",
    help="describe a converted checkpoint (reads model.json only)",
    arguments=_info_arguments,
)
def _info(args: argparse.Namespace) -> int:
    from regionclip_jax.convert.checkpoint import read_metadata

    meta = read_metadata(args.directory)
    cfg = meta["config"]
    source = meta.get("source") or {}
    rows = [
        ("Model", meta["model_type"]),
        ("Architecture", _describe_dict(cfg, meta.get("preset"))),
        ("Parameters", f"{meta['param_count']:,}" if "param_count" in meta else "unknown"),
        ("Source", source.get("file") or "unknown"),
        ("Source sha256", source.get("sha256") or "unknown"),
        ("Created", meta.get("created", "unknown")),
        ("Written by", f"regionclip_jax {meta.get('regionclip_jax_version', '?')}"),
        ("Format", f"{meta['format']} v{meta['format_version']}"),
    ]
    for key, value in rows:
        print(f"{key + ':':<15}{value}")
    print("Config:")
    for key, value in cfg.items():
        print(f"  {key}: {value}")
    return 0


# ---------------------------------------------------------------------------------------------
# export-weights


def _export_weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", "-c", required=True, metavar="DIR", help="a converted checkpoint directory"
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="FILE",
        help="weights file to write (model.safetensors)",
    )
    p.add_argument(
        "--format",
        choices=["safetensors", "npz"],
        help="file format (default: npz if FILE ends in .npz, else safetensors)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="cast every floating tensor (default: as stored in the checkpoint)",
    )
    p.add_argument(
        "--naming",
        choices=["auto", "openai", "regionclip"],
        default="auto",
        help="openai: the OpenAI / open_clip CLIP state dict (open_clip's load_state_dict takes it "
        "with strict=True); regionclip: RegionCLIP's detectron2 names with the box-predictor and "
        "mask heads; auto (default): regionclip for checkpoints holding RegionCLIP heads",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")


@command(
    "export-weights",
    help="write a converted checkpoint back as PyTorch-named weights (.safetensors or .npz) for "
    "open_clip / OpenAI CLIP (or detectron2 RegionCLIP)",
    arguments=_export_weights_arguments,
)
def _export_weights(args: argparse.Namespace) -> int:
    from regionclip_jax.convert.export_weights import export_weights, resolve_naming

    fmt = args.format or ("npz" if args.out.lower().endswith(".npz") else "safetensors")
    naming = resolve_naming(args.checkpoint, args.naming)
    out = export_weights(
        args.checkpoint,
        args.out,
        format=fmt,
        dtype=args.dtype,
        naming=naming,
        overwrite=args.overwrite,
    )
    described = {"openai": "OpenAI / open_clip CLIP", "regionclip": "RegionCLIP (detectron2)"}
    print(f"Naming: {described[naming]}")
    print(f"Dtype:  {args.dtype or 'as stored'}")
    print(f"Wrote:  {out} ({fmt})")
    return 0


# ---------------------------------------------------------------------------------------------
# init-random


def _init_random_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="RN50", help="architecture (RN50, RN50x4, ViT-B/16, ...)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")


@command(
    "init-random",
    help="write a checkpoint with RANDOM weights (to try the commands without downloading weights)",
    arguments=_init_random_arguments,
)
def _init_random(args: argparse.Namespace) -> int:
    from regionclip_jax.convert.checkpoint import check_destination, save_clip
    from regionclip_jax.inference.random_model import random_clip
    from regionclip_jax.models.presets import get_preset

    check_destination(args.output, overwrite=args.overwrite)
    model = random_clip(get_preset(args.preset), seed=args.seed)
    dest = save_clip(
        model,
        args.output,
        overwrite=args.overwrite,
        source=f"random weights ({args.preset}, seed {args.seed})",
    )
    print(f"Wrote a {args.preset} checkpoint with RANDOM weights (outputs are meaningless): {dest}")
    return 0


# ---------------------------------------------------------------------------------------------
# shapesworld


def _shapesworld_arguments(p: argparse.ArgumentParser) -> None:
    from regionclip_jax.data.commands import add_shapesworld_arguments

    add_shapesworld_arguments(p)


@command(
    "shapesworld",
    help="generate the ShapesWorld data set (shards + COCO json)",
    arguments=_shapesworld_arguments,
)
def _shapesworld(args: argparse.Namespace) -> int:
    from regionclip_jax.data.commands import shapesworld_command

    return shapesworld_command(args)


# ---------------------------------------------------------------------------------------------
# make-shards, concepts


def _make_shards_arguments(p: argparse.ArgumentParser) -> None:
    from regionclip_jax.data.commands import add_make_shards_arguments

    add_make_shards_arguments(p)


@command(
    "make-shards",
    help="convert image-text or detection data (JSONL/TSV/CSV, img2dataset tars, COCO, LVIS) to shards",
    arguments=_make_shards_arguments,
)
def _make_shards(args: argparse.Namespace) -> int:
    from regionclip_jax.data.commands import make_shards_command

    return make_shards_command(args)


def _concepts_arguments(p: argparse.ArgumentParser) -> None:
    from regionclip_jax.data.commands import add_concepts_arguments

    add_concepts_arguments(p)


@command(
    "concepts",
    help="frequent object concepts of a caption corpus (the concept pool)",
    arguments=_concepts_arguments,
)
def _concepts(args: argparse.Namespace) -> int:
    from regionclip_jax.data.commands import concepts_command

    return concepts_command(args)


# ---------------------------------------------------------------------------------------------
# zero-shot region recognition: embed-text, region-features, classify, convert-regionclip,
# add-proposals


def _register_inference_commands() -> None:
    # regionclip_jax.inference.commands imports only argparse/json/os at load: --help stays fast.
    from regionclip_jax.inference import commands as inference

    for name, help_text, add_arguments, run in (
        (
            "embed-text",
            "prompt-ensemble text embeddings of a vocabulary (.npy)",
            inference.add_embed_text_arguments,
            inference.run_embed_text,
        ),
        (
            "region-features",
            "RegionCLIP region embeddings of boxes in an image (.npy)",
            inference.add_region_features_arguments,
            inference.run_region_features,
        ),
        (
            "classify",
            "zero-shot classification of boxes in images with your own words (JSON + picture)",
            inference.add_classify_arguments,
            inference.run_classify,
        ),
        (
            "export",
            "a shippable detector: checkpoint + RPN + vocabulary as one jax.export program "
            "(model.jax + model.json; docs/serving.md)",
            inference.add_export_arguments,
            inference.run_export,
        ),
        (
            "convert-regionclip",
            "convert a RegionCLIP detectron2 .pth into a regionclip_jax checkpoint",
            inference.add_convert_regionclip_arguments,
            inference.run_convert_regionclip,
        ),
        (
            "add-proposals",
            "precompute an offline RPN's proposals into a copy of the shards (for pretraining)",
            inference.add_add_proposals_arguments,
            inference.run_add_proposals,
        ),
    ):
        command(name, help=help_text, arguments=add_arguments)(run)


_register_inference_commands()


# ---------------------------------------------------------------------------------------------
# download


def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME|URL",
        help="RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, ViT-B/16, ViT-L/14, "
        "ViT-L/14@336px (also openai:RN50, ViT-B-32), a RegionCLIP file name (with --from), or an "
        "http(s) URL (with --sha256); --list shows them all",
    )
    p.add_argument(
        "--output", "-o", metavar="DIR", help="also write the checkpoint here (default: cache only)"
    )
    p.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the file (for a URL)")
    p.add_argument(
        "--from",
        dest="source_file",
        metavar="FILE",
        help="convert this file, downloaded by hand, instead of downloading (RegionCLIP's files; "
        "offline use)",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="cache directory (default: $REGIONCLIP_JAX_CACHE or ~/.cache/regionclip_jax)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DIR")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickled Python objects in a .pth (RegionCLIP's files need it; trusted files only)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")
    p.add_argument("--list", action="store_true", help="print the known names and exit")


@command(
    "download",
    help="download pretrained weights by name (OpenAI CLIP; RegionCLIP's files with --from), "
    "convert them once and cache them; prints the checkpoint directory",
    arguments=_download_arguments,
)
def _download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from regionclip_jax.convert import hub

    if args.list:
        print(hub.describe_models())
        return 0
    if not args.name:
        raise ValueError("give a model NAME or an http(s) URL (--list shows the names)")
    dest = hub.download(
        args.name,
        args.output,
        sha256=args.sha256,
        source_file=args.source_file,
        cache=Path(args.cache) if args.cache else None,
        progress=not args.quiet,
        overwrite=args.overwrite,
        trust_pickle=args.trust_pickle,
    )
    print(dest)
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where the demo writes")
    p.add_argument("--teacher-steps", type=int, help="image-level CLIP steps (1000; 4 runlocal)")
    p.add_argument("--student-steps", type=int, help="region pretraining steps (600; 4 runlocal)")
    p.add_argument("--rpn-steps", type=int, help="proposal network steps (300; 4 runlocal)")
    p.add_argument("--detect-steps", type=int, help="OVD fine-tuning steps, each (400; 4 runlocal)")
    p.add_argument(
        "--skip-detection", action="store_true", help="stop after the region recognition table"
    )
    p.add_argument(
        "--runlocal",
        action="store_true",
        help="smoke-test size: 32 + 8 images, 4 steps per stage (minutes on a CPU; the figures "
        "mean nothing)",
    )


@command(
    "demo",
    help="run the README's main job: teacher CLIP -> region pretraining -> zero-shot table "
    "-> open-vocabulary detection",
    arguments=_demo_arguments,
)
def _demo(args: argparse.Namespace) -> int:
    from regionclip_jax import demo

    for name in ("teacher_steps", "student_steps", "rpn_steps", "detect_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    demo.run(
        args.out,
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        rpn_steps=args.rpn_steps,
        detect_steps=args.detect_steps,
        detection=not args.skip_detection,
        runlocal=args.runlocal,
    )
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="RegionCLIP in JAX: data, checkpoints, zero-shot region recognition."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        # SUPPRESS keeps a --debug given before the subcommand from being reset here.
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        cmd.add_arguments(p)
    return parser


def _message(e: BaseException, max_lines: int = 4) -> str:
    """`e` as one line: multi-line messages (e.g. lists of mismatched keys) are joined."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = "; ".join(lines[:max_lines])
    if len(lines) > max_lines:
        text += f"; ... ({len(lines) - max_lines} more; --debug shows all)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "debug", False):
        # Users see one "warning:" line, not the Python source line that raised it.
        warnings.formatwarning = lambda message, *_args, **_kw: f"{PROG}: warning: {message}\n"
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    from regionclip_jax.convert.torch_files import CheckpointFormatError

    try:
        return COMMANDS[args.command].run(args)
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, and keep Python's exit-time flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointFormatError, OSError, ValueError, ImportError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
