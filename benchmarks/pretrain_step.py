"""Benchmark: one RegionCLIP pretraining step (student + frozen teacher, 3 losses) on the local
devices: step time, images/s, XLA's FLOPs per device and MFU against the chip's dense bf16 peak.

Usage:
  python -m benchmarks.pretrain_step [--config configs/pretrain_rn50_cc3m.py] [--preset RN50]
      [--batch_per_device 3] [--steps 20] [--dtype float32|bfloat16] [--runlocal]

Random weights and synthetic batches at the config's shapes (canvas, regions, context length),
so no data or checkpoint is needed; the step is the one training runs (loop.build_step). The
paper's per-GPU batch is 3 (32 GPUs x 3 = 96). MFU needs a known chip (throughput.PEAK_FLOPS);
on the CPU the table shows time and FLOPs only. `--runlocal` uses the config's tiny variant
(a smoke check of this script).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import jax
import numpy as np

from benchmarks.common import machine_line


def _config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("bench_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def synthetic_batch(spec: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random arrays of the batch spec: images ~ N(0, 1), random tokens, valid boxes."""
    out = {}
    for k, (shape, dtype) in spec.items():
        if k == "images":
            out[k] = rng.standard_normal(shape).astype(dtype)
        elif k == "tokens":
            t = rng.integers(1, 49000, shape).astype(dtype)
            t[:, 0], t[:, -1] = 49406, 49407  # SOT ... EOT
            out[k] = t
        elif k == "image_hw":
            out[k] = np.broadcast_to(np.array(spec["images"][0][1:3], dtype), shape).copy()
        elif k == "boxes":
            h, w = spec["images"][0][1:3]
            xy = rng.uniform(0, 0.6, shape[:-1] + (2,)) * (w, h)
            wh = rng.uniform(0.1, 0.4, shape[:-1] + (2,)) * (w, h)
            out[k] = np.concatenate([xy, xy + wh], -1).astype(dtype)
        elif k == "box_mask":
            out[k] = np.ones(shape, dtype)
        else:
            raise KeyError(f"no synthetic values for batch key {k!r}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain_rn50_cc3m.py")
    parser.add_argument("--preset", default="RN50")
    parser.add_argument("--batch_per_device", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num_concepts", type=int, default=4764)
    parser.add_argument("--runlocal", action="store_true")
    args = parser.parse_args(argv)

    from regionclip_jax import config as config_lib
    from regionclip_jax import parallel
    from regionclip_jax.train import loop, throughput
    from regionclip_jax.train import state as state_lib
    from regionclip_jax.train.pretrain_trainer import PretrainTask

    config = _config(args.config, "runlocal" if args.runlocal else None)
    config.unlock()
    n = jax.device_count()
    config.data.batch_size = args.batch_per_device * n
    config.pretrain.group_size = args.batch_per_device if config.pretrain.group_size else 0
    config.model.dtype = args.dtype
    if not args.runlocal:
        config.model.init, config.model.preset = "", args.preset
    config.mesh = {"data": -1}
    config_lib.validate(config, n, jax.process_count())
    concepts = [f"concept{i}" for i in range(args.num_concepts if not args.runlocal else 5)]
    task = PretrainTask(config, concepts)
    mesh = parallel.mesh_from_config(config)
    rules = parallel.rules_from_config(config)
    program = loop.build_step(config, task, mesh, rules)
    with jax.set_mesh(mesh), parallel.axis_rules(rules):
        state = state_lib.init_train_state(
            task.build_model, program.optimizer, 0, program.shardings
        )
        t0 = time.perf_counter()
        compiled = program.jitted.lower(program.abstract_state, program.abstract_batch).compile()
        compile_s = time.perf_counter() - t0
        host = synthetic_batch(program.batch_spec, np.random.default_rng(0))
        batch = {k: jax.device_put(v, program.batch_shardings[k]) for k, v in host.items()}
        times = []
        for i in range(args.steps + 2):  # 2 warm-up steps
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            if i >= 2:
                times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    flops = throughput.compiled_flops(compiled)
    peak = throughput.peak_flops()
    step = statistics.median(times)
    util = throughput.mfu(flops, step, peak)
    b = int(config.data.batch_size)
    canvas = tuple(config.data.canvas)
    print(machine_line())
    print(
        f"config {args.config}{':runlocal' if args.runlocal else ''} preset "
        f"{config.model.preset or 'runlocal'} dtype {args.dtype}; {n} device(s) x "
        f"{args.batch_per_device} images, canvas {canvas}, {config.pretrain.num_regions} regions "
        f"+ global box, {len(concepts)} concepts; compile {compile_s:.0f} s; loss {loss:.3f}"
    )
    print("| step (median) | images/s | TFLOP per device per step | MFU (dense bf16 peak) |")
    print("|---|---|---|---|")
    print(
        f"| {step * 1e3:.1f} ms | {b / step:.1f} | "
        f"{(flops or float('nan')) / 1e12:.3f} | "
        f"{'n/a (unknown peak)' if util is None else f'{util:.1%}'} |"
    )


if __name__ == "__main__":
    main()
