"""Training entry point (flags only; the trainers are libraries under regionclip_jax.train).

  python -m regionclip_jax.main --config=configs/<experiment>.py[:arg] --workdir=DIR \
      [--config.key=value ...]

The config's `mode` picks the trainer (`clip`: image-level CLIP; `pretrain`: RegionCLIP
region-text pretraining). Running the same command again
resumes from the last checkpoint in DIR. Exit status: 0 done or stopped by SIGTERM after
writing a checkpoint (preemption), 1 failed (bad config, NaN/Inf).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`get_config(arg)`), e.g. configs/x.py:runlocal."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


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
            "regionclip_jax.main: the config has no `mode` (one of: clip, pretrain; the "
            "detection trainers arrive in a later issue): the config above was resolved and "
            "nothing was run.",
            file=sys.stderr,
        )
        sys.exit(1)

    import jax

    from regionclip_jax.train import config_validation, loop

    # Multi-host launchers set the coordinator through the environment; single-host is a no-op.
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        logging.info("single-process run (jax.distributed.initialize: %s)", e)

    try:
        if mode == "clip":
            from regionclip_jax.train import clip_trainer

            result = clip_trainer.run(config, _WORKDIR.value)
        elif mode == "pretrain":
            from regionclip_jax.train import pretrain_trainer

            result = pretrain_trainer.run(config, _WORKDIR.value)
        else:
            raise config_validation.ConfigError(
                f"config.mode: unknown mode {mode!r}; valid: {config_validation.MODES}"
            )
    except config_validation.ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(1)
    except loop.NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    if result.preempted:
        print(f"preempted at step {result.step}: checkpoint saved; the same command resumes")
        return
    print(f"done: step {result.step} in {result.seconds:.1f}s; final metrics {result.metrics}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
