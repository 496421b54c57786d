"""Ahead-of-time compile of `roi_align(impl="einsum")` for TPU topologies, on a CPU machine.

Usage (needs `pip install "jax[tpu]==<your jax version>"`, which brings libtpu; no TPU needed):
  JAX_PLATFORMS=cpu python -m benchmarks.roi_align_tpu_aot [--topologies v5p:2x2x1 v5e:2x2]

Compiles forward and forward+backward (gradient w.r.t. the features) of the C4 workload of issue 3
(one 50x84x1024 res4 map, 1,000 boxes, output 14x14, adaptive sampling, scale 1/16) for one chip of
each named topology, and prints the compiled memory analysis (arguments, outputs, temporaries) and
the compiled FLOPs. This answers "does the MXU path fit, and what is its peak memory" before any TPU
is rented.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from regionclip_jax.ops.roi_align import roi_align

WORKLOAD = dict(features=(1, 50, 84, 1024), boxes=(1, 1000, 4), output=14, scale=1 / 16)


def _compile(fn, *shapes_dtypes, device):
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes]
    return jax.jit(fn).lower(*args).compile()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", nargs="+", default=["v5p:2x2x1", "v5e:2x2"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    out = WORKLOAD["output"]

    def fwd(f, b):
        return roi_align(f, b, out, WORKLOAD["scale"], 0, True, impl="einsum")

    def fwd_bwd(f, b):
        return jax.grad(lambda f: fwd(f, b).astype(jnp.float32).sum())(f)

    print(
        f"# roi_align einsum, features {WORKLOAD['features']} {args.dtype}, "
        f"boxes {WORKLOAD['boxes']}, output {out}x{out}, adaptive sampling; jax {jax.__version__}"
    )
    print("| topology | chip | pass | args (MiB) | outputs (MiB) | temporaries (MiB) | GFLOPs |")
    print("|---|---|---|---|---|---|---|")
    for name in args.topologies:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
        device = topo.devices[0]
        for label, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
            compiled = _compile(
                fn, (WORKLOAD["features"], dtype), (WORKLOAD["boxes"], jnp.float32), device=device
            )
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            flops = (cost or {}).get("flops", float("nan")) / 1e9
            mib = 1 / 2**20
            print(
                f"| {name} | {device.device_kind} | {label} | "
                f"{mem.argument_size_in_bytes * mib:.1f} | {mem.output_size_in_bytes * mib:.1f} | "
                f"{mem.temp_size_in_bytes * mib:.1f} | {flops:.1f} |"
            )


if __name__ == "__main__":
    main()
