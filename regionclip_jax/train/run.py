"""One lifecycle for every mode (`clip`, `pretrain`, `detect`, `rpn`): `run_task`.

Each trainer's public `run(config, workdir, **kwargs)` is `run_task` with its own `make_task`:
  1. copy the config (unlocked: the run fills in data paths and frozen-parameter patterns);
  2. validate it, once (`config.validate`), before any side effect; this also builds the model
     config (`CLIPConfig`), which is passed on, not read again from `model.init`'s model.json;
  3. `make_task(config, model_config, workdir)`: the mode's side effects (ShapesWorld generation,
     caption parsing, detection data conversion), then the `loop.Task`;
  4. resume from `workdir/checkpoints` if there is one, else load the task's initial weights
     (`task.load_init_weights()`, outside any mesh; the loop then calls `task.initialize`);
  5. train (`loop.train`);
  6. when training reached `total_steps` (not preempted, not stopped early): `task.export(result,
     workdir)` then `task.evaluate(result, workdir)`, whose metrics join `result.metrics`.
A task with `trains = False` (zero-shot detection, `detect.eval_only`) skips 4-6: it loads its
initial weights and is evaluated untrained (step 0).

Optional task hooks (on top of `loop.Task`): `load_init_weights()`, `export(result, workdir)`,
`evaluate(result, workdir) -> {name: value}` and the attribute `trains` (default True).
Every process calls every hook (they may be collective); process 0 writes files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from regionclip_jax import config as config_lib
from regionclip_jax import parallel
from regionclip_jax.models import split as split_lib
from regionclip_jax.train import loop as loop_lib

# (run config, model config, workdir) -> the mode's `loop.Task`, after the mode's side effects.
MakeTask = Callable[[ml_collections.ConfigDict, Any, str], loop_lib.Task]


def run_task(
    config: ml_collections.ConfigDict,
    workdir: str,
    make_task: MakeTask,
    *,
    keep_state: bool = False,
    stop_after: int | None = None,
) -> loop_lib.TrainResult:
    """Validates `config`, builds the task, resumes or initialises, trains, exports, evaluates.

    Args:
      config: the resolved run config (not modified: the run works on a copy).
      workdir: checkpoints, logs, `export/` and `eval/` go here.
      make_task: the mode's factory (module docstring, step 3).
      keep_state: return the final graphdef and state in the result.
      stop_after: `loop.train`'s (stop with a checkpoint after this step; no export/evaluation).

    Returns:
      `loop.TrainResult`; after a complete run its metrics include the task's evaluation.

    Raises:
      config.ConfigError: before any side effect.
    """
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    model_config = config_lib.validate(config, jax.device_count(), jax.process_count())
    task = make_task(config, model_config, workdir)
    if not getattr(task, "trains", True):
        return _evaluate_untrained(task, workdir)
    load_init_weights = getattr(task, "load_init_weights", None)
    if load_init_weights is not None and not loop_lib.has_checkpoint(workdir):
        load_init_weights()
    # The state is kept for export and evaluation, and dropped below unless asked for.
    result = loop_lib.train(
        config, workdir, task, stop_after=stop_after, keep_state=True, validated=True
    )
    if not result.preempted and result.step >= int(config.total_steps):
        export = getattr(task, "export", None)
        if export is not None:
            export(result, workdir)
        evaluate = getattr(task, "evaluate", None)
        if evaluate is not None:
            result.metrics = dict(result.metrics, **evaluate(result, workdir))
    if not keep_state:
        result.state = result.graphdef = None
    return result


def _evaluate_untrained(task: Any, workdir: str) -> loop_lib.TrainResult:
    """Zero-shot: the task's initial weights on the first local device, evaluated at step 0."""
    task.load_init_weights()
    with jax.set_mesh(parallel.make_mesh({"data": 1}, jax.local_devices()[:1])):
        graphdef, params, rest = split_lib.split_model(task.build_model(nnx.Rngs(0)))
        state = task.initialize(graphdef, {"params": params, "rest": rest})
    untrained = loop_lib.TrainResult(
        step=0, metrics={}, losses={}, seconds=0.0, graphdef=graphdef, state=state
    )
    # Nothing was trained: the result carries the metrics only.
    return loop_lib.TrainResult(
        step=0, metrics=task.evaluate(untrained, workdir), losses={}, seconds=0.0
    )
