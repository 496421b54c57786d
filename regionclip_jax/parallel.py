"""Meshes, logical-axis rules and the one activation-sharding helper.

Every parameter of our modules carries *logical* axis names (metadata `out_sharding`, set through
`nnx.with_partitioning`), e.g. a text-MLP kernel is `('embed', 'mlp')`. A config maps logical names
to mesh axes (`data`, `fsdp`, `model`) with a list of rules; this module turns those into
`NamedSharding`s for parameters and constrains activations with `shard_act`.

Conventions:
  - Mesh axes are always `('data', 'fsdp', 'model')` (a size-1 axis costs nothing).
  - A rule maps one logical name to a mesh axis, a tuple of mesh axes, or None (replicated).
  - A mesh axis that does not divide an array dimension is dropped for that dimension (that
    dimension is replicated instead), so tiny test models and odd channel counts (the 3-channel
    stem) never fail to shard.

Logical names used by the models:
  parameters : `embed` (residual width), `mlp` (MLP hidden), `heads` (attention q/k/v width),
               `vocab`, `conv_in`, `conv_out`, `kernel` (conv window), `pos` (positions),
               `norm` (norm scale/bias), `proj` (output embedding dim)
  activations: `act_batch`, `act_len`, `act_embed`, `act_mlp`, `act_heads`, `act_height`,
               `act_width`, `act_channels`

Global side effect: importing this module sets flax's `flax_always_shard_variable` to False
(`use_logical_axis_names`, the package's only change to flax's global config).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def use_logical_axis_names() -> None:
    """Sets flax's global `flax_always_shard_variable` to False (idempotent).

    Our variables carry *logical* axis names (`nnx.with_partitioning`), not mesh axes: flax must
    not try to shard them when they are created; `logical_to_spec` / the train state place them.
    This changes a process-wide flax setting, so it is done in one place: at the import of this
    module (below), which every model module imports (`shard_act`) before creating a Variable.
    """
    flax.config.update("flax_always_shard_variable", False)


# The one place this package changes flax's global config (see `use_logical_axis_names`).
use_logical_axis_names()

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")

AxisRule = tuple[str, str | tuple[str, ...] | None]

# Data + FSDP by default: batch over (data, fsdp), large weight dims over fsdp, tensor-parallel
# dims over model. With model=1 and fsdp=1 this is plain data parallelism.
DEFAULT_RULES: tuple[AxisRule, ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    ("act_height", None),
    ("act_width", None),
    ("act_channels", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("conv_in", "fsdp"),
    ("conv_out", "model"),
    ("kernel", None),
    ("pos", None),
    ("norm", None),
    ("proj", None),
)

_CURRENT_RULES: contextvars.ContextVar[tuple[AxisRule, ...]] = contextvars.ContextVar(
    "regionclip_jax_axis_rules", default=DEFAULT_RULES
)


def make_mesh(
    shape: Mapping[str, int] | Sequence[int],
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a `('data', 'fsdp', 'model')` mesh with Auto (GSPMD-style) axis types.

    Args:
      shape: sizes per axis, as a mapping (`{'data': -1, 'model': 2}`; missing axes are 1) or a
        sequence of three ints. At most one size may be -1: it takes the remaining devices.
      devices: the devices to use (default: all of `jax.devices()`).

    Returns:
      A `jax.sharding.Mesh` over exactly `len(devices)` devices.

    Raises:
      ValueError: if the sizes do not multiply to the device count or name an unknown axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(
                f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}"
            )
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"cannot fill mesh {dict(zip(MESH_AXES, sizes))} from {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def mesh_from_config(config: Any) -> Mesh:
    """A mesh from `config.mesh` (a mapping of axis name to size; -1 = the rest)."""
    mesh_cfg = getattr(config, "mesh", None) or {"data": -1}
    return make_mesh(dict(mesh_cfg))


def rules_from_config(config: Any) -> tuple[AxisRule, ...]:
    """Logical-axis rules from `config.axis_rules` (list of pairs), falling back to the defaults."""
    rules = getattr(config, "axis_rules", None)
    if not rules:
        return DEFAULT_RULES
    return tuple((str(name), _as_axes(axes)) for name, axes in rules)


def _as_axes(axes: Any) -> str | tuple[str, ...] | None:
    if axes is None or isinstance(axes, str):
        return axes
    return tuple(axes)


@contextlib.contextmanager
def axis_rules(rules: Sequence[AxisRule]) -> Iterator[None]:
    """Sets the logical-axis rules that `shard_act` and `logical_to_spec` use in this context."""
    token = _CURRENT_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _CURRENT_RULES.reset(token)


def current_rules() -> tuple[AxisRule, ...]:
    return _CURRENT_RULES.get()


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    rules: Sequence[AxisRule] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` over the mesh axes.

    Args:
      logical_axes: one logical name (or None) per array dimension.
      shape: the array shape; with `mesh`, mesh axes that do not divide a dimension are dropped.
      mesh: the mesh whose axis sizes are checked (optional).
      rules: logical → mesh rules (default: the current rules).

    Returns:
      A PartitionSpec with one entry per dimension; each mesh axis is used at most once.
    """
    rule_map = dict(current_rules() if rules is None else rules)
    used: set[str] = set()
    entries: list[Any] = []
    for dim, name in enumerate(logical_axes):
        target = rule_map.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None:
                size = mesh.shape.get(ax, 1) if hasattr(mesh, "shape") else 1
                if ax not in mesh.axis_names or size == 1:
                    continue
                if shape is not None:
                    divisor = size * math.prod(mesh.shape[a] for a in kept)
                    if shape[dim] % divisor:
                        continue
            kept.append(ax)
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


