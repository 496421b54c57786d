"""The README's main job: RegionCLIP end to end on ShapesWorld, on a CPU, in minutes.

  1. data: "iconic" ShapesWorld (one large object per image, captions naming its shape) for the
     image-level teacher, and cluttered scenes (2-4 objects, captions naming up to 4 shapes) for
     region pretraining, with held-out validation scenes;
  2. teacher: image-level CLIP trained from scratch (configs/clip_shapesworld.py);
  3. student: RegionCLIP region-text pretraining from the teacher
     (configs/pretrain_shapesworld.py): teacher pseudo-labels on regions over the concept pool
     parsed from the captions, distillation + concept contrastive + image-text losses;
  4. evaluation: zero-shot recognition of every ground-truth box of the held-out scenes (10 shape
     classes, 81-template class embeddings from the shared frozen text tower) by the teacher (the
     image-level CLIP applied to regions, the paper's baseline) and by the student;
  5. a table (all / base / novel shapes) and a picture of both models' labels on the same scenes;
  6. open-vocabulary detection (the paper's transfer, spec §1.3 / §5): a class-agnostic RPN
     trained on the boxes of the 7 base shapes (configs/rpn_shapesworld.py), then Fast R-CNN
     fine-tuning on base-shape boxes only (configs/detect_shapesworld.py) from (a) the
     region-pretrained student and (b) the image-level teacher, each evaluated with COCO AP50 on
     the held-out scenes for the novel shapes (never a box in training) and the base shapes; and
     zero-shot detection by both (no fine-tuning: RPN proposals, all 10 class embeddings).

The claims under test are the paper's: region pretraining makes region recognition much better
than the image-level CLIP it started from, and it transfers to detection of novel classes. Every stage resumes: running the demo again reuses
finished stages (delete the output directory to start over).

`run(..., runlocal=True)` runs every stage at smoke-test size (`_shrink`: 32 + 8 images, 4 steps
each; a few minutes on a 2-core CPU): a check that an install works end to end, whose figures mean
nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
from PIL import Image, ImageDraw, ImageFont

from regionclip_jax.configs import (
    clip_shapesworld,
    detect_shapesworld,
    pretrain_shapesworld,
    rpn_shapesworld,
)
from regionclip_jax.convert.checkpoint import load_clip
from regionclip_jax.data import shapesworld
from regionclip_jax.eval import regions as region_eval
from regionclip_jax.models import split as split_lib
from regionclip_jax.text.embeddings import clip_text_embeddings
from regionclip_jax.train import clip_trainer, detection_trainer, pretrain_trainer, rpn_trainer

# The stages' training steps: the demo's (`make demo`) and the smoke test's (`--runlocal`).
STEPS = dict(teacher_steps=1000, student_steps=600, rpn_steps=300, detect_steps=400)
RUNLOCAL_STEPS = dict(teacher_steps=4, student_steps=4, rpn_steps=4, detect_steps=4)


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"== {name}: {timings[name]:.0f} s", flush=True)


def load_config(module, arg: str, *, runlocal: bool = False):
    """`module.get_config(arg)` of a ShapesWorld config (the file `regionclip_jax.main` takes as
    `--config=configs/<name>.py`), at smoke-test size with `runlocal` (`_shrink`)."""
    cfg = module.get_config(arg)
    if runlocal:
        _shrink(cfg)
    return cfg


def _shrink(cfg) -> None:
    """The demo's `--runlocal` size, in place: 32 + 8 generated images, batch 4, every stage a few
    steps (the step counts come in through the config args). The same stages, configs and code
    paths as the demo, to check an install end to end on a CPU in minutes; the figures it prints
    mean nothing."""
    sw = cfg.data.shapesworld
    sw.num_train, sw.num_val = 32, 8
    cfg.data.batch_size = 4
    cfg.log_every = 1
    cfg.optim.warmup_steps = 1
    if cfg.mode == "pretrain":
        cfg.pretrain.concept_min_count = 1  # a concept pool from 32 captions
    if cfg.mode in ("rpn", "detect"):
        cfg.detect.eval_batch_size = 4


def draw_comparison(scenes_dir: str, preds: dict, out: str, num_images: int = 6) -> None:
    """Picture: for `num_images` held-out scenes, teacher labels (top) and student labels
    (bottom) on the ground-truth boxes; green = right, red = wrong."""
    teacher, student = preds["teacher"], preds["student"]
    images = sorted(set(teacher["image"].tolist()))[:num_images]
    scale = 3
    font = ImageFont.load_default()
    tiles = []
    for model_name, p in (
        ("teacher (image-level CLIP)", teacher),
        ("student (RegionCLIP)", student),
    ):
        row = []
        for idx in images:
            scene = shapesworld.render_scene(
                int(idx), seed=0, split="val", config=_scene_config(scenes_dir)
            )
            im = Image.fromarray(scene.image).resize(
                (scene.image.shape[1] * scale, scene.image.shape[0] * scale), Image.NEAREST
            )
            draw = ImageDraw.Draw(im)
            sel = p["image"] == idx
            for box, label, pred in zip(p["boxes"][sel], p["labels"][sel], p["preds"][sel]):
                colour = (40, 170, 60) if label == pred else (220, 40, 40)
                x1, y1, x2, y2 = (float(v) * scale for v in box)
                draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
                text = shapesworld.SHAPES[int(pred)]
                left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
                draw.rectangle([x1, y1, x1 + right - left + 4, y1 + bottom - top + 2], fill=colour)
                draw.text((x1 + 2, y1), text, fill=(255, 255, 255), font=font)
            row.append(im)
        tiles.append((model_name, row))
    w, h = tiles[0][1][0].size
    pad, head = 6, 18
    canvas = Image.new("RGB", (len(images) * (w + pad) + pad, 2 * (h + head + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, row) in enumerate(tiles):
        y = pad + r * (h + head + pad)
        draw.text((pad, y), name, fill=(0, 0, 0), font=font)
        for c, im in enumerate(row):
            canvas.paste(im, (pad + c * (w + pad), y + head))
    canvas.save(out)


def _scene_config(scenes_dir: str):
    with open(os.path.join(scenes_dir, "shapesworld.json")) as f:
        cfg = json.load(f)["config"]
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return shapesworld.ShapesWorldConfig(**cfg)


def _stopped(out: Path) -> dict:
    print(f"\nstopped by SIGTERM after a checkpoint; run the demo again to continue ({out})")
    return {"stopped": True}


def run(
    out_dir: str = "runs/demo",
    *,
    teacher_steps: int | None = None,
    student_steps: int | None = None,
    rpn_steps: int | None = None,
    detect_steps: int | None = None,
    detection: bool = True,
    runlocal: bool = False,
) -> dict:
    """Runs the demo into `out_dir`; returns the accuracy table and the stage timings.

    A step count left None is the demo's (`STEPS`), or with `runlocal` the smoke test's
    (`RUNLOCAL_STEPS`, with the data and batches of `_shrink`).
    """
    default = RUNLOCAL_STEPS if runlocal else STEPS
    teacher_steps = default["teacher_steps"] if teacher_steps is None else teacher_steps
    student_steps = default["student_steps"] if student_steps is None else student_steps
    rpn_steps = default["rpn_steps"] if rpn_steps is None else rpn_steps
    detect_steps = default["detect_steps"] if detect_steps is None else detect_steps
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    iconic, scenes = str(out / "data" / "iconic"), str(out / "data" / "scenes")
    teacher_dir, student_dir = str(out / "teacher"), str(out / "student")
    print(
        "RegionCLIP on ShapesWorld: teacher CLIP -> region pretraining -> zero-shot region "
        f"recognition. Output: {out}\nbackend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)",
        flush=True,
    )

    clip_cfg = load_config(
        clip_shapesworld, f"data={iconic},steps={teacher_steps}", runlocal=runlocal
    )
    with _stage(
        f"1/6 teacher: image-level CLIP, {teacher_steps} steps on iconic ShapesWorld", timings
    ):
        if clip_trainer.run(clip_cfg, teacher_dir).preempted:
            return _stopped(out)
    teacher_ckpt = os.path.join(teacher_dir, "export")

    pre_cfg = load_config(
        pretrain_shapesworld,
        f"teacher={teacher_ckpt},data={scenes},steps={student_steps}",
        runlocal=runlocal,
    )
    with _stage(
        f"2/6 student: region-text pretraining, {student_steps} steps on cluttered scenes", timings
    ):
        result = pretrain_trainer.run(pre_cfg, student_dir, keep_state=True)
        if result.preempted:
            return _stopped(out)

    with _stage(
        "3/6 zero-shot region recognition on held-out scenes (ground-truth boxes)", timings
    ):
        teacher = load_clip(teacher_ckpt)
        model = split_lib.merge(result.graphdef, result.state["params"], result.state["rest"])
        names = list(shapesworld.SHAPES)
        class_emb = clip_text_embeddings(teacher, names, "ensemble")
        cats = json.load(open(os.path.join(scenes, "shapesworld.json")))["categories"]
        category_map = {c["id"]: names.index(c["name"]) for c in cats}
        kw = dict(canvas=tuple(pre_cfg.data.canvas), category_map=category_map)
        preds = {
            "teacher": region_eval.region_predictions(
                teacher.visual, class_emb, os.path.join(scenes, "val"), **kw
            ),
            "student": region_eval.region_predictions(
                model.student.visual, class_emb, os.path.join(scenes, "val"), **kw
            ),
        }
        groups = {
            "base": [names.index(s) for s in shapesworld.BASE_SHAPES],
            "novel": [names.index(s) for s in shapesworld.NOVEL_SHAPES],
        }
        table = {k: region_eval.accuracy_table(v, groups) for k, v in preds.items()}

    with _stage("4/6 picture of both models' labels", timings):
        picture = str(out / "teacher_vs_student.png")
        draw_comparison(scenes, preds, picture)

    n = len(preds["teacher"]["labels"])
    chance = 1 / len(names)
    print(
        f"\nZero-shot region recognition, {n} ground-truth boxes in {len(set(preds['teacher']['image'].tolist()))} held-out scenes, {len(names)} shapes (chance {chance:.1%}):"
    )
    print(f"  {'model':<34}{'all':>8}{'base (7)':>10}{'novel (3)':>11}")
    for key, label in (
        ("teacher", "teacher: image-level CLIP"),
        ("student", "student: RegionCLIP pretrained"),
    ):
        t = table[key]
        print(f"  {label:<34}{t['all']:>8.1%}{t['base']:>10.1%}{t['novel']:>11.1%}")
    margin = table["student"]["all"] - table["teacher"]["all"]
    print(f"  margin (student - teacher): {margin * 100:+.1f} points")
    print(f"\npicture: {picture}", flush=True)
    summary = {
        "accuracy": table,
        "margin": margin,
        "boxes": n,
        "timings": timings,
        "picture": picture,
    }
    if detection:
        det = _detection_stages(
            out, scenes, teacher_ckpt, student_dir, rpn_steps, detect_steps, timings, runlocal
        )
        if det.get("stopped"):
            return det
        summary["detection"] = det
    total = sum(timings.values())
    print(
        f"\ntotal time {total / 60:.1f} min ("
        + ", ".join(f"{k.split(' ')[0]} {v:.0f}s" for k, v in timings.items())
        + ")",
        flush=True,
    )
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def _detection_stages(
    out: Path,
    scenes: str,
    teacher_ckpt: str,
    student_dir: str,
    rpn_steps: int,
    detect_steps: int,
    timings: dict[str, float],
    runlocal: bool,
) -> dict:
    """Stage 5 (base-class RPN) and 6 (OVD fine-tuning from student and teacher); AP50 table."""
    rpn_dir = str(out / "rpn")
    rpn_cfg = load_config(
        rpn_shapesworld,
        f"teacher={teacher_ckpt},data={scenes},steps={rpn_steps}",
        runlocal=runlocal,
    )
    with _stage(
        f"5/6 proposals: class-agnostic RPN on base-shape boxes, {rpn_steps} steps", timings
    ):
        result = rpn_trainer.run(rpn_cfg, rpn_dir)
        if result.preempted:
            return _stopped(out)
        recall = {k[5:]: v for k, v in result.metrics.items() if k.startswith("eval/")}
    inits = {"student": os.path.join(student_dir, "export"), "teacher": teacher_ckpt}
    ap: dict[str, dict[str, float]] = {}
    zero_shot: dict[str, dict[str, float]] = {}
    with _stage(
        f"6/6 open-vocabulary detection: fine-tune on base shapes ({detect_steps} steps) and zero-shot, "
        "from the student and from the teacher",
        timings,
    ):
        for name, init in inits.items():
            cfg = load_config(
                detect_shapesworld,
                f"init={init},rpn={rpn_dir},data={scenes},steps={detect_steps}",
                runlocal=runlocal,
            )
            print(f"\n-- fine-tuning from the {name} --", flush=True)
            result = detection_trainer.run(cfg, str(out / f"detect_{name}"))
            if result.preempted:
                return _stopped(out)
            ap[name] = {k[5:]: v for k, v in result.metrics.items() if k.startswith("eval/")}
            zs_cfg = load_config(
                detect_shapesworld,
                f"init={init},rpn={rpn_dir},data={scenes},zeroshot",
                runlocal=runlocal,
            )
            print(f"\n-- zero-shot detection (no fine-tuning) with the {name} --", flush=True)
            zero_shot[name] = detection_trainer.run(zs_cfg, str(out / f"zeroshot_{name}")).metrics

    print("\nOpen-vocabulary detection on the held-out scenes (COCO AP50, %):")
    print(
        f"  RPN recall@100 (IoU 0.5): base {recall.get('recall@100/base', float('nan')):.1%}, "
        f"novel {recall.get('recall@100/novel', float('nan')):.1%}"
    )
    print(f"  {'initialisation':<34}{'novel (3)':>11}{'base (7)':>10}{'all':>8}")
    for key, label in (
        ("teacher", "teacher: image-level CLIP"),
        ("student", "student: RegionCLIP pretrained"),
    ):
        m = ap[key]
        print(f"  {label:<34}{m['AP50/novel']:>11.1f}{m['AP50/base']:>10.1f}{m['AP50/all']:>8.1f}")
    for key, label in (
        ("teacher", "teacher, zero-shot (no fine-tuning)"),
        ("student", "student, zero-shot (no fine-tuning)"),
    ):
        m = zero_shot[key]
        print(f"  {label:<34}{m['AP50/novel']:>11.1f}{m['AP50/base']:>10.1f}{m['AP50/all']:>8.1f}")
    gain = ap["student"]["AP50/novel"] - ap["teacher"]["AP50/novel"]
    print(
        f"  novel AP50 margin after fine-tuning (student - teacher): {gain:+.1f} points", flush=True
    )
    if all("segm/AP50/novel" in ap[k] for k in ap):
        # The fine-tuned detectors' mask head (zero-shot runs have no trained one).
        print("Instance masks of the fine-tuned detectors (COCO mask AP50, %):")
        print(f"  {'initialisation':<34}{'novel (3)':>11}{'base (7)':>10}{'all':>8}")
        for key, label in (
            ("teacher", "teacher: image-level CLIP"),
            ("student", "student: RegionCLIP pretrained"),
        ):
            m = {k[5:]: v for k, v in ap[key].items() if k.startswith("segm/")}
            print(
                f"  {label:<34}{m['AP50/novel']:>11.1f}{m['AP50/base']:>10.1f}"
                f"{m['AP50/all']:>8.1f}",
                flush=True,
            )
    return {"rpn_recall": recall, "ap": ap, "zero_shot": zero_shot, "novel_ap50_margin": gain}
