"""CLIP forward on an 8-device ('data' 4 x 'model' 2) CPU mesh equals the single-device forward.

The test re-executes this file in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set
before JAX initialises, so it cannot run in the pytest process).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MARKER = "SHARDED_FORWARD_OK"


@pytest.mark.multidevice
def test_sharded_forward_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    # Cached multi-device CPU executables hang in their collectives (loop.avoid_cpu_multidevice_cache_hang).
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert result.stdout.count(MARKER) == 2, result.stdout


def _check(config, mesh) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from regionclip_jax.models import CLIP
    from regionclip_jax.parallel import shard_module

    # Random weights drawn in NumPy (no initialiser compiles); BN/LN scales near 1.
    rng = np.random.RandomState(0)
    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = var.get_value().shape
        if path[-1] in ("scale", "var"):
            value = rng.uniform(0.75, 1.25, shape)
        elif len(shape) >= 2:
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = rng.randn(*shape) * 0.1
        var.set_value(jnp.asarray(value, jnp.float32))
    images = rng.randn(8, 64, 64, 3).astype(np.float32)
    tokens = np.zeros((8, 77), np.int32)
    tokens[:, :6] = rng.randint(1, 498, (8, 6))
    tokens[np.arange(8), rng.randint(6, 20, 8)] = 499  # EOT

    @jax.jit
    def forward(model, images, tokens):
        return model.encode_image(images), model.encode_text(tokens)

    ref_img, ref_txt = jax.device_get(forward(model, images, tokens))

    shard_module(model, mesh)
    sharded = [
        path
        for path, var in nnx.to_flat_state(nnx.state(model))
        if "model" in jax.tree.leaves(tuple(var.get_value().sharding.spec))
    ]
    assert sharded, "no parameter is sharded over 'model'"
    assert any(p[-3:] == ("mlp", "c_fc", "kernel") for p in sharded), sharded
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, PartitionSpec("data"))
        img, txt = forward(model, jax.device_put(images, batch), jax.device_put(tokens, batch))
    assert len(img.sharding.device_set) == 8
    for ours, ref in ((img, ref_img), (txt, ref_txt)):
        err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
        assert err <= 1e-5, err
    print(MARKER, "vision=resnet" if config.is_resnet else "vision=vit", len(sharded))


def main() -> None:
    import jax

    from regionclip_jax.models import CLIPConfig
    from regionclip_jax.parallel import make_mesh

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh({"data": 4, "model": 2})
    _check(CLIPConfig(32, 64, (1, 1, 1, 1), 16, None, 77, 500, 64, 4, 2), mesh)
    _check(CLIPConfig(32, 64, 2, 128, 16, 77, 500, 64, 4, 2), mesh)


if __name__ == "__main__":
    main()
