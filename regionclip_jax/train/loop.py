"""The train loop shared by every mode (CLIP, RegionCLIP pretraining, detection, RPN).

A trainer is a `Task`: it builds the model, the per-process grain dataset and the loss. The
loop does the rest, in this order (big_vision's documented resume order: workdir -> init):
  1. validate the config (before any compile; `config_lib.validate`), unless the caller did
     (`train.run.run_task`, the lifecycle of every mode around this loop);
  2. mesh + logical-axis rules from the config;
  3. abstract state via `nnx.eval_shape`, shardings from the parameters' logical axes;
  4. the latest complete checkpoint in `workdir/checkpoints` is restored onto those shardings
     (params, optimizer, step, rng and the grain iterator position; a damaged one is skipped
     with a warning for the previous one, another model's is refused before it is read), else
     the state is initialised by a jit with `out_shardings` (born sharded);
  5. the step `jax.jit(step, in_shardings, out_shardings, donate_argnums=0)` is compiled ahead of
     time (`.lower(...).compile()`) and its `memory_analysis()` printed once;
  6. loop: host batch -> `jax.make_array_from_process_local_data` -> step; metrics of step t are
     read while step t+1 runs; a non-finite loss or gradient stops the run (`NonFiniteError`)
     naming the step, the loss and the gradient norm of every top-level module; metrics go to
     TensorBoard/JSONL every `log_every` steps; checkpoints every `checkpoint_every` steps and at
     the end.
Determinism: step t draws its randomness from `fold_in(state.rng, t)` and the data iterator is
checkpointed, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding

from regionclip_jax import config as config_lib
from regionclip_jax import parallel
from regionclip_jax.models import split as split_lib
from regionclip_jax.train import optim, throughput
from regionclip_jax.train import state as state_lib
from regionclip_jax.train.checkpointing import Checkpointer, abstract_with_shardings
from regionclip_jax.train.metrics import MetricWriter, Progress

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/Inf; `.step` and `.metrics` say where and which."""

    def __init__(self, step: int, metrics: Mapping[str, float]):
        self.step = step
        self.metrics = dict(metrics)
        bad = {k: v for k, v in self.metrics.items() if not math.isfinite(v)}
        super().__init__(
            f"non-finite values at step {step}: {bad}; all step metrics (loss, per-module "
            f"gradient norms): {self.metrics}"
        )


