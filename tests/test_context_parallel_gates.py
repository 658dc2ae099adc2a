"""Context parallelism compiled for accelerators that are not here: a DiNAT-like NA layer's
forward and backward with its token rows split 4 ways (and the batch over the rest) over 8 abstract
H100s (the ``pallas`` kernels, through XLA's Triton) and over v5e-8 / v4-8 TPU topologies (the
``xla`` path and the ``pallas_tpu`` Mosaic kernels), with the plugins of ``make install``.

Each program must exchange halos by collective-permute, gather nothing, and run the kernels
per device on its local range. All in the ``slow`` tier (each is a separate process with an
accelerator plugin); the default tier checks the same programs on CPU devices
(``test_context_parallel.py``, the pallas kernels in interpret mode).
"""

from __future__ import annotations

import numpy as np
import pytest

from nat_jax.train import deviceless


def program(target_name: str, backend: str) -> dict:
    """Worker task: compile ``grad(sum(na2d(q, k, v, 7, dilation=2, rpb)))`` with q/k/v
    ``bf16[4, 64, 64, 4, 32]`` split over a ``(data, sp 4)`` mesh of the target's devices
    (rows over ``sp``), and count what the compiled program does."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import nat_jax

    devices = deviceless.abstract_devices(deviceless.TARGETS[target_name])
    mesh = Mesh(np.asarray(devices).reshape(-1, 4), ("data", "sp"))  # v4-8: 4 chips
    tokens = jax.ShapeDtypeStruct((4, 64, 64, 4, 32), jnp.bfloat16,
                                  sharding=NamedSharding(mesh, P("data", "sp")))
    rpb = jax.ShapeDtypeStruct((4, 13, 13), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(q, k, v, r):
        out = nat_jax.na2d(q, k, v, 7, dilation=2, rpb=r.astype(q.dtype), backend=backend,
                           spatial_axes=("sp", None))
        return out.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(tokens, tokens, tokens,
                                                               rpb).lower().compile()
    return dict(**deviceless.hlo_summary(compiled.as_text(), tokens.shape[0]),
                temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                memory_per_device=deviceless.TARGETS[target_name].memory_per_device)


def _check(report: dict) -> None:
    assert report["collective_permutes"] > 0 and report["all_gathers"] == 0, report
    assert report["temp_bytes"] < report["memory_per_device"]


@pytest.mark.slow
def test_pallas_kernels_per_shard_on_8_h100s():
    report = deviceless.run_isolated("h100x8", program, "h100x8", "pallas", timeout=600)
    _check(report)
    assert report["triton_kernels"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("topology,backend", [("v5e-8", "xla"), ("v5e-8", "pallas_tpu"),
                                              ("v4-8", "pallas_tpu")])
def test_tpu_topologies(topology, backend):
    report = deviceless.run_isolated(topology, program, topology, backend, timeout=900)
    _check(report)
    assert (report["mosaic_kernels"] > 0) == (backend == "pallas_tpu")
