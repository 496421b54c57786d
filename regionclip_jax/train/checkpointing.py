"""Orbax checkpoints of the whole training state plus the grain iterator position.

Layout: `WORKDIR/checkpoints/<step>/{state, data}`; `state` holds the pure train-state dict
(`params`, `rest` (non-trainable variables), `opt_state`, `step`, `rng`), `data` the grain
iterator state (JSON). Writes are asynchronous (the next steps run while the files are written)
and atomic: a run killed mid-write leaves an unfinished temporary directory that the next run
ignores, so resuming always starts from the last complete checkpoint.

Restoring takes an abstract state (ShapeDtypeStructs carrying the target shardings), so a
checkpoint written on one mesh restores onto another.

Resuming (`restore_latest`) never crash-loops on one bad checkpoint and never asks Orbax to read
a checkpoint of another model:
  - the shapes saved in a checkpoint's metadata are compared with this config's state first; a
    difference raises `CheckpointMismatchError` naming the first differing parameter;
  - a checkpoint that cannot be read (truncated or garbled file) is reported in one warning line
    and the previous one is tried; the unreadable ones are moved to `WORKDIR/checkpoints.broken/`
    once an older one restored (the run re-creates those steps); if none restores,
    `NoRestorableCheckpointError` names the workdir and what to do.
Keep at least two checkpoints (`config.keep_checkpoints`) so that there is one to fall back to.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# Where `restore_latest` moves checkpoints it could not restore (next to `checkpoints/`).
BROKEN_DIR = "checkpoints.broken"


class CheckpointError(RuntimeError):
    """A workdir's checkpoints cannot be resumed from; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The workdir's checkpoint was written by another model (or optimizer) config."""


class NoRestorableCheckpointError(CheckpointError):
    """No checkpoint of the workdir can be restored (all are damaged)."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """{"params/visual/conv1/kernel": shape} of every leaf (namedtuple fields, dict keys and
    sequence indices named alike, so a saved tree's metadata and an abstract state compare)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        out["/".join(_key_name(k) for k in path)] = None if shape is None else tuple(shape)
    return out


_PARTS = {"params": "parameter", "rest": "variable", "opt_state": "optimizer state"}


def _error_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line` of the innermost cause of `e` (TensorStore's own message, not the
    wrapper's multi-line spec dump), at most `limit` characters."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (all processes call this at the same point)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.array([int(ok)], np.int32))
    return bool(np.all(flags))


_ORBAX_FILES = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"


def _is_aborted_read_noise(unraisable: Any) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True  # a TensorStore read finishing after Orbax closed its event loop
    code = getattr(unraisable.object, "cr_code", None)  # an abandoned Orbax read coroutine
    return code is not None and _ORBAX_FILES in code.co_filename


class _AbortedReadTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" of Orbax's abandoned read tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if _ORBAX_FILES in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _quiet_aborted_reads() -> Any:
    """Drops the tracebacks a failed Orbax restore leaves behind; returns a function that undoes
    it (a no-op where it was already on).

    When one array of a restore fails, Orbax closes its event loop while the other TensorStore
    reads are in flight: each then reports `RuntimeError: Event loop is closed` from TensorStore's
    threads, and its read task/coroutine is collected with the error (asyncio's "Task exception
    was never retrieved"): dozens of tracebacks on stderr, some long after the restore (through
    `sys.unraisablehook` and the `asyncio` logger). Only those are dropped; the failure itself is
    reported by `restore_latest`. On before a restore starts (the first reports can come before
    the exception reaches us), and left on after a failure.
    """
    previous = sys.unraisablehook
    if getattr(previous, "regionclip_quiet", False):
        return lambda: None

    def hook(unraisable):
        if not _is_aborted_read_noise(unraisable):
            previous(unraisable)

    hook.regionclip_quiet = True
    sys.unraisablehook = hook
    tasks = _AbortedReadTasks()
    logging.getLogger("asyncio").addFilter(tasks)

    def undo():
        logging.getLogger("asyncio").removeFilter(tasks)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous

    return undo


class Checkpointer:
    """Saves and restores `(train state, data iterator)` under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the last complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of all complete checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None) -> None:
        """Starts writing `state` (and `data_iter`'s position) as checkpoint `step`."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...] | None]:
        """{leaf path: global shape} of checkpoint `step`'s state, from its metadata only (no
        array is read)."""
        handler = ocp.StandardCheckpointHandler()
        try:
            tree = handler.metadata(epath.Path(self.directory) / str(step) / "state")
        finally:
            handler.close()
        return _leaf_shapes(getattr(tree, "tree", tree))

    def check_compatible(self, step: int, abstract_state: Any, saved: dict | None = None) -> None:
        """Raises CheckpointMismatchError when checkpoint `step` holds other leaves or shapes than
        `abstract_state` (another model or optimizer config), naming the first difference (a
        parameter's before other variables' and the optimizer's)."""
        saved = self.saved_shapes(step) if saved is None else saved
        wanted = _leaf_shapes(abstract_state)
        diffs = []
        for path in sorted(set(saved) | set(wanted)):
            have, want = saved.get(path, "missing"), wanted.get(path, "missing")
            if have != want and not (have is None or want is None):
                diffs.append((path, have, want))
        if not diffs:
            return
        order = list(_PARTS)
        diffs.sort(key=lambda d: order.index(p) if (p := d[0].split("/")[0]) in order else 9)
        path, have, want = diffs[0]
        part, _, name = path.partition("/")
        what = _PARTS.get(part, "entry")
        if part in ("params", "rest"):  # named as models.split.path_str names parameters
            path = name

        def show(shape):
            return "absent" if shape == "missing" else f"shape {shape}"

        more = f" ({len(diffs) - 1} more differ)" if len(diffs) > 1 else ""
        raise CheckpointMismatchError(
            f"workdir {self.workdir} was written by another model or optimizer config: "
            f"{what} {path!r} has {show(have)} in checkpoint {step}, {show(want)} in this "
            f"config{more}.\nUse a new workdir for this config, or resume with the config that "
            "wrote this one."
        )

    def restore(
        self,
        step: int,
        abstract_state: Any,
        data_iter: Any | None = None,
        *,
        local_examples: int | None = None,
    ) -> Any:
        """Restores checkpoint `step` onto the shardings in `abstract_state`; moves `data_iter`
        (in place) to the saved position. Returns the state.

        The data position is saved per process. A checkpoint written by a different number of
        processes has no file for this process: then the iterator is moved to `local_examples`
        (the examples this process would have read by `step`: exact for the pipelines'
        process-count-invariant sharding unless records were skipped).

        Raises:
          ValueError: the process count changed and the iterator's position cannot be set
            (a pipeline with worker processes), or `local_examples` was not given.
        """
        args, moved = self._restore_args(step, abstract_state, data_iter, local_examples)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if moved:
            log.warning(
                "checkpoint %d was written by another number of processes: data resumes at "
                "example %d of this process",
                step,
                local_examples,
            )
        return restored["state"]

    def _restore_args(
        self, step: int, abstract_state: Any, data_iter: Any, local_examples: int | None
    ) -> tuple[dict[str, Any], bool]:
        """Orbax restore args of checkpoint `step`, and whether the data position was moved
        here instead (another process count). Raises `restore`'s ValueError."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is None:
            return args, False
        if os.path.exists(self._data_file(step)):
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            return args, False
        self._move_data(step, data_iter, local_examples)
        return args, True

    def restore_latest(
        self,
        abstract_state: Any,
        data_iter: Any | None = None,
        *,
        examples_per_step: int | None = None,
    ) -> tuple[int, Any] | None:
        """Restores the newest checkpoint that can be restored: `(step, state)`, or None when
        there is no checkpoint. `examples_per_step`: this process's examples per step (for
        `restore`'s `local_examples` when the process count changed).

        Each checkpoint's saved shapes are checked against `abstract_state` before anything is
        read. One that cannot be read is reported (one warning line naming the step and the
        error) and the previous one is tried; once one restored, the unreadable newer ones are
        moved to `WORKDIR/checkpoints.broken/` (this run writes those steps again).

        Raises:
          CheckpointMismatchError: the checkpoint was written by another model/optimizer config.
          NoRestorableCheckpointError: checkpoints exist and none can be restored.
          ValueError: see `restore`.
        """
        steps = self.all_steps()
        failed: list[tuple[int, str]] = []
        unquiet = _quiet_aborted_reads() if steps else (lambda: None)
        for step in reversed(steps):
            # Only the message is kept: the exception would keep Orbax's aborted reads alive.
            problem = None
            try:
                saved = self.saved_shapes(step)
            except Exception as e:  # unreadable metadata: a damaged checkpoint
                problem = _error_line(e)
            if not _all_processes_ok(problem is None):
                self._failed(step, problem, failed)
                continue
            self.check_compatible(step, abstract_state, saved)
            local = None if examples_per_step is None else step * int(examples_per_step)
            # A data position that cannot be moved is a config problem: raised, not skipped.
            self._restore_args(step, abstract_state, data_iter, local)
            state = None
            try:
                state = self.restore(step, abstract_state, data_iter, local_examples=local)
            except Exception as e:  # a damaged checkpoint (truncated file, garbled bytes...)
                problem = _error_line(e)
            if not _all_processes_ok(problem is None):
                del state
                self._failed(step, problem, failed)
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
            else:
                unquiet()  # nothing failed: nothing left to quieten
            return step, state
        if not steps:
            return None
        listing = "\n".join(f"  checkpoint {s}: {msg}" for s, msg in failed)
        paths = " ".join(os.path.join(self.directory, str(s)) for s, _ in failed)
        raise NoRestorableCheckpointError(
            f"workdir {self.workdir}: none of its {len(steps)} checkpoints can be restored:\n"
            f"{listing}\nDelete them (rm -r {paths}) to train this workdir from the start, or "
            "use a new workdir."
        )

    def _failed(self, step: int, problem: str | None, failed: list) -> None:
        gc.collect()  # the abandoned read coroutines, now rather than mid-training
        msg = problem or "failed on another process"
        failed.append((step, msg))
        log.warning(
            "checkpoint %d in %s cannot be restored (%s); trying the previous one",
            step,
            self.directory,
            msg,
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the step directories `steps` to WORKDIR/checkpoints.broken/ (process 0; shared
        storage) so that this run can write those steps again."""
        if jax.process_index() == 0:
            broken = os.path.join(self.workdir, BROKEN_DIR)
            os.makedirs(broken, exist_ok=True)
            for step in steps:
                dest, n = os.path.join(broken, str(step)), 1
                while os.path.exists(dest):
                    dest, n = os.path.join(broken, f"{step}.{n}"), n + 1
                os.rename(os.path.join(self.directory, str(step)), dest)
                log.warning("moved unrestorable checkpoint %d to %s", step, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("regionclip_jax checkpoints set aside")
        self.manager.reload()

    def _data_file(self, step: int) -> str:
        # grain's Orbax handler writes one JSON per process under this name.
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.join(self.directory, str(step), "data", name)

    def _move_data(self, step: int, data_iter: Any, local_examples: int | None) -> None:
        data_dir = os.path.join(self.directory, str(step), "data")
        written = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
        current = data_iter.get_state()
        if local_examples is None or set(current) != {"next_index"}:
            raise ValueError(
                f"checkpoint {step} holds the data position of other processes ({written}); this "
                f"is process {jax.process_index()} of {jax.process_count()}, and the position of "
                "this pipeline cannot be moved (it has worker processes: resume with the "
                "original number of processes, or set data.num_workers=0)"
            )
        data_iter.set_state({"next_index": int(local_examples)})

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
