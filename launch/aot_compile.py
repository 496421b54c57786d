r"""Compiles the real train step for a TPU topology on this (CPU) machine and reports its cost.

Ahead-of-time compilation with libtpu's compiler: no TPU is needed, only `jax[tpu]` installed
(`make aot-setup` makes `.venv-tpu`). For each topology it prints the per-chip memory XLA
planned (arguments, temporaries, outputs), whether that fits the chip's HBM, the compiled FLOPs
per step, and the step time and wall-clock a given MFU would give. No weights or data are read:
`model.init` is replaced by `--preset` (the same architecture) and the batch is abstract.

  .venv-tpu/bin/python launch/aot_compile.py --config=configs/pretrain_rn50_cc3m.py \
      --preset=RN50 --topology=v5p:2x2x1,v5e:2x2,v5e:2x4 [--config.model.dtype=bfloat16]

Topology names are libtpu's: `v5p:AxBxC` (chips per dimension; v5p-8 = 2x2x1, 4 chips),
`v5e:AxB` (v5litepod-8 = 2x4, 8 chips), `v4:AxBxC`, `v6e:AxB`.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; run nothing here

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config (mode pretrain or clip)."
)
_TOPOLOGY = flags.DEFINE_list("topology", None, "TPU topologies, e.g. v5p:2x2x1,v5e:2x4.")
_PRESET = flags.DEFINE_string(
    "preset", None, "CLIP preset standing in for model.init (RN50, RN50x4, ...)."
)
_CONCEPTS = flags.DEFINE_integer(
    "num_concepts", 4764, "Concept pool size (RegionCLIP's COCO-caption nouns: 4764)."
)
_MFU = flags.DEFINE_float("mfu", 0.4, "MFU assumed for the projected step time.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")

# HBM per chip (GiB), from the Cloud TPU system-architecture pages.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Dense bf16 peak per chip, matching regionclip_jax.train.throughput.PEAK_FLOPS.
PEAK = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


def _task(config, num_concepts: int):
    if config.mode == "pretrain":
        from regionclip_jax.train.pretrain_trainer import PretrainTask

        return PretrainTask(config, [f"concept{i}" for i in range(num_concepts)])
    if config.mode == "clip":
        from regionclip_jax.train.clip_trainer import ClipTask

        return ClipTask(config)
    raise SystemExit(f"aot_compile: mode {config.mode!r} is not supported (pretrain, clip)")


def compile_for(config, topology: str, num_concepts: int, mfu: float) -> dict:
    """Compiles the train step of `config` for `topology`; returns the report row."""
    import jax
    from jax.experimental import topologies

    from regionclip_jax import config as config_lib
    from regionclip_jax import parallel
    from regionclip_jax.train import loop, throughput

    generation = topology.split(":")[0]
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    devices = list(topo.devices)
    hosts = len({d.process_index for d in devices})
    config_lib.validate(config, len(devices), hosts)
    mesh = parallel.make_mesh(dict(config.mesh or {"data": -1}), devices)
    rules = parallel.rules_from_config(config)
    program = loop.build_step(config, _task(config, num_concepts), mesh, rules)
    row = {
        "topology": topology,
        "chips": len(devices),
        "hosts": hosts,
        "mesh": dict(mesh.shape),
        "batch_per_chip": int(config.data.batch_size) / len(devices),
        "dtype": str(config.model.dtype),
        "hbm_gib": HBM_GIB[generation],
        "mfu": mfu,
        "total_steps": int(config.total_steps),
    }
    try:
        with jax.set_mesh(mesh), parallel.axis_rules(rules):
            lowered = program.jitted.lower(program.abstract_state, program.abstract_batch)
            compiled = lowered.compile()
    except Exception as e:  # libtpu refuses programs that cannot fit: report, go on
        match = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or match is None:
            raise
        return row | {"fits": False, "temporaries_gib": float(match.group(1)), "error": "HBM"}
    mem = compiled.memory_analysis()
    gib = 2.0**30
    arg, out, tmp, alias = (
        mem.argument_size_in_bytes / gib,
        mem.output_size_in_bytes / gib,
        mem.temp_size_in_bytes / gib,
        mem.alias_size_in_bytes / gib,
    )
    peak_mem = arg + out - alias + tmp  # donated state: outputs reuse the argument buffers
    flops = throughput.compiled_flops(compiled) or 0.0
    step_s = flops / (mfu * PEAK[generation]) if flops else float("nan")
    return row | {
        "arguments_gib": round(arg, 2),
        "temporaries_gib": round(tmp, 2),
        "outputs_gib": round(out, 2),
        "peak_gib": round(peak_mem, 2),
        "fits": peak_mem <= 0.95 * HBM_GIB[generation],
        "tflop_per_chip_step": round(flops / 1e12, 3),
        "tflop_per_step": round(flops * len(devices) / 1e12, 2),
        "step_seconds_at_mfu": round(step_s, 3),
        "days_at_mfu": round(step_s * row["total_steps"] / 86400, 2),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        sys.exit("aot_compile needs jax[tpu] (libtpu): `make aot-setup`, then .venv-tpu/bin/python")
    config = _CONFIG.value
    config.unlock()
    if config.model.init:
        if not _PRESET.value:
            sys.exit("model.init is set: pass --preset with its architecture (e.g. RN50)")
        config.model.init = ""
    if _PRESET.value:
        config.model.preset = _PRESET.value
    rows = []
    header = (
        f"{'topology':<12}{'chips':>6}{'img/chip':>9}{'dtype':>9}{'args':>8}{'temp':>8}"
        f"{'peak GiB':>9}{'HBM':>5}{'fits':>6}{'TFLOP/chip':>11}{'step s':>8}{'days':>7}"
    )
    print(header, flush=True)
    for topology in _TOPOLOGY.value:
        r = compile_for(config, topology, _CONCEPTS.value, _MFU.value)
        rows.append(r)
        if "error" in r:
            print(
                f"{r['topology']:<12}{r['chips']:>6}{r['batch_per_chip']:>9.1f}{r['dtype']:>9}"
                f"{'':>8}{r['temporaries_gib']:>8.2f}{'':>9}{r['hbm_gib']:>5}{'NO':>6}"
                "   (libtpu: temporaries exceed HBM)",
                flush=True,
            )
            continue
        print(
            f"{r['topology']:<12}{r['chips']:>6}{r['batch_per_chip']:>9.1f}{r['dtype']:>9}"
            f"{r['arguments_gib']:>8.2f}{r['temporaries_gib']:>8.2f}{r['peak_gib']:>9.2f}"
            f"{r['hbm_gib']:>5}{'yes' if r['fits'] else 'NO':>6}{r['tflop_per_chip_step']:>11.3f}"
            f"{r['step_seconds_at_mfu']:>8.3f}{r['days_at_mfu']:>7.2f}",
            flush=True,
        )
    print(f"(step time and days at {_MFU.value:.0%} MFU of the dense bf16 peak; "
          f"{rows[0]['total_steps']} steps)")  # fmt: skip
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
