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

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


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

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restores checkpoint `step` onto the shardings in `abstract_state`; moves `data_iter`
        (in place) to the saved position. Returns the state."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

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
