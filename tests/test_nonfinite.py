"""Non-finite values stay inside their neighborhoods, forward and backward, on every backend.

NaN, +Inf and -Inf are planted in one tensor at a time (query, key, value, RPB or the output
cotangent), each in a different token and channel. Every output element (out, lse, dq, dk, dv,
drpb) must then be what a per-pair computation gives, i.e. the float64 oracle, which only ever
touches the keys inside each query's window:

* finite exactly where the oracle is finite;
* elements the planted values do not reach (finite in the oracle and equal to the oracle on the
  clean inputs) are *bitwise* what the same backend gives on the clean inputs (the planted
  values replaced by the original finite ones);
* elements they reach that stay finite (e.g. a key whose logit becomes ``-inf`` simply drops
  out of the softmax) match the oracle to the usual tolerance.

Dense in-tile matmuls multiply masked probabilities (exact zeros) by values outside the window,
and ``0 * nan = nan``: without containment one NaN poisons every query of a tile's halo.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import na_cases
import oracle
from nat_jax import kernels

# The one list of backends under test; other backends join by adding their name here.
BACKENDS = ["reference", "xla", "cpu", "pallas", "pallas_tpu"]

CASES = [
    (na_cases.case((16,), 5, head_dim=8), True),
    (na_cases.case((13,), 4, stride=2, dilation=2, causal=True, head_dim=8), False),
    (na_cases.case((12, 11), 3, dilation=(2, 1), head_dim=8), True),
    (na_cases.case((11, 10), 7, head_dim=8), True),
    (na_cases.case((10, 9), (3, 5), stride=(1, 2), causal=(True, False), head_dim=8), False),
    (na_cases.case((6, 5, 7), 3, dilation=(1, 1, 2), head_dim=8), True),
    (na_cases.case((5, 6, 5), (3, 2, 3), causal=(False, True, True), head_dim=8), False),
]
TARGETS = ["q", "k", "v", "rpb", "dout"]
# Tolerance for the elements the planted values reach but leave finite.
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 6e-2}


def _params():
    out = []
    for i, (c, with_rpb) in enumerate(CASES):
        for target in TARGETS:
            if target == "rpb" and not with_rpb:
                continue
            for dtype in (jnp.float32, jnp.bfloat16):
                # bf16 on a subset: it compiles separately and adds little beyond fp32.
                if dtype == jnp.bfloat16 and target not in ("v", "dout"):
                    continue
                for backend in BACKENDS:
                    # The Pallas kernels run in interpret mode here (minutes for the grid):
                    # the default tier takes the 1-D and 2-D RPB cases in float32 (pallas_tpu,
                    # slower to interpret, the 2-D one).
                    default = (0, 2) if backend == "pallas" else (2,)
                    slow = backend.startswith("pallas") and (i not in default
                                                             or dtype != jnp.float32)
                    out.append(pytest.param(
                        c, with_rpb, target, dtype, backend,
                        marks=pytest.mark.slow if slow else (),
                        id=f"{na_cases.case_id(c)}-{target}-{jnp.dtype(dtype).name}-{backend}"))
    return out


@functools.lru_cache(maxsize=None)
def _runner(backend: str, case_items: tuple, dtype_name: str):
    """Jitted ``(q, k, v, rpb, dout) -> (out, lse, (dq, dk, dv, drpb))`` for one case (given as
    its sorted items, so it can key the cache)."""
    c = dict(case_items)

    def run(q, k, v, rpb, dout):
        def fwd(q, k, v, rpb):
            return kernels.neighborhood_attention(q, k, v, c["kernel"], c["stride"],
                                                  c["dilation"], c["causal"], rpb=rpb,
                                                  backend=backend, return_lse=True,
                                                  is_periodic=c["periodic"])

        (out, lse), vjp = jax.vjp(fwd, q, k, v, rpb)
        return out, lse, vjp((dout, jnp.zeros_like(lse)))

    return jax.jit(run)


def _plant(rng, x: np.ndarray, rpb_like: bool) -> np.ndarray:
    """NaN, +Inf, -Inf at three distinct positions: different tokens and channels of
    ``[B, *spatial, heads, dim]``, or any three entries of an RPB table."""
    x = x.copy()
    if rpb_like:
        flat = rng.choice(x.size, size=3, replace=False)
        places = [np.unravel_index(i, x.shape) for i in flat]
    else:
        tokens = rng.choice(int(np.prod(x.shape[:-1])), size=3, replace=False)
        places = [np.unravel_index(t, x.shape[:-1]) + (ch % x.shape[-1],)
                  for t, ch in zip(tokens, (0, 1, 2))]
    for value, idx in zip((np.nan, np.inf, -np.inf), places):
        x[idx] = value
    return x


def _oracle(c, q, k, v, rpb, dout):
    args = dict(kernel=c["kernel"], stride=c["stride"], dilation=c["dilation"],
                causal=c["causal"], rpb=rpb, periodic=c["periodic"])
    with np.errstate(all="ignore"):
        out, lse = oracle.na_forward(q, k, v, **args)
        grads = oracle.na_backward(q, k, v, dout, **args)
    return (out, lse, *grads)


@pytest.mark.parametrize("c,with_rpb,target,dtype,backend", _params())
def test_nonfinite_stays_in_its_neighborhoods(c, with_rpb, target, dtype, backend):
    check_contained(c, with_rpb, target, dtype, backend)


def check_contained(c, with_rpb, target, dtype, backend):
    """The containment contract (module docstring) for one case, planted tensor and backend;
    also used by the grouped-query / periodic tests (``test_na_features.py``)."""
    rng = np.random.default_rng(zlib.crc32(f"{na_cases.case_id(c)}-{target}".encode()))
    shape = (c["batch"], *c["shape"], c["heads"], c["head_dim"])
    kv_shape = shape[:-2] + (c["heads_kv"], c["head_dim"])
    clean = {name: rng.standard_normal(kv_shape if name in ("k", "v") else shape)
             .astype(np.float32) for name in ("q", "k", "v", "dout")}
    clean["rpb"] = (rng.standard_normal((c["heads"], *(2 * x - 1 for x in c["kernel"])))
                    .astype(np.float32) if with_rpb else None)
    # Everything, the oracle included, sees the values rounded to the test dtype.
    clean = {n: None if x is None else np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
             for n, x in clean.items()}
    bad = dict(clean)
    bad[target] = _plant(rng, clean[target], target == "rpb")

    run = _runner(backend, tuple(sorted(c.items())), jnp.dtype(dtype).name)

    def call(inputs):
        args = [None if inputs[n] is None else jnp.asarray(inputs[n], dtype)
                for n in ("q", "k", "v", "rpb", "dout")]
        out, lse, grads = run(*args)
        return [None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                for x in (out, lse, *grads)]

    got_bad, got_clean = call(bad), call(clean)
    f64 = {n: None if x is None else np.asarray(x, np.float64) for n, x in bad.items()}
    c64 = {n: None if x is None else np.asarray(x, np.float64) for n, x in clean.items()}
    want_bad = _oracle(c, f64["q"], f64["k"], f64["v"], f64["rpb"], f64["dout"])
    want_clean = _oracle(c, c64["q"], c64["k"], c64["v"], c64["rpb"], c64["dout"])

    reached_any = False
    for name, g_bad, g_clean, w_bad, w_clean in zip(("out", "lse", "dq", "dk", "dv", "drpb"),
                                                    got_bad, got_clean, want_bad, want_clean):
        if w_bad is None:
            assert g_bad is None
            continue
        finite = np.isfinite(w_bad)
        bad_elems = np.argwhere(np.isfinite(g_bad) != finite)
        assert not bad_elems.size, (
            f"{name}: finite where the oracle is not, or the reverse, at {bad_elems[:8].tolist()}"
            f" ({len(bad_elems)} elements; oracle non-finite at {int((~finite).sum())})")
        untouched = finite & (w_bad == w_clean)
        reached_any |= not untouched.all()
        diff = np.argwhere(untouched & (g_bad != g_clean))
        assert not diff.size, (f"{name}: elements the planted values do not reach changed at "
                               f"{diff[:8].tolist()} ({len(diff)} elements)")
        reached = finite & ~untouched
        scale = max(1.0, float(np.abs(np.where(finite, w_bad, 0)).max()))
        np.testing.assert_allclose(np.where(reached, g_bad, 0) / scale,
                                   np.where(reached, w_bad, 0) / scale, atol=TOL[dtype],
                                   rtol=0, err_msg=name)
    assert reached_any, "the planted values reached nothing: the test tests nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nan_value_poisons_exactly_its_window(backend):
    """The reported case: one NaN in one value token of a 56x56 map, K=7, poisons exactly the
    49 queries whose windows hold it (in that channel), and nothing else."""
    shape = (1, 56, 56, 1, 4)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    v[0, 20, 30, 0, 1] = np.nan
    out = kernels.na2d(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 7, backend=backend)
    bad = ~np.isfinite(np.asarray(out))
    assert bad.sum() == 49 and bad[..., 1].sum() == 49
    rows, cols = np.nonzero(bad[0, :, :, 0, 1])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (17, 23, 27, 33)
