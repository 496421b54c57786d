"""Benchmark: host memory and time of COCO evaluation on a COCO-val-sized set (5,000 images).

Usage:
  python -m benchmarks.eval_memory [--images 5000] [--dets 100] [--batch 16] [--seed 0]

Input: a synthetic COCO-format ground truth built in NumPy (no images): 65 categories with the
OVD `split` field (48 base, 17 novel), 1-15 boxes per image (mean ~7, as COCO val), log-uniform
sizes from 8 to 400 px on 640 x 480 images. Detections: `--dets` per image as fixed-shape padded
batches like the evaluation loop produces ([B, dets, 4] xyxy, scores, category ids, a validity
mask): jittered GT boxes (85% right category, scores U(.3, 1)) filled up with random false
positives (scores U(0, .6)).

Stages, each with wall time and the process's peak RSS so far (`resource.getrusage`, ru_maxrss):
  gt       write the GT json;
  write    stream all batches through `DetectionWriter` (the detections never sit in host memory
           as a whole: peak RSS should not move);
  read     `read_detections` (the packed array: 32 bytes per detection);
  eval     `evaluate_coco` (pycocotools builds one dict per detection; this is the peak).
The last line is a one-line summary for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def synthetic_gt(num_images: int, rng: np.random.Generator) -> dict:
    """COCO instances dict: 65 categories with `split`, ~7 boxes per image."""
    novel = set(np.linspace(0, 64, 17).astype(int).tolist())  # 17 novel, 48 base, as COCO OVD
    cats = [
        {"id": k + 1, "name": f"class{k}", "split": "novel" if k in novel else "base"}
        for k in range(65)
    ]
    images, anns = [], []
    for i in range(num_images):
        w, h = 640, 480
        images.append({"id": i + 1, "width": w, "height": h, "file_name": f"{i:012d}.jpg"})
        n = int(rng.integers(1, 16))
        side = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * np.maximum([w, h] - side, 1)
        cat = rng.integers(1, 66, n)
        for j in range(n):
            bw, bh = float(side[j, 0]), float(side[j, 1])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(cat[j]),
                    "bbox": [float(xy[j, 0]), float(xy[j, 1]), bw, bh],
                    "area": bw * bh * 0.7,  # mask area < box area, as in COCO
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": cats}


def detection_batches(gt: dict, dets_per_image: int, batch: int, rng: np.random.Generator):
    """Yields (image_ids [B], boxes [B, N, 4] xyxy, scores [B, N], cats [B, N], valid [B, N])."""
    by_img: dict[int, list] = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    ids = [im["id"] for im in gt["images"]]
    n = dets_per_image
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        b = len(chunk)
        # Random false positives everywhere, then the jittered GT boxes overwrite the first slots.
        xy = rng.uniform(0, 560, (b, n, 2))
        wh = np.exp(rng.uniform(np.log(8), np.log(300), (b, n, 2)))
        boxes = np.concatenate([xy, xy + wh], -1)
        cats = rng.integers(1, 66, (b, n))
        scores = rng.uniform(0.0, 0.6, (b, n)).astype(np.float32)
        for r, img in enumerate(chunk):
            objs = by_img.get(img, [])[:n]
            for k, a in enumerate(objs):
                x, y, w, h = a["bbox"]
                j = rng.normal(0, 0.1, 4) * [w, h, w, h]
                boxes[r, k] = [x + j[0], y + j[1], x + w + j[2], y + h + j[3]]
                scores[r, k] = rng.uniform(0.3, 1.0)
                if rng.random() < 0.85:
                    cats[r, k] = a["category_id"]
        valid = np.ones((b, n), bool)
        pad = batch - b  # the last batch is padded to the static batch size, id -1
        yield (
            np.concatenate([np.asarray(chunk), -np.ones(pad, np.int64)]),
            np.concatenate([boxes, np.zeros((pad, n, 4))]).astype(np.float32),
            np.concatenate([scores, np.zeros((pad, n), np.float32)]),
            np.concatenate([cats, np.zeros((pad, n), np.int64)]),
            np.concatenate([valid, np.zeros((pad, n), bool)]),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from regionclip_jax.eval import coco, results

    rng = np.random.default_rng(args.seed)
    total0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gt = synthetic_gt(args.images, rng)
        gt_path = os.path.join(tmp, "gt.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        num_gt = len(gt["annotations"])
        rows.append(("gt", time.perf_counter() - t0, peak_rss_mib()))

        t0 = time.perf_counter()
        det_dir = os.path.join(tmp, "dets")
        with results.DetectionWriter(det_dir, process_index=0) as writer:
            for batch in detection_batches(gt, args.dets, args.batch, rng):
                writer.add(*batch)
        del gt  # the evaluator reads the json like a real run
        rows.append(("write", time.perf_counter() - t0, peak_rss_mib()))
        disk = sum(os.path.getsize(os.path.join(det_dir, p)) for p in os.listdir(det_dir))

        t0 = time.perf_counter()
        dets = results.read_detections(det_dir)
        rows.append(("read", time.perf_counter() - t0, peak_rss_mib()))

        t0 = time.perf_counter()
        metrics = coco.evaluate_coco(gt_path, dets)
        rows.append(("eval", time.perf_counter() - t0, peak_rss_mib()))
    total = time.perf_counter() - total0

    print(f"{args.images} images, {num_gt} GT boxes, {dets.shape[0]} detections "
          f"({disk / 2**20:.1f} MiB on disk)")  # fmt: skip
    print("| stage | seconds | peak RSS (MiB) |")
    print("|---|---|---|")
    for name, sec, rss in rows:
        print(f"| {name} | {sec:.1f} | {rss:.0f} |")
    print(coco.format_table({k: metrics[k] for k in ("AP", "AP50", "AP50/novel", "AP50/base")}))
    print(
        f"eval_memory: {args.images} images x {args.dets} dets: total {total:.1f} s "
        f"(eval {rows[3][1]:.1f} s); peak RSS gt {rows[0][2]:.0f} / write {rows[1][2]:.0f} / "
        f"read {rows[2][2]:.0f} / eval {rows[3][2]:.0f} MiB"
    )


if __name__ == "__main__":
    main()
