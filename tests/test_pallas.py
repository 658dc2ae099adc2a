"""Pallas NA kernels (forward, lse, dQ/dK/dV/dRPB) against the float64 oracle and natten flex.

Everything runs the real kernel bodies; ``TestPallasNA.INTERPRET`` says how (True: Pallas
interpret mode, the only option on CPU; a GPU run sets it False). Each grid case runs forward
and backward in one go with every kernel output buffer poisoned with NaN beforehand, so an
element a kernel fails to write shows up as NaN in its raw (tiled, padded) output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import na_cases
import oracle
from nat_jax import kernels
from nat_jax.kernels import autotune, pallas, windows
from nat_jax.kernels.params import make_params

FWD_TOL = {jnp.float32: (2e-5, 1e-5), jnp.bfloat16: (3e-2, 2e-2), jnp.float16: (5e-3, 5e-3)}
GRAD_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 5e-2, jnp.float16: 1e-2}

# Quick tier: every feature at least once (dilation, stride, causal, even kernels, kernel == size,
# RPB with dilation, 1-D/2-D/3-D, tiles smaller than the map so boxes and padding matter).
QUICK = [
    (na_cases.QUICK[1], False),  # 1-D even kernel, stride, dilation, causal
    (na_cases.QUICK[2], False),  # kernel == size
    (na_cases.QUICK[4], False),  # 2-D mixed causal, stride, dilation, even kernel
    (na_cases.RPB[2], True),  # 2-D RPB with dilation
    (na_cases.QUICK[7], False),  # 3-D mixed
    (na_cases.RPB[4], True),  # 3-D RPB
]
SLOW = ([(c, False) for c in na_cases.QUICK if all(c is not q for q, _ in QUICK)]
        + [(c, True) for c in na_cases.RPB if all(c is not q for q, _ in QUICK)]
        + [(c, False) for c in na_cases.NATTEN_GRID[1:7] + na_cases.NATTEN_GRID[10:12]]
        + [(c, False) for c in na_cases.random_cases(10, 3, 1) + na_cases.random_cases(11, 4, 2)
           + na_cases.random_cases(12, 2, 3)])


def case_id(x):
    if isinstance(x, pallas.BlockSizes):
        return "q{}-kv{}".format(*("x".join(map(str, t)) for t in (x.q, x.kv)))
    if isinstance(x, dict):
        return na_cases.case_id(x)
    if isinstance(x, bool):
        return "rpb" if x else "norpb"
    return getattr(x, "__name__", str(x))


def small_blocks(c):
    """Tiles of 16 rows (the Triton minimum): more tiles per map, so box arithmetic, clamping
    and padding are exercised even on the small test shapes."""
    rows = [-(-n // d) for n, d in zip(c["shape"], c["dilation"])]
    t = pallas._grow_tile(rows, 16)  # noqa: SLF001
    return pallas.BlockSizes(q=t, kv=t, q_bwd=t, kv_bwd=t)


def make_inputs(rng, c, dtype, with_rpb):
    shape = (c["batch"], *c["shape"], c["heads"], c["head_dim"])
    arrs = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    arrs.append(rng.standard_normal(shape[:-1]).astype(np.float32))  # lse cotangent
    rpb = (rng.standard_normal((c["heads"], *(2 * k - 1 for k in c["kernel"])))
           .astype(np.float32) if with_rpb else None)
    jx = [jnp.asarray(a, dtype) for a in arrs[:4]] + [jnp.asarray(arrs[4])]
    jx.append(None if rpb is None else jnp.asarray(rpb, dtype))
    # The oracle sees exactly the (rounded) values the kernels see.
    f64 = [None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in jx]
    return jx, f64


def oracle_kw(c):
    return dict(kernel=c["kernel"], stride=c["stride"], dilation=c["dilation"],
                causal=c["causal"])


def assert_close(got, want, atol, rtol, what):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def assert_grad_close(got, want, dtype, what):
    scale = max(1.0, float(np.abs(want).max()))
    assert_close(np.asarray(jnp.asarray(got, jnp.float32)) / scale, want / scale,
                 GRAD_TOL[dtype], 0, what)


def check_kernel_outputs(rng, c, dtype, with_rpb, kernel_outputs):
    """Run ``kernel_outputs(q, k, v, rpb, dout) -> dict`` (a backend's ``kernel_outputs``:
    results plus every kernel's raw output, whose buffers start as NaN) under ``jax.jit`` on
    inputs for case ``c``: no raw output may keep a NaN (an element no kernel wrote), and the
    output, lse and every gradient must match the float64 oracle."""
    (q, k, v, dout, _, rpb), (q64, k64, v64, do64, _, rpb64) = make_inputs(
        rng, c, dtype, with_rpb)
    res = jax.jit(kernel_outputs)(q, k, v, rpb, dout)
    for name, raw in res.items():
        if name.startswith("raw_"):
            assert not np.isnan(np.asarray(raw, np.float32)).any(), f"{name} not fully written"
    want, want_lse = oracle.na_forward(q64, k64, v64, rpb=rpb64, **oracle_kw(c))
    atol, rtol = FWD_TOL[dtype]
    assert res["out"].dtype == dtype and res["out"].shape == q.shape
    assert res["lse"].dtype == jnp.float32 and res["lse"].shape == q.shape[:-1]
    assert_close(res["out"], want, atol, rtol, "out")
    assert_close(res["lse"], want_lse, 4 * atol, rtol, "lse")
    grads = oracle.na_backward(q64, k64, v64, do64, rpb=rpb64, **oracle_kw(c))
    for name, w in zip(("dq", "dk", "dv", "drpb"), grads):
        if w is None:
            assert name not in res
            continue
        assert res[name].dtype == dtype and res[name].shape == w.shape
        assert_grad_close(res[name], w, dtype, name)


def check_public_op(c, inputs, inputs64, backend):
    """``kernels.na2d(..., backend=backend)`` under ``jax.jit(jax.grad(...))`` with cotangents
    on both the output and the lse: output and lse against the float64 oracle, the four
    gradients against the reference backend's autodiff (itself checked against the oracle)."""
    q, k, v, dout, dlse, rpb = inputs
    q64, k64, v64, _, _, rpb64 = inputs64

    def loss(q, k, v, rpb, backend):
        out, lse = kernels.na2d(q, k, v, c["kernel"], dilation=c["dilation"], rpb=rpb,
                                backend=backend, return_lse=True)
        return jnp.sum(out * dout) + jnp.sum(lse * dlse), (out, lse)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    grads, (out, lse) = jax.jit(grad, static_argnums=4)(q, k, v, rpb, backend)
    want, want_lse = oracle.na_forward(q64, k64, v64, rpb=rpb64, **oracle_kw(c))
    assert_close(out, want, *FWD_TOL[jnp.float32], "out")
    assert_close(lse, want_lse, 1e-4, 1e-5, "lse")
    ref_grads, _ = jax.jit(grad, static_argnums=4)(q, k, v, rpb, "reference")
    for name, g, w in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        assert_grad_close(g, np.asarray(w, np.float64), jnp.float32, name)


class TestPallasNA:
    INTERPRET = True

    def check_case(self, rng, c, dtype, with_rpb, blocks=None):
        p = make_params(c["shape"], c["head_dim"], c["kernel"], c["stride"], c["dilation"],
                        c["causal"])
        blocks = blocks or small_blocks(c)
        check_kernel_outputs(rng, c, dtype, with_rpb, lambda *a: pallas.kernel_outputs(
            *a[:3], p, a[3], a[4], block_sizes=blocks, interpret=self.INTERPRET, poison=True))

    @pytest.mark.parametrize("c,with_rpb", QUICK, ids=case_id)
    def test_quick(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.float32, with_rpb)

    @pytest.mark.parametrize("c,with_rpb", [QUICK[0], QUICK[3]], ids=case_id)
    def test_bf16(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.bfloat16, with_rpb)

    @pytest.mark.parametrize("c,with_rpb,blocks", [
        (na_cases.RPB[2], True, pallas.BlockSizes(q=(4, 8), kv=(8, 2), q_bwd=(2, 8),
                                                  kv_bwd=(8, 4))),
        pytest.param(na_cases.QUICK[7], False,
                     pallas.BlockSizes(q=(2, 4, 4), kv=(4, 2, 2), q_bwd=(4, 2, 2),
                                       kv_bwd=(1, 4, 8)), marks=pytest.mark.slow),
    ], ids=case_id)
    def test_unequal_tiles(self, rng, c, with_rpb, blocks):
        """Query and key tiles of different shapes, forward tiles unlike backward tiles."""
        self.check_case(rng, c, jnp.float32, with_rpb, blocks)

    @pytest.mark.slow
    @pytest.mark.parametrize("c,with_rpb", SLOW, ids=case_id)
    def test_sweep(self, rng, c, with_rpb):
        self.check_case(rng, c, jnp.float32, with_rpb)

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize("c,with_rpb", SLOW[::5], ids=case_id)
    def test_sweep_low_precision(self, rng, c, with_rpb, dtype):
        self.check_case(rng, c, dtype, with_rpb)

    @pytest.mark.slow
    @pytest.mark.parametrize("c", na_cases.all_causal(na_cases.case((11, 10), (5, 4),
                                                                    stride=(2, 1),
                                                                    dilation=(2, 2))),
                             ids=case_id)
    def test_causal_combos(self, rng, c):
        self.check_case(rng, c, jnp.float32, False)

    @pytest.mark.slow
    @pytest.mark.parametrize("head_dim", [24, 256])
    def test_head_dims(self, rng, head_dim):
        c = na_cases.case((9, 7), 3, dilation=(2, 1), heads=1, head_dim=head_dim)
        self.check_case(rng, c, jnp.float32, True)

    def test_default_blocks_and_api(self, rng):
        """The public op with backend="pallas": default tiles, custom_vjp and jax.grad, with
        cotangents on both the output and the lse, against the reference backend's autodiff
        (itself checked against the oracle); the dispatcher picks "pallas" only on GPU."""
        c = na_cases.case((12, 10), (5, 3), dilation=(2, 1), heads=2, head_dim=16)
        (q, k, v, dout, dlse, rpb), (q64, k64, v64, _, _, rpb64) = make_inputs(
            rng, c, jnp.float32, True)
        p = make_params(c["shape"], c["head_dim"], c["kernel"], dilation=c["dilation"])
        assert kernels.resolve_backend("auto", q, k, v, p, rpb) == (
            na_cases.auto_on_cpu() if self.INTERPRET else "pallas")

        check_public_op(c, (q, k, v, dout, dlse, rpb), (q64, k64, v64, None, None, rpb64),
                        "pallas")

    @pytest.mark.parametrize("c", [na_cases.QUICK[4], na_cases.QUICK[7]], ids=case_id)
    def test_matches_natten_flex(self, rng, c):
        import natten
        import torch

        (q, k, v, *_), _ = make_inputs(rng, c, jnp.float32, False)
        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(c["shape"])]
        t = [torch.from_numpy(np.asarray(x)) for x in (q, k, v)]
        want, want_lse = fn(*t, kernel_size=c["kernel"], stride=c["stride"],
                            dilation=c["dilation"], is_causal=c["causal"], scale=0.3,
                            backend="flex-fna", return_lse=True)
        p = make_params(c["shape"], c["head_dim"], c["kernel"], c["stride"], c["dilation"],
                        c["causal"], scale=0.3)
        out, lse = jax.jit(lambda q, k, v: pallas.na_fused(
            q, k, v, p, block_sizes=small_blocks(c), interpret=self.INTERPRET))(q, k, v)
        assert_close(out, want.numpy(), 2e-5, 1e-5, "out")
        assert_close(lse, want_lse.numpy(), 5e-5, 1e-5, "lse")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiled Triton kernels need a GPU (run with JAX_PLATFORMS=cuda)")
