"""models/split.py: leaf names of key paths (`path_str`), split -> merge round trips of a small
NNX module, and `SplitJit` (whole module, or `from_parts` of `split_model`'s parts) against the
same function run eagerly on the module."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from regionclip_jax.models.split import SplitJit, merge, path_str, split_model

DictKey = jax.tree_util.DictKey
GetAttrKey = jax.tree_util.GetAttrKey
SequenceKey = jax.tree_util.SequenceKey


class Tiny(nnx.Module):
    """Linear -> BatchNorm (running statistics: non-Param state) -> two Linears in a list."""

    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x, gain=1.0):
        x = jnp.tanh(self.bn(self.enc(x)))
        for block in self.blocks:
            x = block(x) * gain
        return x


def _tiny() -> Tiny:
    m = Tiny(nnx.Rngs(0))
    # Non-trivial running statistics (the defaults 0 / 1 would hide a lost `rest`).
    m.bn.mean.set_value(jnp.asarray([0.3, -0.2, 0.1, 0.5]))
    m.bn.var.set_value(jnp.asarray([1.5, 0.7, 2.0, 0.9]))
    return m


def _numpy_forward(w: dict[str, np.ndarray], x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Tiny's forward pass written out in NumPy from its named weights (BatchNorm eps 1e-5)."""
    h = x @ w["enc/kernel"] + w["enc/bias"]
    h = (h - w["bn/mean"]) / np.sqrt(w["bn/var"] + 1e-5) * w["bn/scale"] + w["bn/bias"]
    h = np.tanh(h)
    for i in range(2):
        h = (h @ w[f"blocks/{i}/kernel"] + w[f"blocks/{i}/bias"]) * gain
    return h


def _named(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize(
    "path,want",
    [
        (
            (DictKey("visual"), DictKey("layer1"), DictKey(0), DictKey("kernel")),
            "visual/layer1/0/kernel",
        ),
        (
            (GetAttrKey("visual"), GetAttrKey("attnpool"), GetAttrKey("q_proj")),
            "visual/attnpool/q_proj",
        ),
        ((DictKey("blocks"), SequenceKey(3), DictKey("bias")), "blocks/3/bias"),
        ((DictKey("ln"), DictKey("scale"), GetAttrKey("value")), "ln/scale"),
        ((DictKey("ln"), DictKey("scale"), GetAttrKey("raw_value")), "ln/scale"),
        ((SequenceKey(0), GetAttrKey("w"), DictKey(2)), "0/w/2"),
        ((DictKey("value"),), ""),
        ((), ""),
    ],
)
def test_path_str_of_hand_written_key_paths(path, want):
    assert path_str(path) == want


def test_path_str_of_a_pytree_with_dicts_attributes_and_lists():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Box:
        value: jax.Array
        other: jax.Array

    tree = {"a": [np.zeros(1), {"b": np.zeros(2)}], "c": Box(np.zeros(3), np.zeros(4))}
    names = sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    # Box.value is dropped as a trailing `value` (the Variable convention), `other` kept.
    assert names == ["a/0", "a/1/b", "c", "c/other"]


def test_split_model_parts_and_names():
    m = _tiny()
    _, params, rest = split_model(m)
    got_p, got_r = _named(params), _named(rest)
    assert sorted(got_p) == [
        "blocks/0/bias",
        "blocks/0/kernel",
        "blocks/1/bias",
        "blocks/1/kernel",
        "bn/bias",
        "bn/scale",
        "enc/bias",
        "enc/kernel",
    ]
    assert sorted(got_r) == ["bn/mean", "bn/var"]
    # Raw arrays, not Variables, as leaves.
    for leaf in jax.tree.leaves(params) + jax.tree.leaves(rest):
        assert isinstance(leaf, jax.Array) and not isinstance(leaf, nnx.Variable)
    np.testing.assert_array_equal(got_p["enc/kernel"], np.asarray(m.enc.kernel[...]))
    np.testing.assert_array_equal(got_r["bn/var"], np.float32([1.5, 0.7, 2.0, 0.9]))


def test_merge_gives_the_same_outputs():
    m = _tiny()
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    want = np.asarray(m(x))
    graphdef, params, rest = split_model(m)
    w = {**_named(params), **_named(rest)}
    np.testing.assert_allclose(want, _numpy_forward(w, x), rtol=1e-5, atol=1e-5)
    merged = merge(graphdef, params, rest)
    assert isinstance(merged, Tiny) and merged is not m
    np.testing.assert_allclose(np.asarray(merged(x)), want, rtol=1e-6, atol=1e-6)
    # The merged module carries the given arrays: other weights, other outputs.
    params2 = jax.tree.map(lambda v: v * 0.5, params)
    w2 = {**_named(params2), **_named(rest)}
    got2 = np.asarray(merge(graphdef, params2, rest)(x))
    np.testing.assert_allclose(got2, _numpy_forward(w2, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got2, want)


def test_merge_works_inside_jit():
    m = _tiny()
    graphdef, params, rest = split_model(m)
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    f = jax.jit(lambda p, r, x: merge(graphdef, p, r)(x))
    np.testing.assert_allclose(
        np.asarray(f(params, rest, x)), np.asarray(m(x)), rtol=1e-5, atol=1e-6
    )


def test_split_jit_equals_the_eager_call():
    m = _tiny()

    def fn(module, x, gain):
        return module(x, gain), module.enc(x).sum()

    rng = np.random.default_rng(2)
    compiled = SplitJit(m, fn)
    for n in (4, 7):  # one program per input shape
        x = rng.standard_normal((n, 3)).astype(np.float32)
        want = fn(m, x, 2.0)
        got = compiled(x, 2.0)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # And against the NumPy forward of the weights (not only the module against itself).
    _, params, rest = split_model(m)
    w = {**_named(params), **_named(rest)}
    np.testing.assert_allclose(np.asarray(got[0]), _numpy_forward(w, x, 2.0), rtol=1e-5, atol=1e-5)


def test_split_jit_from_parts_equals_the_eager_call():
    m = _tiny()
    graphdef, params, rest = split_model(m)
    x = np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32)

    def fn(module, x):
        return module(x, gain=0.5)

    compiled = SplitJit.from_parts(graphdef, (params, rest), fn)
    assert compiled.graphdef is graphdef and len(compiled.parts) == 2
    np.testing.assert_allclose(np.asarray(compiled(x)), np.asarray(fn(m, x)), rtol=1e-5, atol=1e-6)
    # Other parts (e.g. a train state's), other results: the parts are used, not the module's.
    params2 = jax.tree.map(lambda v: v + 0.1, params)
    other = SplitJit.from_parts(graphdef, (params2, rest), fn)
    w2 = {**_named(params2), **_named(rest)}
    np.testing.assert_allclose(
        np.asarray(other(x)), _numpy_forward(w2, x, 0.5), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(np.asarray(other(x)), np.asarray(compiled(x)))
