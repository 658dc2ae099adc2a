"""Pallas TPU NA kernels (forward, lse, dQ/dK/dV/dRPB) against the float64 oracle.

Everything runs the real kernel bodies; ``TestPallasTPU.INTERPRET`` says how (on CPU Pallas's
TPU interpret mode, which simulates VMEM and DMAs and fills every buffer it allocates with NaN,
so an output element a kernel fails to write shows up as NaN in its raw tiled output; a TPU run
sets it False). The public op (``backend="pallas_tpu"``) interprets with Pallas's generic
interpreter off TPU. That the same kernels compile with Mosaic for v5e and v4 is checked by
``tests/test_tpu_gate.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

import na_cases
import oracle
from nat_jax import kernels
from nat_jax.kernels import pallas_tpu, windows
from nat_jax.kernels.params import make_params
from test_pallas import (FWD_TOL, assert_close, case_id,
                         check_kernel_outputs, check_public_op, make_inputs, oracle_kw)


def tpu_blocks(c):
    """128-row tiles (the TPU minimum) shaped so the small test maps still hold several tiles
    per axis: queries narrow on the leading axes and long on the last, keys the other way
    round, backward tiles unlike forward tiles, so boxes, inverse boxes, repeated (empty)
    steps and padding are all exercised."""
    rank = len(c["shape"])
    narrow = (2,) * (rank - 1)
    long = pallas_tpu.LANES // 2 ** (rank - 1)
    q, kv = (*narrow, long), (long, *narrow)
    return pallas_tpu.BlockSizes(q=q, kv=kv, q_dq=kv, kv_dq=q, q_dkv=q, kv_dkv=q)


# 1-D maps long enough for several 128-row tiles per dilation group.
LONG_1D = [na_cases.case((300,), 8, stride=3, dilation=2, causal=True),
           na_cases.case((290,), 9, dilation=2)]

# Quick tier: every feature at least once (dilation, stride, causal, even kernels, kernel ==
# size, RPB with dilation, 1-D/2-D/3-D, several tiles per axis).
QUICK = [
    (LONG_1D[0], False),  # 1-D even kernel, stride, dilation, causal, 3 tiles per group
    (LONG_1D[1], True),  # 1-D RPB with dilation, several tiles
    (na_cases.QUICK[2], False),  # kernel == size
    (na_cases.QUICK[4], False),  # 2-D mixed causal, stride, dilation, even kernel
    (na_cases.RPB[2], True),  # 2-D RPB with dilation
    (na_cases.RPB[4], True),  # 3-D RPB with dilation (3-D causal/stride/even: slow tier)
    # Two programs of two heads each, side by side in lanes at an unaligned offset (48).
    (na_cases.case((12, 11), 5, dilation=(1, 2), heads=4, head_dim=48), True),
]
SLOW = ([(c, False) for c in na_cases.QUICK if all(c is not q for q, _ in QUICK)]
        + [(c, True) for c in na_cases.RPB if all(c is not q for q, _ in QUICK)]
        + [(c, False) for c in na_cases.NATTEN_GRID[1:7] + na_cases.NATTEN_GRID[10:12]]
        + [(c, False) for c in na_cases.random_cases(10, 3, 1) + na_cases.random_cases(11, 4, 2)
           + na_cases.random_cases(12, 2, 3)])


class TestPallasTPU:
    INTERPRET = pltpu.InterpretParams()

    def check_case(self, rng, c, dtype, with_rpb, blocks=None):
        p = make_params(c["shape"], c["head_dim"], c["kernel"], c["stride"], c["dilation"],
                        c["causal"])
        blocks = blocks or tpu_blocks(c)
        check_kernel_outputs(rng, c, dtype, with_rpb, lambda *a: pallas_tpu.kernel_outputs(
            *a[:3], p, a[3], a[4], block_sizes=blocks, interpret=self.INTERPRET))

    @pytest.mark.parametrize("c,with_rpb", QUICK, ids=case_id)
    def test_quick(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.float32, with_rpb)

    @pytest.mark.parametrize("c,with_rpb", [QUICK[4]], ids=case_id)
    def test_bf16(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.bfloat16, with_rpb)

    @pytest.mark.parametrize("c,with_rpb,blocks", [
        (na_cases.RPB[1], True, pallas_tpu.BlockSizes(q=(6, 64), kv=(4, 32), q_dq=(12, 32),
                                                      kv_dq=(2, 64), q_dkv=(4, 96),
                                                      kv_dkv=(8, 48))),
        pytest.param(na_cases.QUICK[8], False,
                     pallas_tpu.BlockSizes(q=(2, 8, 8), kv=(4, 4, 8), q_dq=(8, 2, 8),
                                           kv_dq=(1, 16, 8), q_dkv=(4, 8, 4),
                                           kv_dkv=(2, 2, 32)), marks=pytest.mark.slow),
    ], ids=case_id)
    def test_unequal_tiles(self, rng, c, with_rpb, blocks):
        """Tiles that are not powers of two per axis, query and key tiles of different shapes,
        forward tiles unlike backward tiles (the residuals are re-tiled)."""
        self.check_case(rng, c, jnp.float32, with_rpb, blocks)

    @pytest.mark.slow
    @pytest.mark.parametrize("c,with_rpb", SLOW, ids=case_id)
    def test_sweep(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.float32, with_rpb)

    @pytest.mark.slow
    @pytest.mark.parametrize("c,with_rpb", SLOW[::5], ids=case_id)
    def test_sweep_bf16(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.bfloat16, with_rpb)

    @pytest.mark.slow
    @pytest.mark.parametrize("c", na_cases.all_causal(na_cases.case((11, 10), (5, 4),
                                                                    stride=(2, 1),
                                                                    dilation=(2, 2))),
                             ids=case_id)
    def test_causal_combos(self, rng, c):
        self.check_case(rng, c, jnp.float32, False)

    @pytest.mark.slow
    @pytest.mark.parametrize("c", [na_cases.case((14, 14), 7, heads=1, head_dim=32),
                                   na_cases.case((13, 9), 5, dilation=(2, 1), heads=1,
                                                 head_dim=128)], ids=case_id)
    def test_head_dims_and_model_windows(self, rng, c):
        """NAT's head_dim (32) and a large one, with RPB: lane-padded feature blocks."""
        self.check_case(rng, c, jnp.float32, True)

    def test_default_blocks_and_api(self, rng):
        """The public op with backend="pallas_tpu": default tiles, custom_vjp and jax.grad, with
        cotangents on both the output and the lse, against the reference backend's autodiff
        (itself checked against the oracle); the dispatcher picks it only on TPU."""
        c = na_cases.case((12, 10), (5, 3), dilation=(2, 1), heads=2, head_dim=16)
        (q, k, v, dout, dlse, rpb), (q64, k64, v64, _, _, rpb64) = make_inputs(
            rng, c, jnp.float32, True)
        p = make_params(c["shape"], 16, c["kernel"], dilation=c["dilation"])
        assert kernels.resolve_backend("auto", q, k, v, p, rpb, platform="tpu") == "pallas_tpu"
        assert kernels.resolve_backend("auto", q, k, v, p, rpb) == (
            na_cases.auto_on_cpu() if self.INTERPRET else "pallas_tpu")

        check_public_op(c, (q, k, v, dout, dlse, rpb), (q64, k64, v64, None, None, rpb64),
                        "pallas_tpu")

    @pytest.mark.slow
    def test_vmap_and_random_grid_order(self, rng):
        """Under jax.vmap (an extra grid axis), and with the interpreter visiting the
        "parallel" grid axes in a random order: nothing may depend on the order of tiles."""
        c = na_cases.case((20, 17), 5, dilation=(2, 3), heads=2, head_dim=16)
        (q, k, v, *_, rpb), (q64, k64, v64, *_, rpb64) = make_inputs(rng, c, jnp.float32, True)
        p = make_params(c["shape"], 16, 5, dilation=c["dilation"])
        params = pltpu.InterpretParams(random_seed=7) if self.INTERPRET else False
        out, lse = jax.jit(jax.vmap(lambda q, k, v: pallas_tpu.na_fused(
            q[None], k[None], v[None], p, rpb, block_sizes=tpu_blocks(c),
            interpret=params)))(q, k, v)
        want, want_lse = oracle.na_forward(q64, k64, v64, rpb=rpb64, **oracle_kw(c))
        assert_close(out[:, 0], want, *FWD_TOL[jnp.float32], "out")
        assert_close(lse[:, 0], want_lse, 1e-4, 1e-5, "lse")


