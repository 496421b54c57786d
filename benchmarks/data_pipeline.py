"""Benchmark: pretraining pipeline throughput (images/s) on an 800 x 1333 canvas.

Usage:
  python -m benchmarks.data_pipeline [--images 96] [--batch 8] [--batches 24] [--workers 0 1 2]
      [--source synthetic|shapesworld] [--no-normalize]

Input: synthetic JPEGs of CC3M-like size (default 500 x 375 landscape, quality 90, smooth random
texture plus noise, about 40-60 KB each, like web photos) or ShapesWorld 128 x 128 PNGs, written
to shards in a temporary folder. The pipeline is `make_pretrain_dataset(canvas=(800, 1333),
min_size=800, max_size=1333)` with captions tokenized: every image is decoded, resized to
800 x 1066 (bicubic), flipped at random, padded, normalised (float32) and batched.

Reported per setting: images/s over `--batches` batches after 2 warm-up batches, and images/s per
worker process (`num_workers=0` is the main process with `read_threads` threads). The same
machine runs all settings one after another; on a shared machine, read ratios with care.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image


def _synthetic_jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    # Smooth colour field (upsampled coarse noise) + fine noise: JPEG sizes like photos.
    coarse = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = np.clip(img + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_inputs(out: str, n: int, source: str, size: tuple[int, int]) -> float:
    """Writes `n` records to shards in `out`; returns the mean encoded image size (bytes)."""
    from regionclip_jax.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    sizes = []
    with ShardWriter(out, "bench", records_per_shard=max(1, n // 4)) as w:
        for i in range(n):
            if source == "synthetic":
                data = _synthetic_jpeg(rng, *size)
            else:
                from regionclip_jax.data.shapesworld import encode_image, render_scene

                data = encode_image(render_scene(i, seed=0).image)
            sizes.append(len(data))
            w.write({"id": f"b{i}", "image": data, "captions": [f"a photo of thing {i}"]})
    return float(np.mean(sizes))


def measure(path: str, *, workers: int, batch: int, batches: int, normalize: bool) -> float:
    """images/s of the pretraining pipeline over `batches` batches (after 2 warm-up batches)."""
    from regionclip_jax.data.pipeline import make_pretrain_dataset

    ds = make_pretrain_dataset(
        path,
        batch_size=batch,
        canvas=(800, 1333),
        min_size=800,
        max_size=1333,
        num_workers=workers,
        normalize=normalize,
        seed=0,
    )
    it = iter(ds)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        del b
    seconds = time.perf_counter() - start
    it.close()
    return batches * batch / seconds


def main(argv: list[str] | None = None) -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--source", choices=("synthetic", "shapesworld"), default="synthetic")
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--no-normalize", action="store_true")
    args = p.parse_args(argv)

    from benchmarks.common import machine_line

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shards")
        mean_bytes = write_inputs(path, args.images, args.source, (args.height, args.width))
        print(machine_line())
        desc = (
            f"{args.width}x{args.height} JPEG q90"
            if args.source == "synthetic"
            else "ShapesWorld 128x128 PNG"
        )
        print(
            f"input: {args.images} {desc} (mean {mean_bytes / 1024:.0f} KiB); canvas 800x1333, "
            f"batch {args.batch}, normalize={not args.no_normalize}"
        )
        print("| worker processes | images/s | images/s per process |")
        print("|---|---|---|")
        for w in args.workers:
            ips = measure(
                path,
                workers=w,
                batch=args.batch,
                batches=args.batches,
                normalize=not args.no_normalize,
            )
            print(f"| {w} (main process)" if w == 0 else f"| {w}", end="")
            print(f" | {ips:.1f} | {ips / max(w, 1):.1f} |")


if __name__ == "__main__":
    main()
