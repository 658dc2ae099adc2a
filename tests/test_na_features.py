"""Grouped-query attention and periodic axes on the reference and xla backends.

Both features are checked against the float64 oracle (``oracle.py``, which implements them from
their stated rules), forward (output and lse) and backward (dq, dk, dv, drpb), in 1-D/2-D/3-D
with odd and even kernels, dilation (also not dividing the length), stride, causal on another
axis and RPB; the unfused ``na*_qk`` / ``na*_av`` pieces too. Independent cross-checks: natten's
flex backend (grouped-query attention, no RPB, no periodic axes), and periodic NA equalling
plain NA on a circularly padded map. Also: xla never repeats key/value per query head, kernel
backends without the features are skipped by ``auto`` and refuse by name, bad arguments raise,
and non-finite values stay inside their (wrapped) windows.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import na_cases
import oracle
from nat_jax import kernels
from nat_jax.kernels import ops, windows
from test_na_ops import FWD_TOL, GRAD_TOL, assert_close, natten_flex
from test_nonfinite import check_contained

BACKENDS = ["reference", "xla", "cpu"]
case = na_cases.case

GQA = [
    case((12,), 5, heads=4, heads_kv=2),
    case((13,), 4, stride=2, dilation=3, causal=True, heads=6, heads_kv=3),
    case((9, 11), (3, 5), dilation=(2, 1), heads=4, heads_kv=1),  # multi-query
    case((7, 6, 5), (3, 2, 3), stride=(1, 2, 3), dilation=(2, 1, 1), causal=(False, True, True),
         heads=4, heads_kv=2),
]
PERIODIC = [
    case((10,), 3, periodic=True),
    case((11,), 4, dilation=2, periodic=True),  # groups of 6 and 5 tokens, even kernel
    case((13,), 5, stride=2, dilation=2, periodic=True),
    case((9, 10), (3, 4), stride=(2, 1), dilation=(2, 1), causal=(False, True),
         periodic=(True, False)),
    case((8, 7), (8, 7), periodic=True),  # kernel == size: every key once, centred slots
    case((11, 9), (5, 3), dilation=(2, 3), periodic=(False, True)),
    case((6, 5, 7), (3, 2, 3), stride=(1, 2, 1), dilation=(1, 1, 2), causal=(False, True, False),
         periodic=(True, False, True)),
]
BOTH = [
    case((10, 9), (4, 3), stride=(2, 3), causal=(False, True), periodic=(True, False), heads=4,
         heads_kv=2),
    case((5, 6, 7), (2, 3, 3), dilation=(2, 1, 2), periodic=True, heads=3, heads_kv=1),
]
# Odd kernels, stride 1, non-causal: the RPB cases.
RPB = [
    case((9,), 3, dilation=2, periodic=True, heads=4, heads_kv=2),
    case((12, 11), (5, 3), dilation=(1, 2), periodic=(True, False), heads=2, heads_kv=1),
    case((9, 10), (3, 5), dilation=(2, 1), periodic=True, heads=6, heads_kv=2),
    case((6, 7, 5), 3, dilation=(2, 1, 1), periodic=(True, True, False), heads=2),
]


def make_inputs(rng, c, dtype=jnp.float32, with_rpb=False):
    """Backend inputs ``(q, k, v, rpb)`` in ``dtype`` and the same (rounded) values in float64."""
    shape = (c["batch"], *c["shape"], c["heads"], c["head_dim"])
    kv = shape[:-2] + (c["heads_kv"], c["head_dim"])
    xs = [rng.standard_normal(s).astype(np.float32) for s in (shape, kv, kv)]
    xs.append(rng.standard_normal((c["heads"], *(2 * x - 1 for x in c["kernel"])))
              .astype(np.float32) if with_rpb else None)
    got = [None if x is None else jnp.asarray(x, dtype) for x in xs]
    return got, [None if x is None else np.asarray(x, np.float64) for x in got]


def fused(c, backend, **kw):
    return functools.partial(kernels.neighborhood_attention, kernel_size=c["kernel"],
                             stride=c["stride"], dilation=c["dilation"], is_causal=c["causal"],
                             is_periodic=c["periodic"], backend=backend, **kw)


def oracle_args(c):
    return dict(kernel=c["kernel"], stride=c["stride"], dilation=c["dilation"],
                causal=c["causal"], periodic=c["periodic"])


def check_against_oracle(rng, c, backend, dtype=jnp.float32, with_rpb=False):
    """Output, lse and every gradient (one vjp) against the float64 oracle."""
    (q, k, v, rpb), (q64, k64, v64, rpb64) = make_inputs(rng, c, dtype, with_rpb)
    dout = jnp.asarray(rng.standard_normal(q.shape), dtype)
    fn = fused(c, backend, return_lse=True)
    (out, lse), vjp = jax.vjp(lambda q, k, v, r: fn(q, k, v, rpb=r), q, k, v, rpb)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:-1]
    want, want_lse = oracle.na_forward(q64, k64, v64, rpb=rpb64, **oracle_args(c))
    atol, rtol = FWD_TOL[dtype]
    assert_close(out, want, atol, rtol, "out")
    assert_close(lse, want_lse, atol * 4, rtol, "lse")
    grads = vjp((dout, jnp.zeros_like(lse)))
    wants = oracle.na_backward(q64, k64, v64, np.asarray(dout, np.float64), rpb=rpb64,
                               **oracle_args(c))
    for name, g, w in zip("q k v rpb".split(), grads, wants):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == w.shape, name
        scale = max(1.0, float(np.abs(w).max()))
        assert_close(np.asarray(jnp.asarray(g, jnp.float32)) / scale, w / scale,
                     GRAD_TOL[dtype], 0, f"d{name}")


# ---------------------------------------------------------------------------- the oracle grid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", GQA + PERIODIC + BOTH, ids=na_cases.case_id)
def test_forward_backward(rng, c, backend):
    check_against_oracle(rng, c, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", RPB, ids=na_cases.case_id)
def test_forward_backward_rpb(rng, c, backend):
    check_against_oracle(rng, c, backend, with_rpb=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,with_rpb,dtype", [
    pytest.param(RPB[2], True, jnp.bfloat16, id="rpb-gqa-periodic-bf16"),
    pytest.param(BOTH[0], False, jnp.float16, id="gqa-periodic-stride-causal-fp16"),
    pytest.param(RPB[2], True, jnp.float16, id="rpb-gqa-periodic-fp16", marks=pytest.mark.slow),
    pytest.param(BOTH[0], False, jnp.bfloat16, id="gqa-periodic-stride-causal-bf16",
                 marks=pytest.mark.slow),
])
def test_low_precision(rng, c, with_rpb, dtype, backend):
    check_against_oracle(rng, c, backend, dtype, with_rpb)


def _random_cases(seed: int, count: int, rank: int) -> list[dict]:
    """The NATTEN-style sweep with random key/value heads and periodic axes (kernel capped at
    the shortest dilation group; no axis both causal and periodic)."""
    r = np.random.default_rng(seed)
    out = []
    for c in na_cases.random_cases(seed, count, rank):
        periodic = tuple(bool(r.integers(2)) and not causal and k <= n // d for n, k, d, causal
                         in zip(c["shape"], c["kernel"], c["dilation"], c["causal"]))
        heads_kv = int(r.integers(1, 3))
        out.append(dict(c, heads=heads_kv * int(r.integers(1, 4)), heads_kv=heads_kv,
                        periodic=periodic))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("c", _random_cases(10, 6, 1) + _random_cases(11, 8, 2)
                         + _random_cases(12, 4, 3), ids=na_cases.case_id)
def test_random_sweep(rng, c):
    check_against_oracle(rng, c, "xla")


# ---------------------------------------------------------------------------- window rules


def test_periodic_windows_worked_examples():
    """The documented rules, by hand: centred, wrapped within each dilation group (groups of
    different lengths wrap on their own), even kernels one key short on the right, stride
    leaders, RPB columns at the wrapped offset (only the centre K of 2K-1 used)."""
    idx, valid = windows.neighbor_indices(7, 3, 1, 1, False, True)
    assert valid.all()
    assert idx.tolist() == [[6, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6],
                            [5, 6, 0]]
    # L=7, d=2: group 0 = tokens 0,2,4,6 (4 rows), group 1 = tokens 1,3,5 (3 rows).
    idx, _ = windows.neighbor_indices(7, 3, 1, 2, False, True)
    assert idx[0].tolist() == [6, 0, 2] and idx[1].tolist() == [5, 1, 3]
    assert idx[5].tolist() == [3, 5, 1] and idx[6].tolist() == [4, 6, 0]
    idx, _ = windows.neighbor_indices(6, 4, 1, 1, False, True)  # even: 2 before, 1 after
    assert idx[0].tolist() == [4, 5, 0, 1] and idx[5].tolist() == [3, 4, 5, 0]
    idx, _ = windows.neighbor_indices(7, 3, 2, 1, False, True)  # stride 2: leaders 1, 3, 5, 6
    assert idx[:2].tolist() == [[0, 1, 2]] * 2 and idx[6].tolist() == [5, 6, 0]
    assert windows.rpb_indices(7, 3, 2, True).tolist() == [[1, 2, 3]] * 7


def test_periodic_equals_na_on_wrapped_padding(rng):
    """Away from the borders NA windows are centred, so periodic NA is plain NA on the map
    padded circularly by K//2 before and K//2 - 1 + K%2 after (the dilation dividing the
    length, groups wrap like the map), cropped back; RPB columns agree too."""
    shape, kernel, dilation = (8, 9), (3, 4), (2, 1)
    (q, k, v, _), _ = make_inputs(rng, case(shape, kernel, heads=4, heads_kv=2))
    pad = [(0, 0)] + [(d * (kk // 2), d * (kk // 2 - 1 + kk % 2))
                      for kk, d in zip(kernel, dilation)] + [(0, 0), (0, 0)]
    wrap = functools.partial(jnp.pad, pad_width=pad, mode="wrap")
    crop = (slice(None), *(slice(a, a + n) for (a, _), n in zip(pad[1:3], shape)))
    for backend in BACKENDS:
        got = kernels.na2d(q, k, v, kernel, dilation=dilation, is_periodic=True, backend=backend)
        want = kernels.na2d(wrap(q), wrap(k), wrap(v), kernel, dilation=dilation,
                            backend=backend)[crop]
        assert_close(got, np.asarray(want, np.float64), 2e-6, 1e-6, backend)
    rpb = jnp.asarray(rng.standard_normal((4, 5, 5)), jnp.float32)
    got = kernels.na2d(q, k, v, 3, dilation=(2, 1), is_periodic=True, rpb=rpb, backend="xla")
    pad = [(0, 0), (2, 2), (1, 1), (0, 0), (0, 0)]
    crop = (slice(None), slice(2, 10), slice(1, 10))
    want = kernels.na2d(*(jnp.pad(x, pad, mode="wrap") for x in (q, k, v)), 3, dilation=(2, 1),
                        rpb=rpb, backend="xla")[crop]
    assert_close(got, np.asarray(want, np.float64), 2e-6, 1e-6, "rpb")


def test_gqa_equals_repeated_kv(rng):
    """Grouped-query attention is attention with key/value repeated per query head (query head
    ``i`` -> key/value head ``i // group``); gradients of the shared heads sum over the group."""
    c = case((13,), 4, dilation=2, periodic=True, heads=6, heads_kv=2)
    (q, k, v, _), _ = make_inputs(rng, c)
    fn = fused(c, "xla")

    def loss(q, k, v, repeat):
        if repeat:
            k, v = (jnp.repeat(x, 3, axis=-2) for x in (k, v))
        return jnp.sum(jnp.sin(fn(q, k, v)))

    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, False)
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, True)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, np.asarray(w, np.float64), 1e-5, 1e-5, f"d{name}")