def test_sharded_batch_runs_per_shard(rng):
    """Under a context mesh (as the trainer traces its steps) the op runs the kernels per batch
    shard under ``shard_map``: XLA cannot partition a Mosaic call. Values and all four
    gradients equal the unsharded call's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("data", "fsdp"))
    c = na_cases.case((10, 9), 3, dilation=(2, 1), batch=2, heads=2, head_dim=16)
    (q, k, v, dout, _, rpb), _ = make_inputs(rng, c, jnp.float32, True)

    def loss(q, k, v, rpb):
        out = kernels.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="pallas_tpu")
        return jnp.sum(out * dout)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    want = grad(q, k, v, rpb)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, batch) for x in (q, k, v)] + [rpb]
        assert "shard_map" in str(jax.make_jaxpr(loss)(*args))
        got = grad(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "tpu",
                    reason="Mosaic-compiled kernels need a TPU (run with JAX_PLATFORMS=tpu)")
class TestPallasTPUCompiled(TestPallasTPU):
    """The same grid, compiled by Mosaic and run on a TPU instead of interpreted."""

    INTERPRET = False


# ------------------------------------------------------------------ schedule and block sizes


def _schedule(plan, inverse: bool):
    """Every grid point's (tile, step) -> (visited tile, runs) for one plan, evaluated with the
    kernels' own scalar functions (vectorized over the grid)."""
    nt = plan.nk if inverse else plan.nq
    steps = pallas_tpu._q_steps(plan) if inverse else pallas_tpu._kv_steps(plan)  # noqa: SLF001
    step_fn = pallas_tpu._q_step if inverse else pallas_tpu._kv_step  # noqa: SLF001

    def one(z, i, j):
        glen = pallas_tpu._group_lengths(plan, z)  # noqa: SLF001
        tile, run = step_fn(plan, pallas_tpu._unravel(i, nt), glen, j)  # noqa: SLF001
        return jnp.stack([jnp.asarray(t, jnp.int32) for t in tile]), run

    z, i, j = np.meshgrid(np.arange(plan.groups), np.arange(math.prod(nt)), np.arange(steps),
                          indexing="ij")
    tiles, runs = jax.jit(jax.vmap(one))(*(jnp.asarray(a.ravel(), jnp.int32) for a in (z, i, j)))
    shape = (plan.groups, math.prod(nt), steps)
    return np.asarray(tiles).reshape(*shape, plan.rank), np.asarray(runs).reshape(shape)


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,q_tile,kv_tile", [
    ((40, 33), (7, 5), (1, 2), (2, 1), (False, True), (4, 32), (16, 8)),
    ((300,), (13,), (4,), (3,), (True,), (128,), (256,)),
    ((9, 12, 10), (3, 4, 3), (1, 2, 3), (2, 1, 1), (True, False, True), (2, 4, 16),
     (8, 4, 4)),
])
def test_schedule_visits_exactly_the_needed_tiles(shape, kernel, stride, dilation, causal,
                                                   q_tile, kv_tile):
    """The block schedule the index maps and kernels compute (splash attention's
    ``data_next`` / ``block_mask``, here derived from the window rules): every tile pair with a
    (query, key) pair in some window runs exactly once, no other pair runs, and an empty step
    repeats the previous step's tile (no new fetch)."""
    from nat_jax.kernels.pallas import _make_plan

    p = make_params(shape, 16, kernel, stride, dilation, causal)
    plan = _make_plan(p, shape, q_tile, kv_tile, False)
    for inverse in (False, True):
        tiles, runs = _schedule(plan, inverse)
        for z, group in enumerate(np.ndindex(*plan.dilation)):
            glen = [windows.group_length(n, d, g) for n, d, g in zip(shape, dilation, group)]
            # needed[a][qt, kt]: some query of query tile qt sees some key of key tile kt.
            needed = []
            for a in range(plan.rank):
                qc = np.minimum(np.arange(plan.nq[a] * q_tile[a]), glen[a] - 1)
                kc = np.arange(plan.nk[a] * kv_tile[a])
                m = windows.in_window(qc[:, None], kc[None, :], glen[a], kernel[a], stride[a],
                                      causal[a])
                m = m.reshape(plan.nq[a], q_tile[a], plan.nk[a], kv_tile[a]).any(axis=(1, 3))
                if inverse:  # padding queries of a real row do not count for dK/dV
                    real = np.arange(plan.nq[a] * q_tile[a]) < glen[a]
                    m = (windows.in_window(qc[:, None], kc[None, :], glen[a], kernel[a],
                                           stride[a], causal[a]) & real[:, None])
                    m = m.reshape(plan.nq[a], q_tile[a], plan.nk[a], kv_tile[a]).any(
                        axis=(1, 3)).T
                needed.append(m)
            own = plan.nk if inverse else plan.nq
            other = plan.nq if inverse else plan.nk
            for flat, idx in enumerate(np.ndindex(*own)):
                want = {t for t in np.ndindex(*other)
                        if all(needed[a][idx[a], t[a]] for a in range(plan.rank))}
                visited = [tuple(t) for t, r in zip(tiles[z, flat], runs[z, flat]) if r]
                assert len(visited) == len(set(visited)), "a tile pair runs twice"
                assert set(visited) == want
                assert runs[z, flat].tolist() == sorted(runs[z, flat].tolist(), reverse=True)
                last = tiles[z, flat][runs[z, flat]][-1] if runs[z, flat].any() else None
                for t, r in zip(tiles[z, flat], runs[z, flat]):
                    assert r or last is None or tuple(t) == tuple(last), "empty step refetches"


