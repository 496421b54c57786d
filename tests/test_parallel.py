"""Tests of regionclip_jax.parallel: rules → specs, meshes, and parameter sharding on fake devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from regionclip_jax import parallel

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("other", "model"))


def test_logical_to_spec_without_mesh_follows_rules():
    assert parallel.logical_to_spec(("batch", None, "mlp"), rules=RULES) == P(
        ("data", "fsdp"), None, "model"
    )
    assert parallel.logical_to_spec(("unknown", "embed"), rules=RULES) == P(None, "fsdp")


def test_logical_to_spec_uses_each_mesh_axis_once():
    # 'mlp' and 'other' both map to 'model': the second use must be dropped.
    assert parallel.logical_to_spec(("mlp", "other"), rules=RULES) == P("model", None)


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh({"batch": 1})
    with pytest.raises(ValueError, match="needs 4 devices"):
        parallel.make_mesh({"data": 4})
    with pytest.raises(ValueError, match="at most one"):
        parallel.make_mesh({"data": -1, "model": -1})


def test_make_mesh_fills_minus_one():
    mesh = parallel.make_mesh({"data": -1})
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert mesh.shape["data"] == len(mesh.devices.flat)


def test_shard_act_is_noop_without_mesh():
    import jax.numpy as jnp

    x = jnp.ones((4, 3))
    assert parallel.shard_act(x, ("act_batch", None)) is x
    with pytest.raises(ValueError, match="rank 2"):
        parallel.shard_act(x, ("act_batch",))


_EIGHT_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from regionclip_jax import parallel

    assert jax.device_count() == 8, jax.devices()
    init = nnx.initializers.lecun_normal()

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(12, 16, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
            # 3 is not divisible by the fsdp size 2: that dimension must fall back to replicated.
            self.down = nnx.Linear(16, 3, rngs=rngs,
                                   kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

        def __call__(self, x):
            h = parallel.shard_act(jax.nn.relu(self.up(x)), ("act_batch", "act_mlp"))
            return self.down(h)

    model = Mlp(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 12))
    want = np.asarray(model(x))

    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    parallel.shard_module(model, mesh)
    assert model.up.kernel[...].sharding.spec == P("fsdp", "model"), model.up.kernel[...].sharding
    assert model.down.kernel[...].sharding.spec == P("model", None), model.down.kernel[...].sharding
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.NamedSharding(mesh, P(("data", "fsdp"))))
        got = nnx.jit(lambda m, v: m(v))(model, xs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    print("OK")
    """
)


@pytest.mark.multidevice
def test_shard_module_on_eight_fake_devices():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        # Cached multi-device CPU executables hang in their collectives (see train/loop.py).
        JAX_ENABLE_COMPILATION_CACHE="false",
    )
    result = subprocess.run(
        [sys.executable, "-c", _EIGHT_DEVICE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


# ---------------------------------------------------------------------------------------------
# Multi-process start-up helpers (the multi-process runs themselves: test_multiprocess.py)


def test_explicit_distributed_setup_needs_all_three_values():
    with pytest.raises(ValueError, match=r"missing: \['num_processes', 'process_id'\]"):
        parallel.initialize_distributed("127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id 2 not in"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 2)


def test_no_cluster_means_a_single_process(monkeypatch):
    for var in (
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "TPU_WORKER_HOSTNAMES",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(var, raising=False)
    assert parallel.detected_cluster() is None
    assert parallel.initialize_distributed() == "single"


def test_slurm_is_detected_from_its_variables(monkeypatch):
    for var, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                       "SLURM_STEP_NODELIST": "node1", "SLURM_LOCALID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(var, value)
    assert parallel.detected_cluster() == "SlurmCluster"


def test_one_process_holds_the_whole_batch():
    mesh = parallel.make_mesh({"data": -1})
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    assert parallel.process_batch_block(sharding, (8, 3)) == (0, 1)