# ---------------------------------------------------------------------------- natten


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", GQA[1:3] + [pytest.param(c, marks=pytest.mark.slow)
                                          for c in GQA[::3]], ids=na_cases.case_id)
def test_gqa_matches_natten_flex(rng, c, backend):
    """natten 0.21.7's flex backend has grouped-query attention natively (no periodic axes)."""
    (q, k, v, _), _ = make_inputs(rng, c)
    want, want_lse = natten_flex(c, q, k, v)
    out, lse = fused(c, backend, return_lse=True)(q, k, v)
    assert_close(out, want, 2e-5, 1e-5, "out")
    assert_close(lse, want_lse, 5e-5, 1e-5, "lse")


# ---------------------------------------------------------------------------- unfused pieces


def _pieces(c, backend):
    rank = len(c["shape"])
    kw = dict(stride=c["stride"], dilation=c["dilation"], is_causal=c["causal"],
              is_periodic=c["periodic"], backend=backend)
    qk = functools.partial(getattr(kernels, f"na{rank}d_qk"), kernel_size=c["kernel"], **kw)
    av = functools.partial(getattr(kernels, f"na{rank}d_av"), kernel_size=c["kernel"], **kw)
    return qk, av


# The cpu backend has no unfused pieces of its own: it would run the xla ones again (its
# fallback warning is tested in test_na_ops.py).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
@pytest.mark.parametrize("c,with_rpb", [(RPB[2], True), (BOTH[0], False), (PERIODIC[1], False),
                                        (GQA[3], False)],
                         ids=lambda x: na_cases.case_id(x) if isinstance(x, dict) else str(x))
