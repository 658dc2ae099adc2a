"""The Pallas NA backend in the sharded train step, on 8 CPU devices (kernels in interpret mode).

XLA cannot partition a Pallas kernel, so the trainer traces its steps with the mesh as context
and the NA op runs the kernels under ``shard_map`` over the batch (and heads). Here the 8-device
steps (data parallel, and data x fsdp) must equal the 1-device steps, and the kernels must sit
inside the manually sharded region.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nat_jax.kernels import sharding as na_sharding
from nat_jax.train import sharding, trainer

from test_train import fixed_batch, no_aug, tiny_config


def _two_steps(c, mesh, batch, hlo: bool = False):
    """Params and losses after two train steps, and the step's jaxpr (``hlo``: its compiled,
    partitioned HLO) as text."""
    run = trainer.setup_training(c, mesh, 10, total_steps=100, warmup_steps=0)
    traced = run.step_fn.trace(run.state, trainer.put_batch(batch, mesh), run.rest)
    program = traced.lower().compile().as_text() if hlo else str(traced.jaxpr)
    state, losses = run.state, []
    for _ in range(2):
        state, metrics = run.step_fn(state, trainer.put_batch(batch, mesh), run.rest)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses, program


@pytest.mark.slow  # default-tier time (~35-60 s); make test-all runs it
def test_pallas_train_step_sharded_equals_single_device(rng):
    c = no_aug(tiny_config("dinat_mini", fsdp_min_size=0, learning_rate=5e-3))
    c.na_backend = "pallas"
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


def test_kernel_limits_apply_per_shard():
    """The CUDA grid limit (batch * prod(dilation) <= 65535) holds for what each device
    launches: DiNAT-T's recipe batch (1024 over 8 GPUs, dilation 8x8) fits per shard though not
    globally, so under the mesh ``auto`` keeps the kernels and ``pallas`` is accepted; without
    a mesh it is refused with the reason. Block sizes are resolved for the per-shard shapes."""
    import jax.numpy as jnp

    from nat_jax.kernels import ops
    from nat_jax.kernels.params import make_params

    q = jax.ShapeDtypeStruct((1024, 56, 56, 2, 32), jnp.bfloat16)
    rpb = jax.ShapeDtypeStruct((2, 13, 13), jnp.bfloat16)
    p = make_params((56, 56), 32, 7, dilation=8)
    assert "65535" in ops._unsupported("pallas", q, q, p, rpb)  # noqa: SLF001
    with ops.lowering_platforms("cuda"):
        assert ("cuda", "pallas") not in ops._auto_choices(q, q, q, p, rpb)  # noqa: SLF001
    mesh = sharding.make_mesh(fsdp=1)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        local, _, local_rpb = na_sharding.local_shapes(q, q, rpb)
        assert local.shape == (128, 56, 56, 2, 32) and local_rpb.shape == (2, 13, 13)
        assert ops._unsupported("pallas", q, q, p, rpb) is None  # noqa: SLF001
        assert ("cuda", "pallas") not in ops._auto_choices(q, q, q, p, rpb)  # noqa: SLF001
        with ops.lowering_platforms("cuda"):  # a CPU mesh: CUDA only when asked for
            assert ("cuda", "pallas") in ops._auto_choices(q, q, q, p, rpb)  # noqa: SLF001
    heads = sharding.make_mesh(fsdp=8)  # batch over (data, fsdp) still: 1024 divides by 8
    with jax.sharding.use_abstract_mesh(heads.abstract_mesh):
        assert na_sharding.local_shapes(q, q, rpb)[0].shape[0] == 128
    odd = jax.ShapeDtypeStruct((9, 16, 16, 8, 32), jnp.bfloat16)  # batch 9: heads split
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        local, _, local_rpb = na_sharding.local_shapes(odd, odd, jax.ShapeDtypeStruct(
            (8, 13, 13), jnp.bfloat16))
        assert local.shape == (9, 16, 16, 1, 32) and local_rpb.shape == (1, 13, 13)
    with pytest.raises(ValueError, match="65535"):
        jax.eval_shape(lambda q: ops.neighborhood_attention(q, q, q, 7, dilation=8,
                                                            backend="pallas"), q)