def shard_act(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside a mesh.

    Args:
      x: any array, e.g. `[B, H, W, C]` image features.
      logical_axes: one logical name (or None) per dimension of `x`,
        e.g. `('act_batch', 'act_height', 'act_width', 'act_channels')`.
    """
    if len(logical_axes) != x.ndim:
        raise ValueError(f"got {len(logical_axes)} logical axes for an array of rank {x.ndim}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _variable_logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        axes = meta.get(key)
        if axes is not None:
            return tuple(axes)
    return None


def logical_axes_of(tree: Any) -> Any:
    """The logical axis names of every variable in an NNX module or state (None if missing)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return jax.tree.map(
        _variable_logical_axes, state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def state_shardings(tree: Any, mesh: Mesh, rules: Sequence[AxisRule] | None = None) -> Any:
    """`NamedSharding`s for every variable of an NNX module or state, from its annotations.

    Variables without logical axis names are replicated. Returns a pytree shaped like
    `nnx.state(tree)` whose leaves are shardings (suitable for `jax.jit(out_shardings=...)`,
    `jax.device_put` or Orbax restore targets).
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def one(variable: nnx.Variable) -> NamedSharding:
        axes = _variable_logical_axes(variable)
        shape = np.shape(variable.get_value())
        if axes is None or len(axes) != len(shape):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Sequence[AxisRule] | None = None) -> None:
    """Places every variable of `module` on `mesh` as its annotations say (in place)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))