def test_qk_av_pieces(rng, c, with_rpb, backend):
    """Logits (slot ``j`` = the key at offset ``j - K//2`` on periodic axes) and the weighted
    sum, with fewer key heads for qk and fewer value heads for av, against the oracle; together
    they are the fused op."""
    (q, k, v, rpb), (q64, k64, v64, rpb64) = make_inputs(rng, c, with_rpb=with_rpb)
    qk, av = _pieces(c, backend)
    logits = qk(q, k, rpb=rpb)
    args = dict(kernel=c["kernel"], dilation=c["dilation"], causal=c["causal"],
                stride=c["stride"], periodic=c["periodic"])
    want = oracle.na_qk(q64, k64, rpb=rpb64, **args)
    assert logits.shape == (*q.shape[:-1], int(np.prod(c["kernel"])))
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(np.asarray(logits)), finite)
    assert_close(np.where(finite, logits, 0), np.where(finite, want, 0), 2e-5, 1e-5, "logits")
    weights = jax.nn.softmax(logits, axis=-1)
    out = av(weights, v)
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    assert_close(out, oracle.na_av(np.asarray(weights, np.float64), v64, **args), 2e-5, 1e-5,
                 "av")
    assert_close(out, np.asarray(fused(c, "xla")(q, k, v, rpb=rpb), np.float64), 2e-5, 1e-5,
                 "fused")