def test_block_sizes_validation_and_defaults():
    b = pallas_tpu.BlockSizes.get_default((56, 56), (7, 7), (1, 1), 32, jnp.bfloat16)
    assert b.rank == 2 and hash(b) == hash(pallas_tpu.BlockSizes(
        b.q, b.kv, b.q_dq, b.kv_dq, b.q_dkv, b.kv_dkv))
    # Large maps: each kernel keeps a larger tile than the ones it visits (fewer re-reads).
    assert math.prod(b.q) >= math.prod(b.kv) and math.prod(b.q_dq) >= math.prod(b.kv_dq)
    assert math.prod(b.kv_dkv) >= math.prod(b.q_dkv)
    assert math.prod(b.q) > 128
    # A 7x7 map fits one 128-row tile; larger tiles would only add padding.
    assert pallas_tpu.BlockSizes.get_default((7, 7), (7, 7), (1, 1), 32).q == (8, 16)
    assert pallas_tpu.BlockSizes.get_default((1000,), (13,), (3,), 32).q[0] % 128 == 0
    six = dict(q=(6, 64), kv=(3, 128), q_dq=(128, 1), kv_dq=(1, 128), q_dkv=(2, 64),
               kv_dkv=(4, 32))
    pallas_tpu.BlockSizes(**six)
    with pytest.raises(ValueError, match="multiple of 128"):
        pallas_tpu.BlockSizes(**dict(six, kv_dq=(8, 8)))
    with pytest.raises(ValueError, match="positive ints"):
        pallas_tpu.BlockSizes(**dict(six, q=(0, 128)))
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        pallas_tpu.BlockSizes(**dict(six, q=(128,)))
    with pytest.raises(ValueError, match="rank"):
        q = jnp.zeros((1, 16, 16, 1, 16))
        pallas_tpu.na_fused(q, q, q, make_params((16, 16), 16, 3),
                            block_sizes=pallas_tpu.BlockSizes(*[(128,)] * 6))


