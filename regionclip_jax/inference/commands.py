"""Inference subcommands of `regionclip-jax` (registered in cli.py).

  regionclip-jax embed-text --checkpoint DIR --vocabulary words.txt|"cat,dog" --out emb.npy
  regionclip-jax region-features --checkpoint DIR --image IMG --boxes boxes.json --out feats.npy
  regionclip-jax classify --checkpoint DIR --image IMG [IMG ...] --boxes boxes.json \
      --vocabulary words.txt|"cat,dog" --out dets.json [--vis out.png|DIR]
  regionclip-jax classify --checkpoint DIR --image IMG [IMG ...] --rpn RPN_WORKDIR|rpn.pth \
      --vocabulary words.txt|"cat,dog" --out dets.json      (proposal mode: offline RPN boxes)
  regionclip-jax convert-regionclip --input regionclip_pretrained-cc_rn50.pth --output DIR \
      --trust-pickle
  regionclip-jax classify ... --format pipeline|coco     (Hugging Face pipeline / COCO results)
  regionclip-jax export --checkpoint DIR --rpn RPN --vocabulary words.txt|"cat,dog" \
      --out model.jax [--canvas H W]                     (a jax.export program; docs/serving.md)
  regionclip-jax add-proposals --shards IN --out OUT --rpn RPN_WORKDIR|rpn.pth

Each command is `add_<name>_arguments(parser)` + `run_<name>(args) -> exit code`. Expected
failures raise ValueError / OSError (cli.main prints one line and exits 2); `main(argv)` here
does the same for `python -m regionclip_jax.inference.commands`.

Output paths are checked before any work: the folder of `--out` is created, and a path that is a
folder or cannot be written is an error. `classify` keeps its results on disk as it goes: a
`.jsonl` `--out` gets one line per image (the first line holds the classes), any other name holds
one JSON object `{"classes", "results", "failed"}` rewritten (atomically) after every image. An
image that cannot be read or whose boxes are invalid is reported (`skipped IMAGE: reason` on
stderr), listed under `failed` and skipped; the run goes on (`--on-error stop`: stops there) and
ends with exit 2 naming the failed images, the results of the others kept.

boxes.json: absolute xyxy pixels of the original image, either a list `[[x1, y1, x2, y2], ...]`,
`{"boxes": [...]}`, or, for several images, `{"<file name or path>": [[...], ...], ...}`.

Instance masks: with a checkpoint that has a mask head (a released LVIS model converted with
`convert-regionclip`), every detection of `classify` carries `"mask"`, its instance mask in the
original image as compressed COCO RLE (`{"size": [H, W], "counts": str}`, pycocotools
`mask.decode` reads it), and `--vis` pictures show the masks; `--no-masks` turns them off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        metavar="DIR",
        help="converted RegionCLIP or CLIP checkpoint directory",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default="default",
        help="text-embedding cache (default $REGIONCLIP_JAX_CACHE/text_embeddings, else "
        "~/.cache/regionclip_jax/text_embeddings; none: no cache)",
    )


def _resize_args(p: argparse.ArgumentParser, *, canvas_help: str | None = None) -> None:
    """--min-size / --max-size (RegionCLIP's test-time resize), and --canvas with `canvas_help`."""
    p.add_argument("--min-size", type=int, default=800, help="shortest edge after resize")
    p.add_argument("--max-size", type=int, default=1333, help="longest edge cap")
    if canvas_help is not None:
        p.add_argument("--canvas", type=int, nargs=2, metavar=("H", "W"), help=canvas_help)


def _image_args(p: argparse.ArgumentParser) -> None:
    _resize_args(p)
    p.add_argument(
        "--clip-boxes",
        action="store_true",
        help="clip boxes to the image instead of rejecting those that extend past it",
    )


def _load_model(args):
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from regionclip_jax.inference.recognizer import RegionCLIP

    cache = None if args.cache_dir in ("none", "") else args.cache_dir
    rpn = getattr(args, "rpn", None)
    rpn_kw = {}
    if rpn is not None:
        rpn_kw = dict(
            rpn_pre_nms_topk=args.rpn_pre_nms_topk,
            rpn_post_nms_topk=args.rpn_post_nms_topk,
            rpn_nms_thresh=args.rpn_nms_thresh,
        )
    return RegionCLIP.from_checkpoint(
        args.checkpoint,
        rpn=rpn,
        masks=not getattr(args, "no_masks", False),
        min_size=getattr(args, "min_size", 800),
        max_size=getattr(args, "max_size", 1333),
        cache_dir=cache,
        **rpn_kw,
    )


def read_boxes(path: str | os.PathLike, images: Sequence[str]) -> dict[str, list]:
    """boxes.json -> {image path: [[x1, y1, x2, y2], ...]} for each of `images`.

    `path` may also be the JSON itself (a string starting with `[` or `{`), e.g.
    `--boxes "[[10, 20, 200, 240]]"` on the command line.

    Raises:
      ValueError: not UTF-8, empty or not JSON (naming the file and line), a wrong structure, or
        no boxes for one of the images.
    """
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from regionclip_jax.data.input_files import load_json_file

    if isinstance(path, str) and path.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"--boxes: not valid JSON ({e.msg} at character {e.pos})") from None
        path = "--boxes"
    else:
        data = load_json_file(path, "boxes json")
    if isinstance(data, dict) and "boxes" in data and len(data) == 1:
        data = data["boxes"]
    if isinstance(data, list):
        return {img: data for img in images}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a list of boxes or a {{image: boxes}} object")
    out = {}
    for img in images:
        for key in (img, os.path.basename(img)):
            if key in data:
                out[img] = data[key]
                break
        else:
            raise ValueError(f"{path} has no boxes for image {img!r} (keys: file name or path)")
    return out