def test_qk_av_gradients(rng):
    """Autodiff of ``na_av(softmax(na_qk))`` on the tiled xla pieces with both features is the
    oracle's NA gradient, for q, k, v (summed over each group) and rpb."""
    c = RPB[2]
    (q, k, v, rpb), (q64, k64, v64, rpb64) = make_inputs(rng, c, with_rpb=True)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    qk, av = _pieces(c, "xla")

    def loss(q, k, v, rpb):
        return jnp.sum(av(jax.nn.softmax(qk(q, k, rpb=rpb), -1), v) * dout)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, rpb)
    want = oracle.na_backward(q64, k64, v64, np.asarray(dout, np.float64), rpb=rpb64,
                              **oracle_args(c))
    for name, g, w in zip("q k v rpb".split(), grads, want):
        assert_close(g, w, 2e-5, 1e-5, f"d{name}")


# ---------------------------------------------------------------------------- memory


def test_xla_gqa_does_not_repeat_kv():
    """Query heads sharing a key/value head are folded into the tile rows: the compiled
    temporaries of multi-query attention (8 query heads, 1 key/value head) stay well below
    those of repeating key/value 8x first, forward and forward+backward (measured 0.29x and
    0.36x at 24x24, K=7, head_dim 128, where the key/value halos dominate)."""
    h, n, d = 8, 24, 128
    sq = jax.ShapeDtypeStruct((1, n, n, h, d), jnp.float32)
    skv = jax.ShapeDtypeStruct((1, n, n, 1, d), jnp.float32)

    def temp_bytes(repeat, grad):
        def f(q, k, v):
            if repeat:
                k, v = (jnp.repeat(x, h, axis=-2) for x in (k, v))
            return kernels.na2d(q, k, v, 7, backend="xla").sum()

        fn = jax.jit(jax.grad(f, argnums=(0, 1, 2)) if grad else f)
        return fn.lower(sq, skv, skv).compile().memory_analysis().temp_size_in_bytes

    for grad in (False, True):
        gqa, repeated = temp_bytes(False, grad), temp_bytes(True, grad)
        assert gqa < 0.5 * repeated, (grad, gqa, repeated)


# ---------------------------------------------------------------------------- other backends