# ---------------------------------------------------------------------------------------------
# Multi-process start-up


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would auto-detect (SLURM, Cloud TPU pod, Open MPI,
    Kubernetes), or None on a plain machine."""
    try:  # JAX's own detectors (private API; stable across jax 0.10-0.12)
        # Lazy and guarded: a private module that a newer JAX may move (fallback below).
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if getattr(env, "opt_in_only_method", False):
                continue
            if env.is_env_present():
                return env.__name__
        return None
    except (ImportError, AttributeError):  # newer JAX moved them: fall back to the variables
        for var, name in (
            ("SLURM_JOB_ID", "SlurmCluster"),
            ("OMPI_MCA_orte_hnp_uri", "OmpiCluster"),
            ("TPU_WORKER_HOSTNAMES", "TpuCluster"),
            ("MEGASCALE_COORDINATOR_ADDRESS", "TpuCluster"),
        ):
            if os.environ.get(var):
                return name
        return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    num_cpu_devices: int | None = None,
    heartbeat_timeout_s: int | None = None,
) -> str:
    """Starts JAX's multi-process runtime where there is one; call before any other JAX work.

    Three ways, in this order:
      1. explicit: `coordinator_address` ("host:port" of process 0), `num_processes` and
         `process_id` all given (any machine, CPU included: CPU processes talk over gloo);
      2. automatic: on a Cloud TPU pod, under SLURM (`srun`, one task per GPU or per node), Open
         MPI or Kubernetes JAX reads everything from the environment;
      3. otherwise a single process (nothing to start).
    A cluster that is detected but cannot be joined raises: silently falling back to one
    process per host would start N independent runs writing into the same workdir.

    Args:
      coordinator_address, num_processes, process_id: explicit set-up (all or none).
      local_device_ids: devices of this process (e.g. one GPU per process).
      num_cpu_devices: CPU devices per process (tests and local multi-process runs; the
        equivalent of XLA's --xla_force_host_platform_device_count).
      heartbeat_timeout_s: a process silent for this long is declared dead and the job stops
        with an error on every process (JAX's default is 100 s).

    Returns:
      "explicit", "auto (<cluster>)" or "single".
    """
    if num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
    explicit = (coordinator_address, num_processes, process_id)
    extra = {}
    if heartbeat_timeout_s:
        extra["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    if local_device_ids is not None:
        extra["local_device_ids"] = list(local_device_ids)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            names = ("coordinator_address", "num_processes", "process_id")
            missing = [n for n, x in zip(names, explicit) if x is None]
            raise ValueError(
                f"explicit multi-process set-up needs all of {names}; missing: {missing}"
            )
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address, int(num_processes), int(process_id), **extra
        )
        return "explicit"
    cluster = detected_cluster()
    if cluster is None:
        return "single"
    jax.distributed.initialize(**extra)
    return f"auto ({cluster})"


def gather_to_host(tree: Any) -> Any:
    """Every array of `tree` as a whole NumPy array on this host (an all-gather across processes
    where arrays span devices of other processes; plain `device_get` otherwise)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process job reaches the barrier `name` (no-op with
    one process). Used where process 0 writes files the others then read or wait for."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_to_global(tree: Any, shardings: Any) -> Any:
    """Places whole host arrays (the same on every process) onto `shardings`; each process
    copies only the pieces its devices hold."""

    def one(x, sharding):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def process_batch_block(sharding: NamedSharding, shape: Sequence[int]) -> tuple[int, int]:
    """(block index, block count) of the rows (dim 0) of a batch-sharded `shape` array that this
    process holds.

    Data loaders give process p the block p of every global batch only if the mesh puts process
    p's devices there; this reads the actual placement from the sharding instead.

    Raises:
      ValueError: if this process's rows are not one contiguous, equally sized block.
    """
    global_batch = int(shape[0])
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        sl = index[0]
        rows.update(range(*sl.indices(global_batch)))
    count = jax.process_count()
    first, size = min(rows), len(rows)
    if size * count != global_batch or rows != set(range(first, first + size)) or first % size:
        raise ValueError(
            f"this process holds batch rows {sorted(rows)[:8]}... of {global_batch}: not one of "
            f"{count} equal contiguous blocks (check the mesh's device order)"
        )
    return first // size, count


def whole_on_one_device(state: dict[str, Any]) -> dict[str, Any]:
    """params + rest of a (possibly sharded) train state, whole on the first local device, once
    (a jitted evaluation fed host arrays would copy them at every call)."""

    whole = gather_to_host({"params": state["params"], "rest": state["rest"]})
    return jax.device_put(whole, jax.local_devices()[0])
