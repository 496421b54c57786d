"""A model as (graphdef, params, rest): the pure-pytree form that jit, Orbax and shardings take.

`split_model` splits an NNX module once into its graph and two pytrees of raw arrays (trainable
`nnx.Param`s, everything else); `merge` rebuilds the module, e.g. inside a jitted function, so the
Python graph traversal happens at trace time only. `path_str` names a leaf of such a pytree
('/'-joined: `visual/layer1/0/conv1/kernel`), the names that freeze patterns and weight files use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def pure(state: nnx.State) -> nnx.State:
    """The same State with raw arrays instead of Variable objects as leaves."""
    return jax.tree.map(lambda v: v.get_value(), state, is_leaf=_is_var)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, pure params, pure rest) of `model` (concrete or abstract)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, pure(params), pure(rest)


def merge(graphdef: nnx.GraphDef, params: Any, rest: Any) -> nnx.Module:
    """The module of `split_model`'s parts (works on tracers inside jit)."""
    return nnx.merge(graphdef, params, rest)


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined names of a pytree key path (dict keys, attributes, indices; `value` dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k).strip(".[]'\""))
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


class SplitJit:
    """`fn(module, *args)` compiled once as a jitted function of (state, *args).

    The module is split once (`nnx.split`: graph + state of every variable); each call passes the
    state as a jit argument (not a baked-in constant, so the weights are not copied into the
    program) and merges it back inside the trace, so no Python graph traversal runs per call. jit's
    cache keys on the argument shapes: one program per input shape.

      encode = SplitJit(clip, lambda m, ids: m.encode_text(ids))
      emb = encode(ids)            # int32 [B, L] -> float [B, D]

    `SplitJit.from_parts(graphdef, (params, rest), fn)` does the same for a module already split,
    e.g. the (params, rest) of a train state (the evaluations of the trainers).

    Attributes:
      graphdef, parts: the split module (`parts`: the states `nnx.merge` takes after the graphdef).
    """

    def __init__(self, module: Any, fn: Callable[..., Any]):
        graphdef, state = nnx.split(module)
        self._build(graphdef, (state,), fn)

    @classmethod
    def from_parts(cls, graphdef: nnx.GraphDef, parts: Sequence[Any], fn: Callable[..., Any]):
        """`fn(nnx.merge(graphdef, *parts), *args)`, jitted (`parts` passed at every call)."""
        self = cls.__new__(cls)
        self._build(graphdef, tuple(parts), fn)
        return self

    def _build(self, graphdef: nnx.GraphDef, parts: tuple[Any, ...], fn: Callable[..., Any]):
        self.graphdef, self.parts = graphdef, parts

        def call(parts, *args):
            return fn(nnx.merge(graphdef, *parts), *args)

        self.jitted = jax.jit(call)

    def __call__(self, *args: Any) -> Any:
        return self.jitted(self.parts, *args)
