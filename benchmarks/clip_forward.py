"""Benchmark: CLIP image-tower forward, ours (JAX, jit) vs open_clip (PyTorch), same run.

Usage:
  python -m benchmarks.clip_forward [--model RN50] [--batch 8] [--repeats 10] [--dtype float32]

Both towers get the same random weights (ours converted from the open_clip state dict) and the same
input; the outputs are checked to agree before anything is timed. Timings are interleaved
(see benchmarks/common.py) and the table reports medians and the ratio open_clip / ours
(> 1 means ours is faster). Needs the dev requirements (torch, open_clip).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_line, median, time_interleaved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="RN50", help="open_clip model name (RN50, ViT-B-32, ...)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    import open_clip
    import torch

    from regionclip_jax.convert import clip_from_state_dict, infer_config

    torch.manual_seed(0)
    ref = open_clip.create_model(args.model, pretrained=None).eval()
    res = ref.visual.image_size
    res = res[0] if isinstance(res, tuple | list) else res
    act = type(ref.transformer.resblocks[0].mlp.gelu).__name__
    config = infer_config(
        ref.state_dict(), activation="quick_gelu" if act == "QuickGELU" else "gelu"
    )
    ours = clip_from_state_dict(ref.state_dict(), config=config, dtype=jnp.dtype(args.dtype))

    images = np.random.default_rng(0).standard_normal((args.batch, res, res, 3), np.float32)
    images_nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    images_jax = jnp.asarray(images)

    from flax import nnx

    encode = nnx.jit(lambda m, x: m.encode_image(x))

    def run_ours():
        return encode(ours, images_jax).block_until_ready()

    def run_ref():
        with torch.no_grad():
            return ref.encode_image(images_nchw)

    got, want = np.asarray(run_ours(), np.float32), run_ref().numpy()
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    if args.dtype == "float32" and rel > 1e-4:
        raise SystemExit(f"outputs disagree (max|Δ|/max|ref| = {rel:.2e}); not timing")

    times = time_interleaved({"ours": run_ours, "open_clip": run_ref}, repeats=args.repeats)
    t_ours, t_ref = median(times["ours"]), median(times["open_clip"])
    print(f"# {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        f"# {args.model} image tower, batch {args.batch}, {res}x{res}, {args.dtype}, "
        f"{args.repeats} interleaved repeats, medians; max|Δ|/max|ref| = {rel:.1e}"
    )
    print("| model | batch | ours (s) | open_clip (s) | open_clip / ours |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {args.batch} | {t_ours:.3f} | {t_ref:.3f} | {t_ref / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
