"""Orbax checkpoints of the whole training state plus the grain iterator position.

Layout: `WORKDIR/checkpoints/<step>/{state, data}`; `state` holds the pure train-state dict
(`params`, `rest` (non-trainable variables), `opt_state`, `step`, `rng`), `data` the grain
iterator state (JSON). Writes are asynchronous (the next steps run while the files are written)
and atomic: a run killed mid-write leaves an unfinished temporary directory that the next run
ignores, so resuming always starts from the last complete checkpoint.

Restoring takes an abstract state (ShapeDtypeStructs carrying the target shardings), so a
checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores `(train state, data iterator)` under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the last complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None = None) -> None:
        """Starts writing `state` (and `data_iter`'s position) as checkpoint `step`."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

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
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        moved = False
        if data_iter is not None:
            if os.path.exists(self._data_file(step)):
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                self._move_data(step, data_iter, local_examples)
                moved = True
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if moved:
            log.warning(
                "checkpoint %d was written by another number of processes: data resumes at "
                "example %d of this process",
                step,
                local_examples,
            )
        return restored["state"]

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
