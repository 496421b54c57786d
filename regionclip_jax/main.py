"""Training entry point (flags only; the trainers are libraries under regionclip_jax.train).

  python -m regionclip_jax.main --config=configs/<experiment>.py[:arg] --workdir=DIR \
      [--config.key=value ...]

The config's `mode` picks the trainer, each a `train.run.run_task` lifecycle (validate, data,
build, resume or initialise, train, export, evaluate):
  `clip`:     image-level CLIP training (train/clip_trainer.py);
  `pretrain`: RegionCLIP region-text pretraining (train/pretrain_trainer.py);
  `detect`:   open-vocabulary detection fine-tuning and evaluation, or zero-shot evaluation
              with `detect.eval_only` (train/detection_trainer.py);
  `rpn`:      class-agnostic region proposal network training (train/rpn_trainer.py).
Running the same command again resumes from the last checkpoint in DIR. Exit status: 0 done or
stopped by SIGTERM after writing a checkpoint (preemption), 1 failed (NaN/Inf, a config without
`mode`, an error), 2 invalid config: every error, one line each (`config.optim.lr: must be a
finite number > 0, got nan`), on stderr before any data is generated or anything compiled.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_EXIT_INVALID_CONFIG = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`get_config(arg)`), e.g. configs/x.py:runlocal."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
# Multi-process: on TPU pods and under SLURM nothing is needed (detected from the environment);
# elsewhere (several CPU processes, hand-started GPU processes) give all three.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (explicit multi-process set-up)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit).")
_LOCAL_DEVICES = flags.DEFINE_list(
    "local_device_ids",
    None,
    "GPUs of this process (default under SLURM: one per task, SLURM_LOCALID; give 0,1,...,7 "
    "for one process per node).",
)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "CPU devices per process (local multi-device / multi-process runs)."
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout",
    None,
    "Seconds after which a silent process is declared dead and every process stops with an "
    "error (JAX's default: 100).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint write at INFO
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    print(f"workdir: {_WORKDIR.value}")
    print(config)
    mode = config.get("mode")
    if mode is None:
        print(
            "regionclip_jax.main: the config has no `mode` (one of: clip, pretrain, detect, "
            "rpn): the config above was resolved and nothing was run.",
            file=sys.stderr,
        )
        sys.exit(1)

    # Lazy, not at module top: jax, the models and the trainers take seconds to import, which
    # `--help` and a config without `mode` (above) do not need.
    import jax

    from regionclip_jax import config as config_lib
    from regionclip_jax import parallel
    from regionclip_jax.train import checkpointing, loop

    try:
        how = parallel.initialize_distributed(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            local_device_ids=(
                [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None
            ),
            num_cpu_devices=_NUM_CPU_DEVICES.value,
            heartbeat_timeout_s=_HEARTBEAT.value,
        )
    except ValueError as e:
        print(f"multi-process set-up: {e}", file=sys.stderr)
        sys.exit(1)
    if how != "single":
        print(
            f"process {jax.process_index()} of {jax.process_count()} ({how}): "
            f"{jax.local_device_count()} local / {jax.device_count()} devices",
            flush=True,
        )

    # Lazy as well, and after the multi-process set-up (no module may touch a JAX backend
    # before `jax.distributed.initialize`).
    from regionclip_jax.train import (
        clip_trainer,
        detection_trainer,
        pretrain_trainer,
        rpn_trainer,
    )

    trainers = {
        "clip": clip_trainer.run,
        "pretrain": pretrain_trainer.run,
        "detect": detection_trainer.run,
        "rpn": rpn_trainer.run,
    }
    try:
        # Every config error at once, before dispatch (the trainer's `run_task` validates its
        # copy again before any data generation or compilation; validation is cheap and has no
        # effects).
        config_lib.validate(config, jax.device_count(), jax.process_count())
        if mode not in trainers:
            raise config_lib.ConfigError(
                f"config.mode: unknown mode {mode!r}; valid: {config_lib.MODES}"
            )
        result = trainers[mode](config, _WORKDIR.value)
    except config_lib.ConfigError as e:
        print(e, file=sys.stderr, flush=True)  # "invalid config (N errors):" + one line each
        sys.exit(_EXIT_INVALID_CONFIG)
    except loop.NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except checkpointing.CheckpointError as e:  # says which checkpoint and what to do
        print(f"cannot resume: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:
        if jax.process_count() == 1:
            raise
        # One process failed. Exiting normally would wait in JAX's shutdown barrier for processes
        # that are themselves waiting in a collective for this one: a hang. Leave at once; the
        # others then fail fast (their collectives lose this peer) or, where a collective does
        # not notice, when the coordinator misses this process's heartbeats (--heartbeat_timeout).
        traceback.print_exc()
        print(
            f"process {jax.process_index()} of {jax.process_count()} failed: "
            f"{type(e).__name__}: {e}; stopping the job",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)
    if result.preempted:
        print(f"preempted at step {result.step}: checkpoint saved; the same command resumes")
        return
    print(f"done: step {result.step} in {result.seconds:.1f}s; final metrics {result.metrics}")


def _override_error(argv: list[str], error: Exception) -> str | None:
    """`config.KEY: ...` for a bad `--config.KEY=VALUE` override, else None."""
    text = str(error)
    overrides = [a[2:].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    m = re.search(r"flag --(config\.[\w.]+)=\S*: (.*)", text)
    if m:  # a value of the wrong type ("could not convert string to float: 'x'")
        return f"{m.group(1)}: {m.group(2)}"
    m = re.search(r"Did you mean \\?\"(\w+)\\?\" instead of \\?\"(\w+)\\?\"", text)
    if m is None:
        m = re.search(r"'(\w+)'", text) if isinstance(error, AttributeError | KeyError) else None
    missing = m.group(m.lastindex) if m else None
    for path in overrides:
        parts = path.split(".")
        if missing in parts:  # the first unknown part of the dotted key
            hint = f"did you mean {m.group(1)!r}?" if m.lastindex == 2 else "typo?"
            key = ".".join(parts[: parts.index(missing) + 1])
            return f"{key}: unknown key (not in the config; {hint})"
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, where a bad `--config.KEY=VALUE` override is an invalid config."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        line = _override_error(argv, e)
        if line is not None:
            print(f"invalid config (1 error):\n{line}", file=sys.stderr, flush=True)
            sys.exit(_EXIT_INVALID_CONFIG)
        if not isinstance(e, flags.Error):
            raise
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
