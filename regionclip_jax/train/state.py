"""The train state: a pure pytree (dict of arrays) that jit, Orbax and shardings all take.

  state = {
    "params":    nnx.State of arrays   trainable variables (nnx.Param), raw values
    "rest":      nnx.State of arrays   other variables (frozen-BN statistics, ...), never updated
    "opt_state": optax state           shaped by `optim.make_optimizer`
    "step":      int32[]               number of updates applied
    "rng":       uint32[2]             base key; step t uses fold_in(rng, t) (resume-exact)
  }

The model is rebuilt inside the step with `nnx.merge(graphdef, params, rest)`; splitting the
model once (not per step) keeps Python overhead out of the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from regionclip_jax import parallel
from regionclip_jax.models import split


def host_model(graphdef: nnx.GraphDef, state: Any) -> nnx.Module:
    """The model of a (possibly sharded, multi-process) train state with whole NumPy arrays on
    this host. Collective: in a multi-process job every process must call it."""
    host = parallel.gather_to_host({"params": state["params"], "rest": state["rest"]})
    return split.merge(graphdef, host["params"], host["rest"])


def abstract_train_state(
    build_model: Callable[[], nnx.Module],
    tx: Callable[[Any], optax.GradientTransformation],
    mesh: Mesh,
    rules: Any,
) -> tuple[nnx.GraphDef, Any, Any, optax.GradientTransformation]:
    """Shapes and shardings of the train state, without allocating it.

    Args:
      build_model: builds the model (called under `nnx.eval_shape` only).
      tx: params (pure, abstract) -> optax transformation.
      mesh, rules: the mesh and logical-axis rules for parameter shardings.

    Returns:
      (graphdef, abstract state (ShapeDtypeStructs), shardings (same tree), optimizer).
    """
    abstract_model = nnx.eval_shape(build_model)
    graphdef, params_v, rest_v = nnx.split(abstract_model, nnx.Param, ...)
    params_sh = parallel.state_shardings(params_v, mesh, rules)
    rest_sh = parallel.state_shardings(rest_v, mesh, rules)
    params, rest = split.pure(params_v), split.pure(rest_v)
    optimizer = tx(params)
    opt_abs = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optimizer_state_shardings(opt_abs, params, params_sh, replicated)
    abstract = {
        "params": params,
        "rest": rest,
        "opt_state": opt_abs,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    shardings = {
        "params": params_sh,
        "rest": rest_sh,
        "opt_state": opt_sh,
        "step": replicated,
        "rng": replicated,
    }
    return graphdef, abstract, shardings, optimizer


def optimizer_state_shardings(opt_abs: Any, params: Any, params_sh: Any, default: Any) -> Any:
    """Shardings of the optimizer state: a leaf whose key path ends with a parameter's path and
    has its shape (a moment, a trace) lives where the parameter lives; the rest (counters,
    masked-out entries) gets `default`.

    Path matching rather than `optax.tree_map_params`, which cannot follow the masked inner
    states of `optax.multi_transform` (frozen parameters).
    """
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params_sh)
    ):
        by_path[split.path_str(path)] = (tuple(leaf.shape), sh)

    def pick(path, leaf):
        s = split.path_str(path)
        parts = s.split("/")
        for i in range(len(parts)):  # longest suffix first
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_abs)


def init_train_state(
    build_model: Callable[[nnx.Rngs], nnx.Module],
    optimizer: optax.GradientTransformation,
    seed: int,
    shardings: Any,
) -> Any:
    """The initial train state, born sharded (jit with out_shardings: no full host copy).

    `build_model(rngs)` is traced with `nnx.Rngs(params=fold_in(key(seed), 0))`; the state's base
    rng is `fold_in(key(seed), 1)`.
    """

    def init():
        key = jax.random.PRNGKey(seed)
        model = build_model(nnx.Rngs(jax.random.fold_in(key, 0)))
        _, params, rest = split.split_model(model)
        return {
            "params": params,
            "rest": rest,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(key, 1),
        }

    return jax.jit(init, out_shardings=shardings)()


def like(target: Any, source: Any, where: str) -> Any:
    """`source` (host arrays) with `target`'s tree structure, checking every shape."""
    t_leaves, t_def = jax.tree.flatten(target)
    s_leaves, s_def = jax.tree.flatten(source)
    if t_def != s_def:
        raise ValueError(f"checkpoint {where} does not have the model's parameter tree")
    for a, b in zip(t_leaves, s_leaves):
        if a.shape != b.shape:
            raise ValueError(f"checkpoint {where}: shape {b.shape} where the model has {a.shape}")
    # Copies: the step donates its state, and one buffer may not be donated twice.
    return jax.tree.unflatten(
        t_def, [jnp.array(b, dtype=a.dtype, copy=True) for a, b in zip(t_leaves, s_leaves)]
    )