class Task(Protocol):
    """What a trainer provides to `train`."""

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model (called under eval_shape and jit; must be deterministic given rngs)."""

    def dataset(self, shard_index: int, shard_count: int) -> grain.IterDataset:
        """This process's training batches (batch = global batch / shard_count)."""

    def batch_spec(self, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{key: (global shape, dtype)} of the batch arrays the loss reads (others dropped)."""

    def loss(
        self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, scalar metrics) of one batch."""

    # Optional: `initialize(graphdef, state) -> state` replaces values of a freshly initialised
    # state (pretrained weights, constant buffers); it gets the whole state as host arrays (every
    # process the same) and is never called when a checkpoint is restored.


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: final step, last logged metrics, per-step losses of this run."""

    step: int
    metrics: dict[str, float]
    losses: dict[int, float]
    seconds: float
    preempted: bool = False
    graphdef: Any = None
    state: Any = None


def _top_module_grad_norms(grads: Any) -> dict[str, jax.Array]:
    """L2 norm of the gradient of every top-level module / variable (`visual`, `transformer`...)."""
    groups: dict[str, list[jax.Array]] = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        top = split_lib.path_str(path[:1]) or "root"
        groups.setdefault(top, []).append(jnp.sum(jnp.square(g.astype(jnp.float32))))
    return {f"grad_norm/{k}": jnp.sqrt(sum(v)) for k, v in sorted(groups.items())}


def make_train_step(
    task: Task, graphdef: Any, optimizer: optax.GradientTransformation, config: Any
) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]:
    """The pure step `(state, batch) -> (state, metrics)` (metrics: float32 scalars)."""
    schedule = optim.lr_schedule(config.optim)
    nan_at = int(config.debug.nan_at_step)

    def step_fn(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)

        def loss_fn(params):
            model = split_lib.merge(graphdef, params, state["rest"])
            loss, metrics = task.loss(model, batch, rng, step)
            if nan_at > 0:  # debug: poison loss and gradients of update `nan_at` (NaN-guard test)
                loss = loss * jnp.where(step + 1 == nan_at, jnp.nan, 1.0)
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        norms = _top_module_grad_norms(grads)
        metrics.update(norms)
        metrics["loss"] = loss.astype(jnp.float32)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.square(n) for n in norms.values()))
        metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
        new_state = dict(state, params=params, opt_state=opt_state, step=step + 1)
        return new_state, metrics

    return step_fn


def _print_memory(compiled: Any) -> None:
    try:
        mem = compiled.memory_analysis()
    except Exception as e:  # not every backend reports it
        print(f"memory analysis unavailable: {e}", flush=True)
        return
    if mem is None:
        print("memory analysis unavailable on this backend", flush=True)
        return
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
        "alias_size_in_bytes",
    )
    parts = [
        f"{f.removesuffix('_size_in_bytes')} {getattr(mem, f, 0) / 2**20:.1f} MiB" for f in fields
    ]
    print("train step memory (per device): " + ", ".join(parts), flush=True)


class PreemptionGuard:
    """SIGTERM (TPU/cloud preemption, `kill`, SLURM's --signal) asks the loop to stop cleanly.

    The handler only sets a flag; the loop then finishes the step in flight, writes a checkpoint and
    returns with `preempted=True` (main.py exits 0, and the same command resumes). With several
    processes the flag is OR-reduced across them at logging steps so that all stop at the same
    step (set `log_every` so that it comes well within the preemption grace period).
    Installed only in the main thread (Python's rule for signal handlers).
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        if not self.requested:
            print(
                "SIGTERM received: checkpointing after the current step, then exiting", flush=True
            )
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, sync_point: bool) -> bool:
        """Whether to stop after this step. Multi-process: only at `sync_point` steps (the loop's
        logging steps, where the host waits for metrics anyway), because the all-gather that makes
        the processes agree would otherwise stall asynchronous dispatch every step."""
        if jax.process_count() == 1:
            return self.requested
        if not sync_point:
            return False
        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.any(flags))


def avoid_cpu_multidevice_cache_hang() -> bool:
    """Turns JAX's persistent compilation cache off for multi-device CPU runs; True if it did.

    Measured with jax 0.10.2: a multi-device CPU executable with collectives that is *loaded* from
    the persistent cache hangs in its first all-gather (every run after the one that filled the
    cache; XLA logs "waiting for `all gather RendezvousKey...` ... may be stuck"). Compiling
    afresh works, so the cache is skipped where the bug bites (fake CPU devices, CPU multi-process).
    """
    if jax.default_backend() != "cpu" or jax.local_device_count() == 1:
        return False
    if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    log.warning(
        "persistent compilation cache disabled: cached multi-device CPU executables hang in "
        "their collectives (jax %s)",
        jax.__version__,
    )
    return True


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a checkpoint `train` would resume from."""
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _close_quietly(ckpt: Checkpointer, data_iter: Any) -> None:
    """Closes the checkpoint manager and the data iterator on an error path (their own errors
    are logged, not raised over the one being handled)."""
    for close in (ckpt.close, getattr(data_iter, "close", None)):
        if close is None:
            continue
        try:
            close()
        except Exception as e:
            log.warning("while stopping after an error: %s: %s", type(e).__name__, e)


def _host_batch(batch: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(batch[k]) for k in spec}


@dataclasses.dataclass
class StepProgram:
    """Everything needed to compile the train step, without any array allocated.

    `abstract_state` / `abstract_batch` are ShapeDtypeStructs carrying their shardings, so
    `jitted.lower(abstract_state, abstract_batch).compile()` compiles the real step for `mesh`
    (any devices: local ones, or a TPU topology description for ahead-of-time compilation).
    """

    graphdef: Any
    abstract_state: Any
    shardings: Any
    optimizer: optax.GradientTransformation
    batch_spec: dict[str, tuple[tuple[int, ...], Any]]
    batch_shardings: dict[str, NamedSharding]
    abstract_batch: dict[str, jax.ShapeDtypeStruct]
    jitted: Any


def build_step(
    config: ml_collections.ConfigDict, task: Task, mesh: jax.sharding.Mesh, rules: Any
) -> StepProgram:
    """Abstract train state, batch and the jitted step of `task` on `mesh` (no compile)."""
    # Outside `set_mesh`: nnx.eval_shape under a mesh would read logical names as mesh axes.
    graphdef, abstract, shardings, optimizer = state_lib.abstract_train_state(
        lambda: task.build_model(nnx.Rngs(0)),
        lambda params: optim.make_optimizer(config.optim, params),
        mesh,
        rules,
    )
    spec = task.batch_spec(int(config.data.batch_size))
    batch_sh = {
        k: NamedSharding(
            mesh,
            parallel.logical_to_spec(
                ("act_batch",) + (None,) * (len(shape) - 1), shape, mesh, rules
            ),
        )
        for k, (shape, _) in spec.items()
    }
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=batch_sh[k])
        for k, (shape, dtype) in spec.items()
    }
    jitted = jax.jit(
        make_train_step(task, graphdef, optimizer, config),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    return StepProgram(
        graphdef=graphdef,
        abstract_state=abstract_with_shardings(abstract, shardings),
        shardings=shardings,
        optimizer=optimizer,
        batch_spec=spec,
        batch_shardings=batch_sh,
        abstract_batch=abstract_batch,
        jitted=jitted,
    )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    *,
    stop_after: int | None = None,
    keep_state: bool = False,
    validated: bool = False,
) -> TrainResult:
    """Trains `task` under `config` in `workdir`, resuming from its last checkpoint.

    Args:
      config: the training config (config_lib.base_config schema).
      workdir: checkpoints, TensorBoard events and metrics.jsonl go here.
      task: the trainer (model, data, loss).
      stop_after: stop (with a checkpoint) after this global step even if total_steps is later
        (tests; schedules still follow total_steps).
      keep_state: return the final state and graphdef in the result (evaluation).
      validated: the caller has validated `config` already (`train.run.run_task` does, once,
        before its side effects); else it is validated here.

    Returns:
      TrainResult.

    Raises:
      config_lib.ConfigError: before anything is compiled.
      NonFiniteError: the loss or a gradient became NaN/Inf (nothing is saved for that step).
      checkpointing.CheckpointMismatchError: the workdir's checkpoint was written by another
        model/optimizer config (checked from its metadata, before any array is read).
      checkpointing.NoRestorableCheckpointError: no checkpoint of the workdir can be restored
        (a damaged latest one is skipped with a warning while an older one restores).
    """
    t_start = time.perf_counter()
    if not validated:
        config_lib.validate(config, jax.device_count(), jax.process_count())
    avoid_cpu_multidevice_cache_hang()
    is_main = jax.process_index() == 0
    mesh = parallel.mesh_from_config(config)
    rules = parallel.rules_from_config(config)
    total = int(config.total_steps)
    last = total if stop_after is None else min(total, int(stop_after))
    global_batch = int(config.data.batch_size)

    program = build_step(config, task, mesh, rules)
    graphdef, shardings, batch_sh, spec = (
        program.graphdef,
        program.shardings,
        program.batch_shardings,
        program.batch_spec,
    )
    with jax.set_mesh(mesh), parallel.axis_rules(rules):
        ckpt = Checkpointer(
            workdir,
            max_to_keep=int(config.keep_checkpoints),
            async_save=bool(config.async_checkpointing),
        )
        # This process's block of every global batch, where the mesh placed its devices.
        first_key = next(iter(spec))
        block, blocks = parallel.process_batch_block(batch_sh[first_key], spec[first_key][0])
        data_iter = iter(task.dataset(block, blocks))
        try:
            # Falls back past damaged checkpoints; refuses another model's before reading it.
            restored = ckpt.restore_latest(
                program.abstract_state, data_iter, examples_per_step=global_batch // blocks
            )
        except BaseException:
            _close_quietly(ckpt, data_iter)  # no Orbax thread left to print on the way out
            raise
        if restored is not None:
            resumed_step, state = restored
            print(f"resuming from {ckpt.directory}/{resumed_step}", flush=True)
        else:
            state = state_lib.init_train_state(
                task.build_model, program.optimizer, int(config.seed), shardings
            )
            initialize = getattr(task, "initialize", None)
            if initialize is not None:  # pretrained weights, constants (fresh start only)
                # On the host, whole, on one local device: the task may run parts of the model
                # (concept embeddings), which must not touch devices of other processes.
                whole = parallel.gather_to_host(state)
                del state
                one_device = parallel.make_mesh({"data": 1}, jax.local_devices()[:1])
                with jax.set_mesh(one_device):
                    host = initialize(graphdef, whole)
                state = parallel.host_to_global(host, shardings)
        start = int(jax.device_get(state["step"]))

        t0 = time.perf_counter()
        compiled = program.jitted.lower(program.abstract_state, program.abstract_batch).compile()
        flops = throughput.compiled_flops(compiled)
        peak = throughput.peak_flops()
        if is_main:
            print(f"train step compiled in {time.perf_counter() - t0:.1f}s", flush=True)
            if config.debug.print_memory:
                _print_memory(compiled)
            if flops:
                print(
                    f"train step: {flops / 1e9:.2f} GFLOP per device (XLA cost analysis)"
                    + (f", peak {peak / 1e12:.0f} TFLOP/s per device" if peak else ""),
                    flush=True,
                )

        # Rows and TensorBoard events of steps after `start` (written by an interrupted run that
        # this one redoes) are dropped, so every step is logged once.
        writer = MetricWriter(workdir, enabled=is_main, start_step=start)
        progress = Progress(total, global_batch, start)
        losses: dict[int, float] = {}
        logged: dict[str, float] = {}
        pending: tuple[int, Any] | None = None
        ckpt_every = int(config.checkpoint_every)
        step_sleep = float(config.debug.step_sleep)

        def check(step_done: int, metrics_dev: Any) -> dict[str, float]:
            m = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
            losses[step_done] = m["loss"]
            if not all(math.isfinite(v) for k, v in m.items() if k == "loss" or "grad" in k):
                writer.write(step_done, m)
                writer.close()
                log.error("non-finite loss/gradients at step %d: %s", step_done, m)
                raise NonFiniteError(step_done, m)
            if step_done % int(config.log_every) == 0 or step_done == last:
                rate = progress.rate(step_done)
                if rate > 0:
                    m["perf/step_seconds"] = 1.0 / rate
                    m["perf/examples_per_second"] = rate * global_batch
                    util = throughput.mfu(flops, 1.0 / rate, peak)
                    if util is not None:
                        m["perf/mfu"] = util
                writer.write(step_done, m)
                if is_main:
                    progress.print(step_done, m)
            return m

        preempted = False
        with PreemptionGuard() as guard:
            try:
                fail_at = int(config.debug.fail_at_step)
                for step in range(start, last):
                    if step + 1 == fail_at and jax.process_index() == int(
                        config.debug.fail_process
                    ):
                        raise RuntimeError(
                            f"debug.fail_at_step: simulated failure at step {step + 1}"
                        )
                    host = _host_batch(next(data_iter), spec)
                    batch = {
                        k: jax.make_array_from_process_local_data(batch_sh[k], v, spec[k][0])
                        for k, v in host.items()
                    }
                    state, metrics = compiled(state, batch)
                    if step_sleep:
                        time.sleep(step_sleep)
                    # Read the previous step's metrics while this one runs.
                    if pending is not None:
                        logged = check(*pending)
                    pending = (step + 1, metrics)
                    if step == start:
                        jax.block_until_ready(metrics)
                        progress.start(step + 1)
                    done = step + 1
                    stop = done < last and guard.should_stop(done % int(config.log_every) == 0)
                    if (ckpt_every and done % ckpt_every == 0) or done == last or stop:
                        logged = check(*pending)  # never save a state whose step went non-finite
                        pending = None
                        ckpt.save(done, state, data_iter)
                    if stop:
                        preempted = True
                        last = done
                        if is_main:
                            print(f"stopped at step {done} (SIGTERM); checkpoint saved", flush=True)
                        break
                if pending is not None:
                    logged = check(*pending)
            finally:
                ckpt.close()
                writer.close()
                close = getattr(data_iter, "close", None)
                if close is not None:
                    close()

    return TrainResult(
        step=max(last, start),
        metrics=logged,
        preempted=preempted,
        losses=losses,
        seconds=time.perf_counter() - t_start,
        graphdef=graphdef if keep_state else None,
        state=state if keep_state else None,
    )
