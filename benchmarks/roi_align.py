"""Benchmark: RoIAlign forward and backward, each of our implementations vs torchvision, same run.

Usage:
  python -m benchmarks.roi_align [--quick] [--repeats 5] [--impls gather einsum]
                                 [--workloads c4 fpn]

Workloads (boxes are drawn once from a fixed seed on an 800 x 1333 image):
  c4:  one 50 x 84 x 1024 res4 map (stride 16, NHWC for us, NCHW for torchvision), 1,000
       proposal-like boxes (950 with sqrt(area) log-uniform in [16, 512] px and aspect ratio in
       [0.5, 2], clipped to the image; 50 covering 70-100% of each side), output 14 x 14,
       `sampling_ratio=0` (adaptive), `aligned=True`, scale 1/16: RegionCLIP's ROIAlignV2 pooler.
  fpn: one 100 x 168 x 256 P3 map (stride 8), 1,000 boxes of the sizes detectron2's level
       assignment sends to P3 (sqrt(area) in [112, 224) px), output 7 x 7, adaptive, aligned.

Forward: our jitted `roi_align` vs `torchvision.ops.roi_align`. Backward: the gradient with respect
to the features for a fixed random output cotangent (ours: a jitted VJP, whose unused forward
XLA removes; torchvision: `torch.autograd.grad` on a retained graph). Outputs and gradients are
checked against torchvision before timing. Timings are interleaved (benchmarks/common.py),
warm-up excluded; the table reports medians and ours / torchvision (< 1 means ours is faster).
The compiled memory analysis of each of our forward programs gives its temporary-buffer peak.
"pallas" runs only where it compiles (GPU/TPU); on CPU it would run in the interpreter.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_line, median, time_interleaved

IMAGE_HW = (800, 1333)


def proposal_boxes(rng, n, n_big, lo=16.0, hi=512.0):
    """`[n, 4]` float32 xyxy boxes on `IMAGE_HW`: `n - n_big` log-uniform sizes, `n_big` huge."""
    h, w = IMAGE_HW
    m = n - n_big
    side = np.exp(rng.uniform(np.log(lo), np.log(hi), m))
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0), m))
    bw, bh = side * np.sqrt(ratio), side / np.sqrt(ratio)
    cx, cy = rng.uniform(0, w, m), rng.uniform(0, h, m)
    small = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    fx, fy = rng.uniform(0.7, 1.0, n_big), rng.uniform(0.7, 1.0, n_big)
    x1, y1 = rng.uniform(0, 1 - fx) * w, rng.uniform(0, 1 - fy) * h
    big = np.stack([x1, y1, x1 + fx * w, y1 + fy * h], 1)
    boxes = np.concatenate([small, big])
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return rng.permutation(boxes).astype(np.float32)


WORKLOADS = {
    "c4": dict(hwc=(50, 84, 1024), stride=16, out=14, n=1000, n_big=50, lo=16.0, hi=512.0),
    "fpn": dict(hwc=(100, 168, 256), stride=8, out=7, n=1000, n_big=0, lo=112.0, hi=224.0),
}


def _mib(x: int) -> str:
    return f"{x / 2**20:.0f}"


def run_workload(name, spec, impls, repeats, torch):
    import torchvision

    rng = np.random.default_rng(0)
    h, w, c = spec["hwc"]
    out, scale = spec["out"], 1.0 / spec["stride"]
    boxes = proposal_boxes(rng, spec["n"], spec["n_big"], spec["lo"], spec["hi"])
    feat = rng.standard_normal((1, h, w, c)).astype(np.float32)
    cot = rng.standard_normal((1, spec["n"], out, out, c)).astype(np.float32)

    f_t = torch.from_numpy(np.ascontiguousarray(feat.transpose(0, 3, 1, 2)))
    rois_t = torch.from_numpy(np.concatenate([np.zeros((spec["n"], 1), np.float32), boxes], 1))
    cot_t = torch.from_numpy(np.ascontiguousarray(cot[0].transpose(0, 3, 1, 2)))
    f_req = f_t.clone().requires_grad_()
    out_req = torchvision.ops.roi_align(f_req, rois_t, out, scale, 0, True)

    def tv_fwd():
        with torch.no_grad():
            return torchvision.ops.roi_align(f_t, rois_t, out, scale, 0, True)

    def tv_bwd():
        return torch.autograd.grad(out_req, f_req, cot_t, retain_graph=True)[0]

    want = tv_fwd().numpy().transpose(0, 2, 3, 1)
    want_grad = tv_bwd().numpy().transpose(0, 2, 3, 1)[0]

    f_j, b_j, g_j = jnp.asarray(feat), jnp.asarray(boxes)[None], jnp.asarray(cot)
    fns_fwd = {"torchvision": tv_fwd}
    fns_bwd = {"torchvision": tv_bwd}
    notes = []
    for impl in impls:

        def fwd(f, b, impl=impl):
            return roi_align_fn(f, b, out, scale, 0, True, impl=impl)

        def bwd(f, b, g, impl=impl):
            return jax.vjp(lambda x: fwd(x, b), f)[1](g)[0]

        fwd_c = jax.jit(fwd).lower(f_j, b_j).compile()
        bwd_c = jax.jit(bwd).lower(f_j, b_j, g_j).compile()
        err = float(np.abs(np.asarray(fwd_c(f_j, b_j))[0] - want).max())
        gerr = float(np.abs(np.asarray(bwd_c(f_j, b_j, g_j))[0] - want_grad).max())
        gerr /= float(np.abs(want_grad).max())
        if err > 1e-4 or gerr > 1e-4:
            raise SystemExit(f"{name} {impl}: disagrees with torchvision ({err:.1e}, {gerr:.1e})")
        mem = fwd_c.memory_analysis()
        bmem = bwd_c.memory_analysis()
        notes.append(
            f"{impl}: max|Δ| fwd {err:.1e}, grad max|Δ|/max|ref| {gerr:.1e}; compiled temporaries fwd "
            f"{_mib(mem.temp_size_in_bytes)} MiB, bwd {_mib(bmem.temp_size_in_bytes)} MiB "
            f"(output {_mib(mem.output_size_in_bytes)} MiB)"
        )
        fns_fwd[impl] = lambda fn=fwd_c: fn(f_j, b_j).block_until_ready()
        fns_bwd[impl] = lambda fn=bwd_c: fn(f_j, b_j, g_j).block_until_ready()

    t_fwd = time_interleaved(fns_fwd, repeats=repeats)
    t_bwd = time_interleaved(fns_bwd, repeats=max(1, repeats // 2))
    rows = []
    ref_f, ref_b = median(t_fwd["torchvision"]), median(t_bwd["torchvision"])
    for impl in ["torchvision", *impls]:
        tf, tb = median(t_fwd[impl]), median(t_bwd[impl])
        rows.append(
            f"| {name} | {impl} | {tf * 1e3:.0f} | {tf / ref_f:.2f} | {tb * 1e3:.0f} | {tb / ref_b:.2f} |"
        )
    return rows, notes


def roi_align_fn(*args, **kwargs):
    from regionclip_jax.ops import roi_align

    return roi_align(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, c4 only")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--impls", nargs="+", default=None)
    parser.add_argument("--workloads", nargs="+", default=["c4", "fpn"], choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    import torch

    impls = args.impls or (
        ["gather", "einsum"] + ([] if jax.default_backend() == "cpu" else ["pallas"])
    )
    repeats = 2 if args.quick else args.repeats
    workloads = ["c4"] if args.quick else args.workloads

    print(f"# {machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        f"# roi_align, aligned=True, sampling_ratio=0, fp32; {repeats} interleaved repeats "
        f"(backward {max(1, repeats // 2)}), medians; ratio = ours / torchvision (< 1: ours faster)"
    )
    print("| workload | impl | forward (ms) | fwd ratio | backward (ms) | bwd ratio |")
    print("|---|---|---|---|---|---|")
    all_notes = []
    for name in workloads:
        rows, notes = run_workload(name, WORKLOADS[name], impls, repeats, torch)
        print("\n".join(rows), flush=True)
        all_notes += [f"{name} {n}" for n in notes]
    for n in all_notes:
        print(f"# {n}")


if __name__ == "__main__":
    main()