def check_output(path: str | os.PathLike, what: str = "--out") -> Path:
    """Makes sure an output file can be written, before the work: creates its folder.

    Raises:
      OSError: the path is a folder, its folder cannot be created, or it is not writable (the
        error names the path).
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(21, f"{what} is a folder, give a file name", str(p))
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"{what} {p}: cannot create its folder ({e.strerror})"
        raise type(e)(e.errno, msg, str(e.filename or p.parent)) from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PermissionError(13, f"{what} is not writable", str(p))
    return p


# ----------------------------------------------------------------------------------- embed-text


def add_embed_text_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--vocabulary",
        "-v",
        required=True,
        help="words file (one per line) or comma-separated words",
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="FILE.npy",
        help="float32 [K, D] un-normalised prompt-ensemble embeddings",
    )


def run_embed_text(args: argparse.Namespace) -> int:
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    import numpy as np

    from regionclip_jax.inference.vocabulary import parse_vocabulary

    check_output(args.out)
    words = parse_vocabulary(args.vocabulary)  # fail on a bad vocabulary before loading
    model = _load_model(args)
    words, emb = model.text_embeddings(words)
    np.save(args.out, emb)
    Path(args.out).with_suffix(".txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    print(
        f"wrote {args.out}: {emb.shape[0]} words x {emb.shape[1]} dims (row order in "
        f"{Path(args.out).with_suffix('.txt')})"
    )
    return 0


# ------------------------------------------------------------------------------ region-features


def add_region_features_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    _image_args(p)
    p.add_argument("--image", "-i", required=True, help="image file")
    p.add_argument(
        "--boxes",
        "-b",
        required=True,
        metavar="JSON",
        help="boxes.json, or the JSON itself: [[x1, y1, x2, y2], ...] in original image pixels",
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="FILE.npy",
        help="float32 [R, D] region embeddings (un-normalised attnpool outputs)",
    )


def run_region_features(args: argparse.Namespace) -> int:
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    import numpy as np

    boxes = read_boxes(args.boxes, [args.image])[args.image]
    if not os.path.isfile(args.image):
        raise FileNotFoundError(2, "No such image file", args.image)
    check_output(args.out)
    model = _load_model(args)
    prepared, b = model.prepare(args.image, boxes, clip_boxes=args.clip_boxes)
    feats = model.region_features(prepared.image[None], prepared.to_canvas(b)[None])[0]
    np.save(args.out, feats)
    print(f"wrote {args.out}: {feats.shape[0]} regions x {feats.shape[1]} dims")
    return 0


# ------------------------------------------------------------------------------------- classify


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    _image_args(p)
    p.add_argument("--image", "-i", required=True, nargs="+", help="image file(s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--boxes",
        "-b",
        metavar="JSON",
        help="boxes.json or the JSON itself, e.g. '[[10, 20, 200, 240]]' (GT / user-box mode: "
        "xyxy original pixels); give this or --rpn",
    )
    mode.add_argument(
        "--rpn",
        metavar="PATH",
        help="proposal mode: the offline RPN's proposals are the boxes (an `rpn` workdir, its "
        "export/ dir, or a detectron2 RPN .pth); give this or --boxes",
    )
    p.add_argument(
        "--rpn-pre-nms-topk",
        type=int,
        default=None,
        help="RPN candidates per level before NMS (default: C4 / CLIP 6000, FPN 1000)",
    )
    p.add_argument("--rpn-post-nms-topk", type=int, default=1000, help="RPN proposals kept")
    p.add_argument(
        "--rpn-nms-thresh",
        type=float,
        default=0.9,
        help="RPN NMS IoU (0.9: the original's zero-shot OFFLINE_RPN_NMS_THRESH)",
    )
    p.add_argument(
        "--vocabulary",
        "-v",
        required=True,
        help="words file (one per line) or comma-separated words",
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="FILE.json|FILE.jsonl",
        help="detections: a .json file (one object, rewritten after every image) or a .jsonl "
        "file (one line per image, appended as it goes); its folder is created",
    )
    p.add_argument(
        "--on-error",
        choices=("skip", "stop"),
        default="skip",
        help="an image that cannot be read or has invalid boxes: skip it, report it and go on "
        "(exit 2 at the end), or stop there; results so far are kept either way (default: skip)",
    )
    p.add_argument(
        "--vis",
        metavar="PNG|DIR",
        help="draw detections: a .png path (one image) or a directory (one PNG each)",
    )
    p.add_argument("--score-thresh", type=float, default=0.001)
    p.add_argument("--nms-thresh", type=float, default=0.5)
    p.add_argument("--max-dets", type=int, default=100)
    p.add_argument(
        "--no-masks",
        action="store_true",
        help="no instance masks even if the checkpoint has a mask head (default: a checkpoint "
        "with one writes each detection's mask as RLE and draws it in --vis)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="regionclip",
        help="detections as regionclip (default: boxes xyxy, labels, scores, the per-box "
        "'regions'), pipeline (Hugging Face zero-shot-object-detection: score, label, box "
        "{xmin, ymin, xmax, ymax} int pixels) or coco (--out is a COCO results list for "
        "pycocotools' loadRes: bbox xywh, category_id 1..K in vocabulary order, image_id the "
        "file name's number when every image name is a number, else 1..N in --image order)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


FORMATS = ("regionclip", "pipeline", "coco")


def coco_image_ids(images: Sequence[str]) -> dict[str, int]:
    """COCO image ids of `classify --format coco`: the number in every file name (COCO's
    `000000397133.jpg` -> 397133) when all names are distinct numbers, else 1..N in order."""
    stems = [Path(img).stem for img in images]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {img: int(s) for img, s in zip(images, stems)}
    return {img: i + 1 for i, img in enumerate(images)}


def _regions(scores, names: list[str]) -> list[dict]:
    """Per-box summary of `RegionScores` for the JSON (proposal mode adds the RPN objectness)."""
    out = [
        {
            "box": [round(float(v), 2) for v in box],
            "label": names[int(lab)],
            "score": float(sc),
            "background": float(bg),
        }
        for box, lab, sc, bg in zip(scores.boxes, scores.labels, scores.scores, scores.background)
    ]
    if scores.objectness is not None:
        for r, o in zip(out, scores.objectness):
            r["objectness"] = float(o)
    return out


class ImagesFailed(ValueError):
    """Some images of a many-image command failed; the results of the others are on disk."""


class _Results:
    """`classify --out`, kept on disk as images finish (see the module docstring)."""

    def __init__(self, path: Path, classes: list[str], fmt: str = "regionclip"):
        self.path, self.classes = path, list(classes)
        self.jsonl = path.suffix.lower() == ".jsonl"
        # coco: the file is one flat COCO results list (loadRes), rewritten after every image.
        self.coco = fmt == "coco"
        if self.coco and self.jsonl:
            raise ValueError("--format coco writes one COCO results list: give a .json --out")
        self.results: list[dict] = []
        self.failed: list[dict] = []
        if self.jsonl:
            self._file = open(path, "w", encoding="utf-8")  # closed by close()
            self._line({"classes": self.classes})
        else:
            self._rewrite()

    def _line(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def _rewrite(self) -> None:
        doc: Any = {"classes": self.classes, "results": self.results, "failed": self.failed}
        if self.coco:
            doc = [d for r in self.results for d in r["detections"]]
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, result: dict) -> None:
        self.results.append(result)
        self._save(result)

    def fail(self, image: str, reason: str) -> None:
        self.failed.append({"image": image, "error": reason})
        self._save(self.failed[-1])

    def _save(self, entry: dict) -> None:
        if self.jsonl:
            self._line(entry)
        else:
            self._rewrite()

    def close(self) -> None:
        if self.jsonl:
            self._file.close()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def run_classify(args: argparse.Namespace) -> int:
    if args.boxes is None and args.rpn is None:
        raise ValueError(
            "give --boxes JSON (GT / user-box mode) or --rpn PATH (proposal mode): detection "
            "without boxes needs an offline RPN (an `rpn` workdir, its export/ dir, or a "
            "detectron2 RPN .pth)"
        )
    images = list(args.image)
    for img in images:
        if not os.path.isfile(img):
            raise FileNotFoundError(2, "No such image file", img)
    boxes = None if args.boxes is None else read_boxes(args.boxes, images)
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from regionclip_jax.inference.vocabulary import parse_vocabulary

    words = parse_vocabulary(args.vocabulary)  # fail on a bad vocabulary before loading
    out_path = check_output(args.out)
    vis_dir = None
    if args.vis and (len(images) > 1 or not args.vis.lower().endswith(".png")):
        vis_dir = Path(args.vis)
        vis_dir.mkdir(parents=True, exist_ok=True)
    elif args.vis:
        check_output(args.vis, "--vis")
    # Written now (no results yet), so a bad --out fails before the model is loaded.
    results = _Results(out_path, words, args.format)
    try:
        model = _load_model(args)
        names, _ = model.class_embeddings(words)
        results.classes = names
        _classify_images(args, model, images, boxes, words, names, vis_dir, results)
    finally:
        results.close()
    n = sum(len(r["detections"]) for r in results.results)
    print(f"wrote {args.out}: {n} detections in {len(results.results)} image(s)")
    if results.failed:
        shown = "; ".join(f"{f['image']}: {f['error']}" for f in results.failed[:3])
        more = f" (+{len(results.failed) - 3} more)" if len(results.failed) > 3 else ""
        done = len(results.results) + len(results.failed)
        stopped = (
            f" (--on-error stop: {len(images) - done} image(s) not processed)"
            if done < len(images)
            else ""
        )
        raise ImagesFailed(
            f"{len(results.failed)} of {len(images)} image(s) failed{stopped}, the results of "
            f"the other {len(results.results)} are in {args.out}: {shown}{more}"
        )
    return 0


def _classify_images(args, model, images, boxes, words, names, vis_dir, results: _Results):
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from tqdm.auto import tqdm

    bar = tqdm(
        images,
        desc="classify",
        unit="image",
        disable=args.quiet or len(images) < 2,
        file=sys.stderr,
    )
    image_ids = coco_image_ids(images) if args.format == "coco" else {}
    for img in bar:
        try:
            # Proposal mode without boxes; masks when the checkpoint has a mask head.
            dets, scores = model.detect_with_scores(
                img,
                words,
                None if boxes is None else boxes[img],
                score_thresh=args.score_thresh,
                nms_thresh=args.nms_thresh,
                max_detections=args.max_dets,
                clip_boxes=args.clip_boxes,
            )
        except (OSError, ValueError) as e:  # an unreadable image or invalid boxes
            reason = _reason(e)
            results.fail(img, reason)
            bar.write(f"regionclip-jax classify: skipped {img}: {reason}", file=sys.stderr)
            if args.on_error == "stop":
                break
            continue
        if args.format == "pipeline":
            results.add({"image": img, "detections": dets.to_pipeline()})
        elif args.format == "coco":
            results.add({"image": img, "detections": dets.to_coco(image_ids[img])})
        else:
            results.add(
                {
                    "image": img,
                    "detections": dets.to_dict()["detections"],
                    "regions": _regions(scores, names),
                }
            )
        if args.vis:
            # lazy: a CLI command module; each command loads only what it runs (fast --help)
            from regionclip_jax.inference.preprocess import load_image
            from regionclip_jax.inference.visualize import draw_detections

            out = vis_dir / f"{Path(img).stem}.png" if vis_dir else Path(args.vis)
            draw_detections(load_image(img), dets, out=out)


# --------------------------------------------------------------------------------------- export


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--rpn",
        metavar="PATH",
        help="the offline RPN whose proposals are classified (an `rpn` workdir, its export/ "
        "dir, or a detectron2 RPN .pth); required: the exported program is proposal mode",
    )
    p.add_argument(
        "--rpn-pre-nms-topk",
        type=int,
        default=None,
        help="RPN candidates per level before NMS (default: C4 / CLIP 6000, FPN 1000)",
    )
    p.add_argument(
        "--rpn-post-nms-topk",
        type=int,
        default=1000,
        help="RPN proposals per image, the program's static proposal count (1000)",
    )
    p.add_argument("--rpn-nms-thresh", type=float, default=0.9, help="RPN NMS IoU (0.9)")
    p.add_argument(
        "--vocabulary",
        "-v",
        required=True,
        help="words file (one per line) or comma-separated words (embeddings baked in)",
    )
    p.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="FILE.jax",
        help="the serialized program (jax.export); the metadata goes next to it as FILE.json",
    )
    _resize_args(
        p,
        canvas_help="the program's static canvas, multiples of 32 (default: the landscape canvas "
        "of --min-size / --max-size, ceil32 of each: 800 x 1344)",
    )
    p.add_argument("--score-thresh", type=float, default=0.001)
    p.add_argument("--nms-thresh", type=float, default=0.5)
    p.add_argument(
        "--max-dets", type=int, default=100, help="detections per image (padded output length)"
    )
    p.add_argument(
        "--max-candidates",
        type=int,
        default=2000,
        help="(proposal, class) pairs kept before NMS (exact while no more pass the threshold)",
    )
    p.add_argument(
        "--platforms",
        nargs="+",
        metavar="P",
        help="platforms to lower for: cpu cuda rocm tpu (default: this machine's backend)",
    )
    p.set_defaults(no_masks=True)  # masks are not exported: do not load a mask head


def run_export(args: argparse.Namespace) -> int:
    """`export_detector` of the checkpoint + RPN; every input is checked before the model loads."""
    if args.rpn is None:
        raise ValueError(
            "export needs --rpn PATH: the exported program detects with an offline RPN's "
            "proposals (an `rpn` workdir, its export/ dir, or a detectron2 RPN .pth)"
        )
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from regionclip_jax.convert.rpn import check_rpn_path
    from regionclip_jax.inference.export import check_export_settings, metadata_path
    from regionclip_jax.inference.preprocess import default_canvas
    from regionclip_jax.inference.vocabulary import parse_vocabulary

    check_rpn_path(args.rpn)
    words = parse_vocabulary(args.vocabulary)
    if not 1 <= args.min_size <= args.max_size:
        raise ValueError(
            f"need 1 <= --min-size <= --max-size, got {args.min_size}, {args.max_size}"
        )
    canvas = tuple(args.canvas or default_canvas(1, 2, args.min_size, args.max_size))
    check_export_settings(
        canvas,
        score_thresh=args.score_thresh,
        nms_thresh=args.nms_thresh,
        max_detections=args.max_dets,
        max_candidates=args.max_candidates,
        platforms=args.platforms,
    )
    out = check_output(args.out)
    check_output(metadata_path(out), "--out's metadata file")
    try:
        import flatbuffers  # noqa: F401  (jax.export's serialization needs it)
    except ImportError:
        raise ImportError(
            "export needs the flatbuffers package (jax.export serialization): "
            "pip install flatbuffers"
        ) from None
    from regionclip_jax.inference.export import export_detector

    model = _load_model(args)
    path = export_detector(
        model,
        words,
        out,
        canvas=canvas,
        score_thresh=args.score_thresh,
        nms_thresh=args.nms_thresh,
        max_detections=args.max_dets,
        max_candidates=args.max_candidates,
        platforms=args.platforms,
    )
    size = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({size:.1f} MiB) and {metadata_path(path)}: {len(words)} classes, canvas "
        f"{canvas[0]}x{canvas[1]}, up to {args.max_dets} detections per image, symbolic batch"
    )
    return 0


# --------------------------------------------------------------------------- convert-regionclip


def add_convert_regionclip_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        "-i",
        required=True,
        metavar="FILE.pth",
        help="RegionCLIP checkpoint (detectron2 .pth, e.g. regionclip_pretrained-cc_rn50.pth)",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at DIR")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickled NumPy arrays (the released files need it; trusted files only)",
    )
    p.add_argument(
        "--text-from",
        metavar="FILE",
        help="OpenAI CLIP file for the text tower if the .pth has no lang_encoder.* keys",
    )


def run_convert_regionclip(args: argparse.Namespace) -> int:
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from regionclip_jax.convert.checkpoint import check_destination
    from regionclip_jax.convert.regionclip import load_regionclip_file, save_regionclip

    check_destination(args.output, overwrite=args.overwrite)
    w = load_regionclip_file(
        args.input, trust_pickle=args.trust_pickle, text_from=args.text_from, load_teacher=False
    )
    dest = save_regionclip(w, args.output, overwrite=args.overwrite, source=args.input)
    heads = ", ".join(f"{k} {list(v.shape)}" for k, v in w.heads.items()) or "none"
    mask = f"deconv {list(w.mask_head['deconv.weight'].shape)}" if w.mask_head else "none"
    print(
        f"wrote {dest} (embed dim {w.clip.config.embed_dim}; predictor: {heads}; mask head: "
        f"{mask}; {len(w.ignored)} offline-RPN / buffer keys not converted)"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# add-proposals


def add_add_proposals_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="IN", help="input shard directory")
    p.add_argument("--out", "-o", required=True, metavar="OUT", help="output shard directory")
    p.add_argument(
        "--rpn",
        required=True,
        metavar="PATH",
        help="offline RPN: an `rpn` workdir, its export/ dir, or a detectron2 RPN .pth",
    )
    p.add_argument(
        "--topk", type=int, default=300, help="proposals kept per image (pretraining: 300)"
    )
    p.add_argument(
        "--nms-thresh",
        type=float,
        default=0.5,
        help="the RPN's NMS IoU (pretraining: 0.5, OFFLINE_RPN_NMS_THRESH)",
    )
    p.add_argument(
        "--pre-nms-topk",
        type=int,
        default=None,
        metavar="K",
        help="RPN candidates per level before NMS (default: FPN 1000, C4 / CLIP 6000)",
    )
    _resize_args(
        p, canvas_help="one fixed canvas (default: ceil32(min) x ceil32(max) and its transpose)"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per RPN call")
    p.add_argument(
        "--records-per-shard", type=int, default=None, metavar="N", help="default: as the input"
    )
    p.add_argument("--threads", type=int, default=4, help="threads decoding/resizing images")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_add_proposals(args: argparse.Namespace) -> int:
    """Runs `proposals.add_proposals` with a progress bar; prints the summary; returns 0."""
    # lazy: a CLI command module; each command loads only what it runs (fast --help)
    from tqdm import tqdm

    from regionclip_jax.inference.proposals import add_proposals, format_summary

    with tqdm(unit="img", desc="add-proposals", disable=args.quiet, file=sys.stderr) as bar:
        summary = add_proposals(
            args.shards,
            args.out,
            args.rpn,
            min_size=args.min_size,
            max_size=args.max_size,
            canvas=None if args.canvas is None else tuple(args.canvas),
            topk=args.topk,
            pre_nms_topk=args.pre_nms_topk,
            nms_thresh=args.nms_thresh,
            batch_size=args.batch_size,
            records_per_shard=args.records_per_shard,
            num_threads=args.threads,
            overwrite=args.overwrite,
            progress=bar.update,
            set_total=lambda n: setattr(bar, "total", n),
        )
    print(format_summary(summary))
    return 0


# ------------------------------------------------------------------------------------ standalone

COMMANDS = {
    "embed-text": (add_embed_text_arguments, run_embed_text),
    "region-features": (add_region_features_arguments, run_region_features),
    "classify": (add_classify_arguments, run_classify),
    "export": (add_export_arguments, run_export),
    "convert-regionclip": (add_convert_regionclip_arguments, run_convert_regionclip),
    "add-proposals": (add_add_proposals_arguments, run_add_proposals),
}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m regionclip_jax.inference.commands <cmd> ...`; errors -> one line, exit 2."""
    parser = argparse.ArgumentParser(prog="regionclip-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _) in COMMANDS.items():
        add(sub.add_parser(name))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (OSError, ValueError, ImportError) as e:
        msg = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"regionclip-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