@pytest.mark.parametrize("name", ["pallas", "pallas_tpu"])
@pytest.mark.parametrize("feature,match", [
    (dict(heads_kv=1), "no grouped-query attention"),
    (dict(periodic=(False, True)), "no periodic axes"),
])
def test_kernel_backends_without_the_features(rng, name, feature, match):
    """The kernel backends say why they cannot take a call with either feature: ``auto`` then
    runs ``xla`` on their platform, and naming them raises with the reason. (On this CPU host
    ``auto`` runs the cpu kernels, which have both features.)"""
    c = case((8, 9), 3, heads=2, **feature)
    (q, k, v, _), _ = make_inputs(rng, c)
    platform = {"pallas": "cuda", "pallas_tpu": "tpu"}[name]
    plain = kernels.make_params(c["shape"], c["head_dim"], 3)
    assert kernels.resolve_backend("auto", q, q, q, plain, None, platform) == name
    p = kernels.make_params(c["shape"], c["head_dim"], 3, is_periodic=c["periodic"])
    assert kernels.resolve_backend("auto", q, k, v, p, None, platform) == "xla"
    assert ops._unsupported(name, q, v, p, None) is not None
    with pytest.raises(ValueError, match=f"backend='{name}': .*{match}"):
        kernels.na2d(q, k, v, 3, is_periodic=c["periodic"], backend=name)
    got = kernels.na2d(q, k, v, 3, is_periodic=c["periodic"])  # auto
    want = kernels.na2d(q, k, v, 3, is_periodic=c["periodic"], backend=na_cases.auto_on_cpu())
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- validation


def _x(heads, shape=(8, 8), dim=4):
    return jnp.ones((1, *shape, heads, dim), jnp.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: kernels.na2d(_x(4), _x(3), _x(3), 3), r"multiple of the key heads"),
    (lambda: kernels.na2d(_x(2), _x(4), _x(4), 3), r"multiple of the key heads"),
    (lambda: kernels.na2d(_x(4), _x(2), _x(1), 3), "value.shape"),
    (lambda: kernels.na2d(_x(4), _x(2, dim=8), _x(2), 3), "key.shape"),
    (lambda: kernels.na2d(_x(4), _x(2), _x(2), 3, rpb=jnp.zeros((2, 5, 5))),
     r"\[heads, 2K-1, ...\]"),
    (lambda: kernels.na2d(_x(2), _x(2), _x(2), 3, is_causal=(False, True),
                          is_periodic=(True, True)), "both causal and periodic"),
    (lambda: kernels.na2d_qk(_x(2), _x(2), 3, is_causal=True, is_periodic=True),
     "both causal and periodic"),
    (lambda: kernels.na1d(_x(2, (9,)), _x(2, (9,)), _x(2, (9,)), 5, dilation=2,
                          is_periodic=True), "shortest dilation group"),
    (lambda: kernels.na2d(_x(2), _x(2), _x(2), 3, is_periodic=(True,)),
     "one entry per spatial axis"),
    (lambda: kernels.na2d_qk(_x(6), _x(4), 3), r"multiple of the key heads"),
    (lambda: kernels.na2d_av(jnp.ones((1, 8, 8, 6, 9)), _x(4), 3),
     r"multiple of the value heads"),
    (lambda: kernels.na2d_av(jnp.ones((1, 8, 8, 4, 8)), _x(2), 3), "weights.shape"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("target", ["q", "k", "v", "dout"])
@pytest.mark.parametrize("c,with_rpb", [
    (case((11, 9), (5, 3), dilation=(2, 1), periodic=(True, False), heads=4, heads_kv=2,
          head_dim=8), True),
    (case((13,), 4, stride=2, dilation=2, periodic=True, heads=3, heads_kv=1, head_dim=8), False),
], ids=lambda x: na_cases.case_id(x) if isinstance(x, dict) else str(x))
def test_nonfinite_stays_in_its_windows(c, with_rpb, target):
    """xla's containment with both features: NaN/Inf reach exactly what the oracle's per-pair
    computation reaches (through wrapped windows and every query head of a group), everything
    else is bitwise as on finite inputs (``test_nonfinite.check_contained``)."""
    check_contained(c, with_rpb, target, jnp.float32, "xla")


def test_xla_chunked_matches(rng, monkeypatch):
    """With the logits over budget the xla path runs chunk by chunk (folded query heads, the
    per-key-head bias and the tiled mask sliced alike); results and gradients do not change."""
    from nat_jax.kernels import xla

    c = RPB[0]
    (q, k, v, rpb), _ = make_inputs(rng, c, with_rpb=True)
    fn = fused(c, "xla", return_lse=True)

    def run():
        jax.clear_caches()
        out = fn(q, k, v, rpb=rpb)
        grads = jax.grad(lambda q, k, v, r: fn(q, k, v, rpb=r)[0].sum(),
                         argnums=(0, 1, 2, 3))(q, k, v, rpb)
        return (*out, *grads)

    want = run()
    monkeypatch.setattr(xla, "_LOGITS_BUDGET", 1024)
    for name, got, w in zip("out lse dq dk dv drpb".split(), run(), want):
        assert_close(got, np.asarray(w, np.float64), 1e-5, 1e-5, name)
