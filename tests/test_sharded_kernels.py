"""The Pallas NA backend in the sharded train step, on 8 CPU devices (kernels in interpret mode).

XLA cannot partition a Pallas kernel, so the trainer traces its steps with the mesh as context
and the NA op runs the kernels under ``shard_map`` over the batch (and heads). Here the 8-device
steps (data parallel, and data x fsdp) must equal the 1-device steps, and the kernels must sit
inside the manually sharded region.
"""

from __future__ import annotations

import jax
import numpy as np

from nat_jax.kernels import sharding as na_sharding
from nat_jax.train import sharding, trainer

from test_train import fixed_batch, no_aug, tiny_config


def _two_steps(c, mesh, batch):
    run = trainer.setup_training(c, mesh, 10, total_steps=100, warmup_steps=0)
    state, losses = run.state, []
    for _ in range(2):
        state, metrics = run.step_fn(state, trainer.put_batch(batch, mesh), run.rest)
        losses.append(float(metrics["loss"]))
    jaxpr = run.step_fn.trace(run.state, trainer.put_batch(batch, mesh), run.rest).jaxpr
    return jax.device_get(state.params), losses, str(jaxpr)


def test_pallas_train_step_sharded_equals_single_device(rng):
    c = no_aug(tiny_config("dinat_mini", fsdp_min_size=0, learning_rate=5e-3))
    c.model_overrides.na_backend = "pallas"
    c.model_overrides.depths = (1,)
    c.model_overrides.num_heads = (2,)
    c.model_overrides.dilations = ((2,),)
    batch = fixed_batch(rng)
    p1, l1, jaxpr1 = _two_steps(c, sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]), batch)
    assert "shard_map" not in jaxpr1  # one device: the plain kernel call
    for fsdp in (1, 4):
        p8, l8, jaxpr8 = _two_steps(c, sharding.make_mesh(fsdp=fsdp), batch)
        assert "shard_map" in jaxpr8 and "pallas_call" in jaxpr8
        np.testing.assert_allclose(l8, l1, rtol=1e-5, err_msg=f"fsdp={fsdp}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), p8, p1)


def test_partition_axes():
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"))
    assert na_sharding.partition_axes(mesh, batch=16, heads=3) == (("data", "fsdp"), ())
    # A batch of 2 takes the data axis only; the fsdp axis splits the 4 heads.
    assert na_sharding.partition_axes(mesh, batch=2, heads=4) == (("data",), ("fsdp",))
    assert na_sharding.partition_axes(mesh, batch=3, heads=5) == ((), ())
