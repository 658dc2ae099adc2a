"""Whole programs compiled for 8 abstract H100s on this CPU-only machine (XLA's GPU compiler).

Default tier: the NA op with the Pallas backend on a batch-sharded input (with and without the
context mesh, which is what puts the kernel under ``shard_map``) and the trainer's own step of
the small ``digits`` config. Slow tier: NAT-Tiny and DiNAT-Tiny training steps at 128 images
per GPU in bf16 with the Pallas kernels, which must fit in 80 GB per GPU. In both, every kernel
launch of the step is checked by ptxas (no spills, shared memory within the limit).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from nat_jax.train import deviceless

GLOBAL_BATCH = 32


def _na_program(with_mesh: bool) -> dict:
    """Worker task: forward + backward of one sharded NA call, compiled for h100x8."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from nat_jax import kernels

    devices = deviceless.abstract_devices(deviceless.TARGETS["h100x8"])
    mesh = Mesh(np.asarray(devices).reshape(4, 2), ("data", "fsdp"))
    x = jax.ShapeDtypeStruct((GLOBAL_BATCH, 28, 28, 4, 32), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    bias = jax.ShapeDtypeStruct((4, 13, 13), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(q, k, v, rpb):
        out = kernels.na2d(q, k, v, 7, rpb=rpb.astype(q.dtype), backend="pallas")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    if with_mesh:
        with jax.set_mesh(mesh):
            compiled = step.trace(x, x, x, bias).lower().compile()
    else:
        compiled = step.trace(x, x, x, bias).lower().compile()
    return deviceless.hlo_summary(compiled.as_text(), GLOBAL_BATCH)


@pytest.mark.parametrize("with_mesh", [True, False], ids=["mesh", "no-mesh"])
def test_pallas_kernels_run_per_shard_under_the_context_mesh(with_mesh):
    """With the mesh set, each GPU runs the kernels on its own batch shard: no all-gather at
    all. Without it XLA cannot partition the custom calls and gathers the whole batch (the
    check would catch that regression)."""
    summary = deviceless.run_isolated("h100x8", _na_program, with_mesh, timeout=900)
    # Forward, dQ, dK/dV, dRPB; and once more each in the branch that reruns them on inputs
    # with NaN/Inf zeroed (non-finite containment, taken only when a result is non-finite).
    assert summary["triton_kernels"] == 8
    if with_mesh:
        assert summary["all_gathers"] == 0 and not summary["batch_all_gathers"]
    else:
        assert summary["batch_all_gathers"], summary


@pytest.mark.slow  # default-tier time (~35-60 s); make test-all runs it
def test_trainer_step_compiles_for_8_h100s_with_kernels_per_shard():
    report = deviceless.compile_train_step(
        "h100x8", "digits", per_device_batch=8,
        overrides={"na_backend": "pallas", "compute_dtype": "bfloat16"},
        timeout=1200)
    assert report["fits"] and report["triton_kernels"] > 0
    assert not report["batch_all_gathers"], report["batch_all_gathers"]
    assert report["global_batch"] == 64 and report["peak_bytes"] > 0
    # Every kernel launch of the step went through ptxas: no spills, within shared memory.
    assert report["kernel_launches"] == report["triton_kernels"] and report["kernels_compiled"]
    assert not report["kernel_problems"], report["kernel_problems"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["nat_tiny", "dinat_tiny"])
def test_tiny_models_train_on_8_h100s_at_128_per_gpu(config):
    report = deviceless.compile_train_step(
        "h100x8", config, per_device_batch=128,
        overrides={"na_backend": "pallas", "compute_dtype": "bfloat16"},
        timeout=3600)
    assert report["fits"], report
    assert report["triton_kernels"] > 0 and not report["batch_all_gathers"]
    assert report["kernel_launches"] == report["triton_kernels"]
    assert not report["kernel_problems"], report["kernel_problems"]


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_is_reported_at_once():
    """A compile worker killed without reporting (the kernel's OOM killer does that to a
    whole-model compile too large for the host) is an error at once, not a wait for the
    timeout."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker process died .*exit code -9"):
        deviceless.run_isolated("v5e-8", _die, timeout=600)
    assert time.monotonic() - start < 120