class TestPallasNAGPU(TestPallasNA):
    """The same grid, compiled for the GPU instead of interpreted."""

    INTERPRET = False


# ------------------------------------------------------------------- tiling and block sizes


@pytest.mark.parametrize("length,kernel,stride,dilation,causal", [
    (13, 4, 2, 3, True), (40, 7, 1, 1, False), (33, 8, 3, 2, False), (17, 17, 5, 1, True),
    (64, 33, 1, 1, False), (50, 20, 4, 1, True)])
@pytest.mark.parametrize("q_tile,kv_tile", [(1, 1), (4, 2), (8, 16)])
def test_tile_boxes_cover_every_window(length, kernel, stride, dilation, causal, q_tile, kv_tile):
    """Clamped boxes (forward) and inverse boxes (dK/dV) contain every (query, key) pair of the
    exact mask, the inverse box is tight, and "tile pair needs no mask" is exact."""
    rows = -(-length // dilation)
    ext = windows.tile_box_extent(length, kernel, stride, dilation, causal, q_tile, kv_tile)
    iext = windows.inverse_tile_box_extent(length, kernel, stride, dilation, causal, q_tile,
                                           kv_tile)
    nqt, nkt = -(-rows // q_tile), -(-rows // kv_tile)
    for g in range(dilation):
        glen = windows.group_length(length, dilation, g)
        qc, kc = np.arange(nqt * q_tile), np.arange(nkt * kv_tile)
        mask = windows.in_window(qc[:, None], kc[None, :], glen, kernel, stride, causal)
        mask &= qc[:, None] < glen
        for t in range(nqt):
            lo = windows.clamp_box(windows.tile_box(t, q_tile, kv_tile, glen, kernel, stride,
                                                    causal)[0], ext, nkt)
            need = np.nonzero(mask[t * q_tile:(t + 1) * q_tile].any(0))[0] // kv_tile
            assert need.size == 0 or (need.min() >= lo and need.max() < lo + ext)
            for j in range(nkt):
                # The unmasked fast path is taken exactly when the whole block is inside.
                block = windows.in_window(qc[t * q_tile:(t + 1) * q_tile, None],
                                          kc[None, j * kv_tile:(j + 1) * kv_tile], glen, kernel,
                                          stride, causal)
                inside = windows.tile_inside_windows(t * q_tile, t * q_tile + q_tile - 1,
                                                     j * kv_tile, j * kv_tile + kv_tile, glen,
                                                     kernel, stride, causal)
                assert bool(inside) == bool(block.all())
        for j in range(nkt):
            lo, hi = windows.inverse_tile_box(j, kv_tile, q_tile, glen, rows, kernel, stride,
                                              causal)
            need = np.nonzero(mask[:, j * kv_tile:(j + 1) * kv_tile].any(1))[0] // q_tile
            if need.size:
                assert (need.min(), need.max() + 1) == (lo, hi)
                lo = windows.clamp_box(lo, iext, nqt)
                assert need.min() >= lo and need.max() < lo + iext


def test_window_index_math_stays_int32():
    """The window arithmetic the kernels evaluate on traced int32 scalars never produces a
    weakly typed integer. Pallas's Triton lowering types a weak literal in a select from the
    predicate (``arith.select (i1, i1, i32)``), which XLA's Triton refuses to parse: every
    dK/dV kernel failed to compile that way."""
    def index_math(tile, group):
        glen = windows.group_length(37, 3, group, xp=jnp)
        return (*windows.tile_box(tile, 4, 8, glen, 7, 2, False, xp=jnp),
                *windows.inverse_tile_box(tile, 8, 4, glen, 13, 6, 3, True, xp=jnp),
                *windows.query_span(tile, tile + 3, glen, 13, 5, 1, False, xp=jnp),
                *windows.offset_range(tile, tile + 3, glen, 7, False, xp=jnp),
                windows.tile_inside_windows(tile, tile + 3, tile, tile + 8, glen, 7, 1, False,
                                            xp=jnp),
                windows.clamp_box(tile, 3, 5, xp=jnp))

    def weak_ints(jaxpr):
        """Weak integers a primitive produces, or a select takes (literals included)."""
        for e in jaxpr.eqns:
            operands = e.invars if e.primitive.name == "select_n" else []
            for v in (*operands, *e.outvars):
                if jnp.issubdtype(v.aval.dtype, jnp.integer) and v.aval.weak_type:
                    yield e.primitive.name, v.aval
            for param in e.params.values():  # jnp functions trace to nested jit calls
                if hasattr(param, "eqns") or hasattr(param, "jaxpr"):
                    yield from weak_ints(getattr(param, "jaxpr", param))

    closed = jax.make_jaxpr(index_math)(jnp.int32(1), jnp.int32(2))
    assert not list(weak_ints(closed.jaxpr))


def test_block_sizes_validation_and_defaults():
    b = pallas.BlockSizes.get_default((56, 56), (7, 7), (1, 1), 64, jnp.bfloat16)
    assert b.q == (8, 8) and b.rank == 2 and hash(b) == hash(pallas.BlockSizes(**{
        f.name: getattr(b, f.name) for f in dataclasses.fields(b)}))
    wide = pallas.BlockSizes.get_default((3, 100), (3, 7), (1, 1), 256, jnp.bfloat16)
    assert wide.q == (1, 64) and wide.kv == (1, 32) and wide.q_bwd == (1, 16)
    assert wide.num_warps == 8
    tiny = pallas.BlockSizes.get_default((5,), (3,), (2,), 16, jnp.bfloat16)
    assert tiny.q == (64,) and tiny.num_warps == 4  # tiny map: padded rows
    # float32 (exact FMA dots) takes smaller tiles; a padded head_dim of 256 has none.
    f32 = pallas.BlockSizes.get_default((56, 56), (7, 7), (1, 1), 128, jnp.float32)
    assert f32.q == (4, 8) and f32.kv_bwd == (4, 4)
    assert (f32.num_warps, f32.num_warps_dkv) == (4, 8)  # dK/dV holds the most state
    with pytest.raises(ValueError, match="head_dim=200 with float32"):
        pallas.BlockSizes.get_default((56, 56), (7, 7), (1, 1), 200, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        pallas.BlockSizes(q=(6, 8), kv=(8, 8), q_bwd=(4, 4), kv_bwd=(4, 4))
    with pytest.raises(ValueError, match="at least 16"):
        pallas.BlockSizes(q=(2, 4), kv=(8, 8), q_bwd=(4, 4), kv_bwd=(4, 4))
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        pallas.BlockSizes(q=(16,), kv=(8, 8), q_bwd=(4, 4), kv_bwd=(4, 4))


def test_autotune_on_cpu_returns_defaults_and_caches(tmp_path):
    q = jnp.zeros((1, 20, 20, 2, 32), jnp.float32)
    p = make_params((20, 20), 32, 5)
    best = autotune.tune(q, q, q, p, cache_file=tmp_path / "blocks.json")
    assert best == pallas.BlockSizes.get_default((20, 20), (5, 5), (1, 1), 32)
    entry = {autotune.shape_key(q, q, p): pallas.BlockSizes(q=(4, 8), kv=(8, 8), q_bwd=(4, 4),
                                                            kv_bwd=(4, 4))}
    autotune.save(tmp_path / "blocks.json", entry)
    assert autotune.load(tmp_path / "blocks.json") == entry
    assert len(autotune.candidates(q, q, p)) >= 3


def test_autotune_picks_fastest_and_dispatch_uses_it(monkeypatch, tmp_path):
    """The GPU path of tune() with fake timings: fastest candidate wins, failures are skipped,
    the choice is cached in memory and in the JSON file, and na_fused picks it up."""
    q = jnp.zeros((1, 20, 20, 2, 32), jnp.float32)
    p = make_params((20, 20), 32, 5)
    cands = autotune.candidates(q, q, p)
    fake = {b: 1.0 + i for i, b in enumerate(cands)}
    fake[cands[2]] = 0.5

    def measure(blocks, *args):
        if blocks == cands[1]:
            raise RuntimeError("out of shared memory")
        return fake[blocks]

    monkeypatch.setattr(autotune, "_measure", measure)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    used = []
    na_fused = pallas.na_fused
    monkeypatch.setattr(pallas, "na_fused", lambda *a, block_sizes, **kw: (
        used.append(block_sizes), na_fused(*a, block_sizes=block_sizes, **kw))[1])
    autotune.clear()
    try:
        assert autotune.tune(q, q, q, p, cache_file=tmp_path / "c.json") == cands[2]
        assert autotune.cached_block_sizes(q, q, p) == cands[2]
        kernels.na2d(q, q, q, 5, backend="pallas")
        assert used == [cands[2]]
        autotune.clear()
        monkeypatch.setattr(autotune, "_measure", None)  # must not time again: file hit
        assert autotune.tune(q, q, q, p, cache_file=tmp_path / "c.json") == cands[2]
    finally:
        autotune.clear()


def test_auto_picks_pallas_only_for_cuda_and_supported_calls():
    """backend="auto" picks the Triton kernels only where the program is lowered for CUDA and only for
    arguments the kernels support; naming "pallas" for an unsupported call says why."""
    q = jnp.zeros((2, 16, 16, 4, 64), jnp.bfloat16)
    p = make_params((16, 16), 64, 5)
    assert pallas.unsupported(q, q, p, None) is None
    assert kernels.resolve_backend("auto", q, q, q, p, None, platform="cuda") == "pallas"
    assert kernels.resolve_backend("auto", q, q, q, p, None, platform="gpu") == "pallas"
    assert kernels.resolve_backend("auto", q, q, q, p, None, platform="cpu") == \
        na_cases.auto_on_cpu()
    # TPUs get their own kernels (pallas_tpu), never the Triton ones.
    assert kernels.resolve_backend("auto", q, q, q, p, None, platform="tpu") == "pallas_tpu"
    big = jnp.zeros((1, 16, 16, 1, 512), jnp.bfloat16)
    assert "head_dim" in pallas.unsupported(big, big, p, None)
    assert kernels.resolve_backend("auto", big, big, big, p, None, platform="cuda") == "xla"
    ints = jax.ShapeDtypeStruct((1, 16, 16, 1, 32), jnp.int8)
    assert "dtype" in pallas.unsupported(ints, ints, p, None)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.na2d(big, big, big, 5, backend="pallas")


@pytest.mark.slow
def test_autotune_measure_runs(rng):
    """The timing closure itself (forward + all four gradients), here in interpret mode."""
    c = na_cases.case((10, 9), 3, heads=1, head_dim=16)
    (q, k, v, _, _, rpb), _ = make_inputs(rng, c, jnp.float32, True)
    p = make_params(c["shape"], 16, 3)
    blocks = small_blocks(c)
    assert autotune._measure(blocks, q, k, v, p, rpb, True, repeats=1) > 0  # noqa: SLF001


def test_poison_detects_unwritten_outputs(rng, monkeypatch):
    """The NaN poisoning is not vacuous: rows a kernel never writes stay NaN."""

    def lazy_kernel(*refs, plan):
        o_ref, lse_ref = refs[-2:]
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        lse_ref[:8] = jnp.zeros((8,), jnp.float32)  # the other rows are never written

    monkeypatch.setattr(pallas, "_fwd_kernel", lazy_kernel)
    c = na_cases.case((10,), 3, heads=1)
    (q, k, v, *_), _ = make_inputs(rng, c, jnp.float32, False)
    p = make_params(c["shape"], 16, 3)
    _, _, (out_t, lse_t) = pallas._forward(q, k, v, None, p, small_blocks(c), True,  # noqa: SLF001
                                           poison=True)
    assert not np.isnan(np.asarray(out_t)).any()
    assert np.isnan(np.asarray(lse_t)).any() and not np.isnan(np.asarray(lse_t)[..., :8]).any()


@pytest.mark.slow
def test_value_head_dim_differs(rng):
    """head_dim_v != head_dim (padded separately): against the reference backend's autodiff
    (the float64 oracle assumes one head_dim)."""
    from nat_jax.kernels import reference

    q, k = (jnp.asarray(rng.standard_normal((2, 9, 7, 2, 24)), jnp.float32) for _ in range(2))
    v, dout = (jnp.asarray(rng.standard_normal((2, 9, 7, 2, 40)), jnp.float32) for _ in range(2))
    rpb = jnp.asarray(rng.standard_normal((2, 5, 5)), jnp.float32)
    p = make_params((9, 7), 24, 3, dilation=(2, 1))
    res = pallas.kernel_outputs(q, k, v, p, rpb, dout, block_sizes=small_blocks(
        na_cases.case((9, 7), 3, dilation=(2, 1))))
    (out, lse), vjp = jax.vjp(lambda *a: reference.na_fused(*a[:3], p, a[3]), q, k, v, rpb)
    assert_close(res["out"], np.asarray(out, np.float64), *FWD_TOL[jnp.float32], "out")
    assert_close(res["lse"], np.asarray(lse, np.float64), 1e-4, 1e-5, "lse")
    for name, w in zip(("dq", "dk", "dv", "drpb"), vjp((dout, jnp.zeros_like(lse)))):
        assert not np.isnan(np.asarray(res["raw_" + name])).any()
        assert_grad_close(res[name], np.asarray(w, np.float64), jnp.float32, name)
