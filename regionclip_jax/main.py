"""Training / evaluation entry point (flags only; kept short on purpose).

  python -m regionclip_jax.main --config=configs/<experiment>.py[:arg] --workdir=DIR \
      [--config.key=value ...]

For now it resolves and prints the config; the trainers land in a later issue.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`get_config(arg)`), e.g. configs/x.py:runlocal."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    print(f"workdir: {_WORKDIR.value}")
    print(_CONFIG.value)
    print(
        "regionclip_jax.main: training and evaluation are not implemented yet (a later issue); "
        "the config above was resolved and nothing was run.",
        file=sys.stderr,
    )
    sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
