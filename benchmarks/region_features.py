"""Benchmark: RegionCLIP region features, ours (JAX, jit) vs a PyTorch reference, same run; and the
per-image latency of `RegionCLIP.classify_regions` with a 1,203-word vocabulary.

Usage:
  python -m benchmarks.region_features [--boxes 1000] [--repeats 3] [--classify-boxes 100]

Region features: RN50 (random weights, BN statistics randomised), one 800x1333 image zero-padded to
the 800x1344 canvas, `--boxes` random boxes. Ours: `RegionEncoder` (trunk -> RoIAlign -> layer4 ->
attnpool) under `jax.jit`. Reference: open_clip's ModifiedResNet stem/layer1-3, torchvision
`roi_align(aligned=True, sampling_ratio=0)`, layer4, attnpool under `torch.no_grad()`. Outputs are
checked to agree (max|Δ|/max|ref| <= 1e-4) before timing; timings are interleaved, medians.

Classify: `RegionCLIP.classify_regions` on the same image with `--classify-boxes` boxes and 1,203
synthetic class names (`--templates` prompt templates each; their embeddings are computed once and then served from the on-disk cache,
as in normal use; the one-off embedding time is printed separately). Needs torch + open_clip.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import machine_line, median, time_interleaved


def random_boxes(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w - 16, h - 16], (n, 2))
    wh = rng.uniform(16, [w, h], (n, 2)) * rng.uniform(0.05, 1.0, (n, 1))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classify-boxes", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=1203)
    parser.add_argument(
        "--templates",
        type=int,
        default=1,
        help="prompt templates for the benchmark vocabulary (81 = RegionCLIP's full ensemble; "
        "only the one-off embedding time depends on it)",
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import open_clip
    import torch
    from flax import nnx
    from torchvision.ops import roi_align

    from regionclip_jax.convert import clip_from_state_dict, infer_config
    from regionclip_jax.models.region import RegionEncoder

    torch.manual_seed(0)
    ref = open_clip.create_model("RN50", pretrained=None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in ref.named_buffers():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        for name, t in ref.named_parameters():
            if name.endswith("bn3.weight"):  # zero-init in open_clip: make every block count
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.25)
    config = infer_config(ref.state_dict())
    clip = clip_from_state_dict(ref.state_dict(), config=config)

    h, w, canvas = 800, 1333, (800, 1344)
    rng = np.random.default_rng(0)
    image = np.zeros((1, *canvas, 3), np.float32)
    image[0, :h, :w] = rng.standard_normal((h, w, 3), np.float32)
    boxes = random_boxes(args.boxes, h, w)[None]

    graphdef, state = nnx.split(RegionEncoder(clip.visual))
    fn = jax.jit(lambda s, x, b: nnx.merge(graphdef, s)(x, b))
    x_jax, b_jax = jnp.asarray(image), jnp.asarray(boxes)
    t0 = time.perf_counter()
    fn(state, x_jax, b_jax).block_until_ready()
    compile_s = time.perf_counter() - t0

    x_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
    rois = torch.from_numpy(np.concatenate([np.zeros((args.boxes, 1), np.float32), boxes[0]], 1))
    v = ref.visual

    def run_ref():
        with torch.no_grad():
            res4 = v.layer3(v.layer2(v.layer1(v.stem(x_t))))
            return v.attnpool(v.layer4(roi_align(res4, rois, 14, 1 / 16, 0, True)))

    def run_ours():
        return fn(state, x_jax, b_jax).block_until_ready()

    got, want = np.asarray(run_ours())[0], run_ref().numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    if rel > 1e-4:
        raise SystemExit(f"outputs disagree (max|Δ|/max|ref| = {rel:.2e}); not timing")
    times = time_interleaved({"ours": run_ours, "torch": run_ref}, repeats=args.repeats, warmup=0)
    t_ours, t_ref = median(times["ours"]), median(times["torch"])
    print(f"# {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        f"# RN50 region features, 1 image {h}x{w} on a {canvas[0]}x{canvas[1]} canvas, "
        f"{args.boxes} boxes, fp32, {args.repeats} interleaved repeats, medians; "
        f"max|Δ|/max|ref| = {rel:.1e}; first call (compile + run) {compile_s:.1f} s"
    )
    print("| boxes | ours (s) | torch reference (s) | reference / ours |")
    print("|---|---|---|---|")
    print(f"| {args.boxes} | {t_ours:.2f} | {t_ref:.2f} | {t_ref / t_ours:.2f}x |")

    # ---------------------------------------------------------------- classify latency
    from PIL import Image

    from regionclip_jax.inference import RegionCLIP
    from regionclip_jax.text import TEMPLATES

    words = [f"object class {i}" for i in range(args.vocab)]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/image.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        model = RegionCLIP(clip, identity="benchmark", cache_dir=f"{tmp}/cache")
        cboxes = random_boxes(args.classify_boxes, h, w, seed=1)
        t0 = time.perf_counter()
        templates = TEMPLATES[: args.templates]
        model.text_embeddings(words, templates=templates)
        embed_s = time.perf_counter() - t0
        model.classify_regions(path, cboxes, words, templates=templates)  # compile
        lat = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.classify_regions(path, cboxes, words, templates=templates)
            lat.append(time.perf_counter() - t0)
    print(
        f"\n# classify_regions: {args.vocab}-word vocabulary ({args.templates}-template embeddings "
        f"computed once in {embed_s:.0f} s, then cached), {args.classify_boxes} boxes, 800x1333 PNG, "
        "includes decoding, resize, features, classifier"
    )
    print("| vocabulary | boxes | latency per image (s) |")
    print("|---|---|---|")
    print(f"| {args.vocab} | {args.classify_boxes} | {median(lat):.2f} |")


if __name__ == "__main__":
    main()