def test_dispatch_on_tpu():
    """backend="auto" picks the kernels when lowering for a TPU, for supported arguments only;
    naming the backend with unsupported arguments raises with the reason."""
    q = jnp.zeros((2, 16, 16, 4, 32), jnp.bfloat16)
    p = make_params((16, 16), 32, 5)
    resolve = kernels.resolve_backend
    assert resolve("auto", q, q, q, p, None, platform="tpu") == "pallas_tpu"
    assert resolve("auto", q, q, q, p, None, platform="cpu") == na_cases.auto_on_cpu()
    assert resolve("auto", q, q, q, p, None, platform="gpu") == "pallas"
    half = q.astype(jnp.float16)
    assert "float16" in pallas_tpu.unsupported(half, half, p, None)
    assert resolve("auto", half, half, half, p, None, platform="tpu") == "xla"
    big = jnp.zeros((1, 16, 16, 1, 512), jnp.bfloat16)
    assert resolve("auto", big, big, big, p, None, platform="tpu") == "xla"
    with pytest.raises(ValueError, match="head_dim"):
        kernels.na2d(big, big, big, 5, backend="pallas_tpu")
    with pytest.raises(ValueError, match="float16"):
        kernels.na2d(half, half, half, 5, backend="pallas_tpu")


def test_interpret_mode_detects_unwritten_outputs(rng, monkeypatch):
    """The NaN check of the grid is not vacuous: rows a kernel never writes stay NaN."""

    def lazy_kernel(*refs, plan, heads, dq, dv):
        o_ref = refs[3]
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)  # lse never written

    monkeypatch.setattr(pallas_tpu, "_fwd_kernel", lazy_kernel)
    c = na_cases.case((10,), 3, heads=1)
    (q, k, v, *_), _ = make_inputs(rng, c, jnp.float32, False)
    p = make_params(c["shape"], 16, 3)
    _, _, _, (out_t, lse_t) = pallas_tpu._forward(  # noqa: SLF001
        q, k, v, None, p, tpu_blocks(c), pltpu.InterpretParams())
    assert not np.isnan(np.asarray(out_t)).any()
    assert np.isnan(np.asarray(lse_t)).all()


def test_heads_share_lanes():
    """Small head dims are packed side by side in lanes (NAT's 32: four heads per 128 lanes),
    large ones get programs of their own."""
    assert pallas_tpu._layout(2, 32, 32, jnp.bfloat16).heads == 2  # noqa: SLF001
    assert pallas_tpu._layout(16, 32, 32, jnp.bfloat16).heads == 4  # noqa: SLF001
    assert pallas_tpu._layout(6, 32, 32, jnp.bfloat16).heads == 3  # noqa: SLF001
    assert pallas_tpu._layout(4, 128, 64, jnp.float32).heads == 1  # noqa: SLF001
    assert pallas_tpu._layout(3, 24, 40, jnp.float32).heads == 3  # noqa: SLF001
