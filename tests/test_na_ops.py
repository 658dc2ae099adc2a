"""NA ops (reference and xla backends) against the float64 oracle and natten's flex backend."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import na_cases
import oracle
from nat_jax import kernels

BACKENDS = ["reference", "xla", "cpu"]
# Per-dtype tolerances (atol, rtol) on O(1) outputs; gradients are compared after normalizing by
# their own scale.
FWD_TOL = {jnp.float32: (2e-5, 1e-5), jnp.bfloat16: (3e-2, 2e-2), jnp.float16: (5e-3, 5e-3)}
GRAD_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 5e-2, jnp.float16: 1e-2}


def make_inputs(rng, c, dtype=jnp.float32, with_rpb=False):
    shape = (c["batch"], *c["shape"], c["heads"], c["head_dim"])
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    rpb = None
    if with_rpb:
        rpb = rng.standard_normal((c["heads"], *(2 * x - 1 for x in c["kernel"]))).astype(np.float32)
    as_dtype = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    # The oracle sees exactly the (rounded) values the backend sees.
    rounded = [None if x is None else np.asarray(as_dtype(x), np.float64) for x in (q, k, v, rpb)]
    return [as_dtype(x) for x in (q, k, v)] + [as_dtype(rpb)], rounded


def call(c, q, k, v, rpb=None, backend="xla", **kw):
    return kernels.neighborhood_attention(q, k, v, c["kernel"], c["stride"], c["dilation"],
                                          c["causal"], rpb=rpb, backend=backend, **kw)


def oracle_args(c):
    return dict(kernel=c["kernel"], stride=c["stride"], dilation=c["dilation"],
                causal=c["causal"])


def assert_close(got, want, atol, rtol, what=""):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def check_forward(rng, c, backend, dtype=jnp.float32, with_rpb=False):
    (q, k, v, rpb), (q64, k64, v64, rpb64) = make_inputs(rng, c, dtype, with_rpb)
    out, lse = call(c, q, k, v, rpb, backend=backend, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:-1]
    want, want_lse = oracle.na_forward(q64, k64, v64, rpb=rpb64, **oracle_args(c))
    atol, rtol = FWD_TOL[dtype]
    assert_close(out, want, atol, rtol, "out")
    assert_close(lse, want_lse, atol * 4, rtol, "lse")


def check_gradients(rng, c, backend, dtype=jnp.float32, with_rpb=False):
    (q, k, v, rpb), (q64, k64, v64, rpb64) = make_inputs(rng, c, dtype, with_rpb)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    dout_j = jnp.asarray(dout, dtype)
    dout64 = np.asarray(dout_j, np.float64)

    def loss(q, k, v, rpb):
        out = call(c, q, k, v, rpb, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * dout_j.astype(jnp.float32))

    argnums = (0, 1, 2, 3) if with_rpb else (0, 1, 2)
    grads = jax.grad(loss, argnums=argnums)(q, k, v, rpb)
    want = oracle.na_backward(q64, k64, v64, dout64, rpb=rpb64, **oracle_args(c))
    for name, g, w in zip("q k v rpb".split(), grads, want):
        assert g.dtype == dtype
        scale = max(1.0, float(np.abs(w).max()))
        assert_close(np.asarray(jnp.asarray(g, jnp.float32)) / scale, w / scale,
                     GRAD_TOL[dtype], 0, f"d{name}")


# ---------------------------------------------------------------------------- forward grids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.QUICK, ids=na_cases.case_id)
def test_forward_quick(rng, c, backend):
    check_forward(rng, c, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.RPB, ids=na_cases.case_id)
def test_forward_rpb(rng, c, backend):
    check_forward(rng, c, backend, with_rpb=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.NATTEN_GRID, ids=na_cases.case_id)
def test_forward_natten_grid(rng, c, backend):
    check_forward(rng, c, backend)


@pytest.mark.slow
@pytest.mark.parametrize("c", na_cases.random_cases(0, 12, 1) + na_cases.random_cases(1, 16, 2)
                         + na_cases.random_cases(2, 8, 3), ids=na_cases.case_id)
def test_random_sweep(rng, c):
    check_forward(rng, c, "xla")
    check_gradients(rng, c, "xla")


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.QUICK[::2], ids=na_cases.case_id)
def test_gradients(rng, c, backend):
    check_gradients(rng, c, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.RPB, ids=na_cases.case_id)
def test_gradients_rpb(rng, c, backend):
    check_gradients(rng, c, backend, with_rpb=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.NATTEN_GRID, ids=na_cases.case_id)
def test_gradients_natten_grid(rng, c, backend):
    check_gradients(rng, c, backend)


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [na_cases.RPB[2], na_cases.QUICK[4], na_cases.QUICK[7]],
                         ids=na_cases.case_id)
def test_low_precision(rng, c, backend, dtype):
    with_rpb = c in na_cases.RPB
    check_forward(rng, c, backend, dtype, with_rpb)
    check_gradients(rng, c, backend, dtype, with_rpb)


# ---------------------------------------------------------------------------- natten flex


def natten_flex(c, q, k, v):
    import natten
    import torch

    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(c["shape"])]
    t = [torch.from_numpy(np.asarray(x, np.float32)) for x in (q, k, v)]
    out, lse = fn(*t, kernel_size=c["kernel"], stride=c["stride"], dilation=c["dilation"],
                  is_causal=c["causal"], backend="flex-fna", return_lse=True)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", na_cases.QUICK + [
    pytest.param(c, marks=pytest.mark.slow) for c in na_cases.NATTEN_GRID], ids=na_cases.case_id)
def test_matches_natten_flex(rng, c, backend):
    (q, k, v, _), _ = make_inputs(rng, c)
    want, want_lse = natten_flex(c, q, k, v)
    out, lse = call(c, q, k, v, backend=backend, return_lse=True)
    assert_close(out, want, 2e-5, 1e-5, "out")
    assert_close(lse, want_lse, 5e-5, 1e-5, "lse")


# ---------------------------------------------------------------------------- unfused pieces


@pytest.mark.parametrize("c,with_rpb", [
    (na_cases.case((9, 11), (3, 5), dilation=(2, 1)), True),
    (na_cases.case((10,), 4, dilation=2, causal=True), False),
    (na_cases.case((6, 5, 7), 3, dilation=(1, 1, 2), causal=(True, False, False)), False),
    (na_cases.case((13, 12), (5, 4), stride=(2, 3), causal=(False, True)), False),
], ids=lambda x: na_cases.case_id(x) if isinstance(x, dict) else str(x))
@pytest.mark.parametrize("backend", ["xla", "reference"])
def test_qk_av_pieces(rng, c, with_rpb, backend):
    (q, k, v, rpb), (q64, k64, _, rpb64) = make_inputs(rng, c, with_rpb=with_rpb)
    rank = len(c["shape"])
    qk = functools.partial(getattr(kernels, f"na{rank}d_qk"), backend=backend,
                           stride=c["stride"])
    av = functools.partial(getattr(kernels, f"na{rank}d_av"), backend=backend,
                           stride=c["stride"])
    logits = qk(q, k, c["kernel"], dilation=c["dilation"], is_causal=c["causal"], rpb=rpb)
    want = oracle.na_qk(q64, k64, c["kernel"], c["dilation"], c["causal"], rpb=rpb64,
                        stride=c["stride"])
    assert logits.shape == (*q.shape[:-1], int(np.prod(c["kernel"])))
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(np.asarray(logits)), finite)
    assert_close(np.where(finite, logits, 0), np.where(finite, want, 0), 2e-5, 1e-5)
    weights = jax.nn.softmax(logits, axis=-1)
    out = av(weights, v, c["kernel"], dilation=c["dilation"], is_causal=c["causal"])
    assert_close(out, oracle.na_av(np.asarray(weights, np.float64), np.asarray(v, np.float64),
                                   c["kernel"], c["dilation"], c["causal"], stride=c["stride"]),
                 2e-5, 1e-5)
    fused = call(c, q, k, v, rpb, backend="xla")
    assert_close(out, np.asarray(fused, np.float64), 2e-5, 1e-5)


@pytest.mark.parametrize("c,with_rpb", [
    (na_cases.case((9, 11), (3, 5), dilation=(2, 1)), True),
    (na_cases.case((11, 7), (4, 3), stride=(2, 1), dilation=(2, 1), causal=(True, False)), False),
    (na_cases.case((5, 6, 7), 3, dilation=(1, 2, 1)), True),
], ids=lambda x: na_cases.case_id(x) if isinstance(x, dict) else str(x))
def test_qk_av_gradients(rng, c, with_rpb):
    """Autodiff of ``na_av(softmax(na_qk))`` on the tiled xla pieces (chunked, rematerialized)
    is the gradient of NA: the float64 oracle's backward, for q, k, v and rpb."""
    from nat_jax.kernels import xla

    (q, k, v, rpb), (q64, k64, v64, rpb64) = make_inputs(rng, c, with_rpb=with_rpb)
    rank = len(c["shape"])
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    kw = dict(stride=c["stride"], dilation=c["dilation"], is_causal=c["causal"], backend="xla")

    def loss(q, k, v, rpb):
        logits = getattr(kernels, f"na{rank}d_qk")(q, k, c["kernel"], rpb=rpb, **kw)
        out = getattr(kernels, f"na{rank}d_av")(jax.nn.softmax(logits, -1), v, c["kernel"], **kw)
        return jnp.sum(out * dout)

    want = oracle.na_backward(q64, k64, v64, np.asarray(dout, np.float64), rpb=rpb64,
                              **oracle_args(c))
    argnums = (0, 1, 2, 3) if with_rpb else (0, 1, 2)
    budget = xla._LOGITS_BUDGET
    try:
        for xla._LOGITS_BUDGET in (None, 1 << 11):  # whole, and chunked tile by tile
            kernels.ops._qk.clear_cache()
            kernels.ops._av.clear_cache()
            grads = jax.grad(loss, argnums=argnums)(q, k, v, rpb)
            for name, g, w in zip("q k v rpb".split(), grads, want):
                assert_close(g, w, 2e-5, 1e-5, f"d{name}, budget {xla._LOGITS_BUDGET}")
    finally:
        xla._LOGITS_BUDGET = budget
        kernels.ops._qk.clear_cache()
        kernels.ops._av.clear_cache()


def test_qk_av_keep_nonfinite_inside_windows(rng):
    """A NaN key and an Inf value reach exactly the logits / outputs / gradients whose windows
    hold them, on the tiled pieces as on the reference (whose gather never mixes windows)."""
    q, k, v = (jnp.asarray(rng.standard_normal((1, 15, 13, 2, 8)), jnp.float32)
               for _ in range(3))
    k = k.at[0, 2, 3, 0, 1].set(jnp.nan)
    v = v.at[0, 9, 12, 1, 4].set(jnp.inf)

    def run(backend):
        kw = dict(dilation=(1, 2), backend=backend)

        def out(q, k, v):
            logits = kernels.na2d_qk(q, k, 5, **kw)
            return logits, kernels.na2d_av(jax.nn.softmax(logits, -1), v, 5, **kw)

        (logits, o), vjp = jax.vjp(out, q, k, v)
        return [logits, o, *vjp((jnp.ones_like(logits), jnp.ones_like(o)))]

    for name, got, want in zip(["logits", "out", "dq", "dk", "dv"], run("xla"),
                               run("reference")):
        bad = ~np.isfinite(np.asarray(want))
        assert 0 < bad.sum() < bad.size / 4, name
        np.testing.assert_array_equal(~np.isfinite(np.asarray(got)), bad, err_msg=name)
        assert_close(np.where(bad, 0, got), np.where(bad, 0, np.asarray(want, np.float64)),
                     2e-5, 1e-5, name)


def test_positional_arguments_agree(rng):
    """``na2d(q, k, v, 7, 2)`` is stride 2, as in NATTEN; the unfused ops take everything after
    ``kernel_size`` by keyword only, so ``na2d_qk(q, k, 7, 2)`` (which meant dilation 2) is an
    error instead of a silently different window. The keywords mean the same in both."""
    q, k, v = (jnp.asarray(rng.standard_normal((1, 12, 12, 2, 8)), jnp.float32)
               for _ in range(3))
    with pytest.raises(TypeError, match="positional"):
        kernels.na2d_qk(q, k, 3, 2)
    with pytest.raises(TypeError, match="positional"):
        kernels.na2d_av(jnp.ones((1, 12, 12, 2, 9)), v, 3, 2)
    fused = kernels.na2d(q, k, v, 3, 2)
    np.testing.assert_array_equal(fused, kernels.na2d(q, k, v, 3, stride=2))
    for kw in (dict(stride=2), dict(dilation=2), dict(stride=3, is_causal=(True, False))):
        logits = kernels.na2d_qk(q, k, 3, **kw)
        out = kernels.na2d_av(jax.nn.softmax(logits, -1), v, 3, **kw)
        assert_close(out, np.asarray(kernels.na2d(q, k, v, 3, **kw), np.float64), 2e-5, 1e-5,
                     str(kw))


def test_unfused_backend_argument(rng, recwarn):
    """``backend=`` on na*_qk / na*_av: "auto" runs the tiled xla pieces, "reference" the
    gather ones; a backend without unfused kernels ("pallas") runs xla's, warning once."""
    from nat_jax.kernels import ops

    q, k, v = (jnp.asarray(rng.standard_normal((1, 9, 10, 2, 4)), jnp.float32)
               for _ in range(3))
    rpb = jnp.asarray(rng.standard_normal((2, 5, 5)), jnp.float32)
    assert ops.resolve_unfused_backend("auto", "qk") == "xla"
    assert ops.resolve_unfused_backend("auto", "av") == "xla"
    want = kernels.na2d_qk(q, k, 3, dilation=2, rpb=rpb, backend="xla")
    np.testing.assert_array_equal(kernels.na2d_qk(q, k, 3, dilation=2, rpb=rpb), want)
    assert_close(kernels.na2d_qk(q, k, 3, dilation=2, rpb=rpb, backend="reference"),
                 np.asarray(want, np.float64), 2e-5, 1e-5)
    ops._warned_fallback.discard(("pallas", "qk"))
    with pytest.warns(UserWarning, match="backend 'pallas' has no unfused kernels; using 'xla'"):
        got = kernels.na2d_qk(q, k, 3, dilation=2, rpb=rpb, backend="pallas")
    np.testing.assert_array_equal(got, want)
    recwarn.clear()
    kernels.na2d_qk(q, k, 3, backend="pallas")
    assert not [w for w in recwarn if "unfused" in str(w.message)]  # once per backend and op
    w = jax.nn.softmax(want, -1)
    np.testing.assert_array_equal(kernels.na2d_av(w, v, 3, dilation=2, backend="xla"),
                                  kernels.na2d_av(w, v, 3, dilation=2, backend="auto"))
    for op in (lambda: kernels.na2d_qk(q, k, 3, backend="cuda-magic"),
               lambda: kernels.na2d_av(w, v, 3, backend="cuda-magic")):
        with pytest.raises(ValueError, match="backend='cuda-magic' is not one of"):
            op()


def test_scale_zero_is_a_value(rng):
    c = na_cases.case((12, 12), 3)
    (q, k, v, _), (_, _, v64, _) = make_inputs(rng, c)
    out = kernels.na2d(q, k, v, 3, scale=0.0)
    # Uniform weights: the plain mean over each window.
    want = oracle.na_forward(np.zeros_like(v64), np.zeros_like(v64), v64, 3)[0]
    assert_close(out, want, 2e-5, 1e-5)


# ---------------------------------------------------------------------------- transformations


def test_jit_vmap_grad_compose(rng):
    c = na_cases.case((10, 9), (3, 5), dilation=(2, 1))
    (q, k, v, rpb), _ = make_inputs(rng, c, with_rpb=True)

    def f(q, k, v, rpb):
        return kernels.na2d(q, k, v, (3, 5), dilation=(2, 1), rpb=rpb).sum()

    batched = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 3)), in_axes=(0, 0, 0, None)))
    gq, grpb = batched(q[:, None], k[:, None], v[:, None], rpb)
    gq_ref, grpb_ref = jax.grad(f, argnums=(0, 3))(q[:1], k[:1], v[:1], rpb)
    assert_close(gq[0], np.asarray(gq_ref, np.float64), 1e-5, 1e-5)
    assert grpb.shape == (q.shape[0], *rpb.shape)
    assert_close(grpb[0], np.asarray(grpb_ref, np.float64), 1e-5, 1e-5)


def test_sharded_inputs_batch_and_heads(rng):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "heads"))
    c = na_cases.case((14, 14), 7, batch=4, heads=2)
    (q, k, v, rpb), _ = make_inputs(rng, c, with_rpb=True)
    spec = NamedSharding(mesh, P("data", None, None, "heads", None))
    qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
    rpbs = jax.device_put(rpb, NamedSharding(mesh, P("heads", None, None)))
    fn = jax.jit(lambda q, k, v, r: kernels.na2d(q, k, v, 7, rpb=r))
    out = fn(qs, ks, vs, rpbs)
    assert_close(out, np.asarray(fn(q, k, v, rpb), np.float64), 1e-6, 1e-6)
    g = jax.jit(jax.grad(lambda q, r: kernels.na2d(q, ks, vs, 7, rpb=r).sum(), argnums=(0, 1)))
    gq, gr = g(qs, rpbs)
    gq0, gr0 = jax.grad(lambda q, r: kernels.na2d(q, k, v, 7, rpb=r).sum(), argnums=(0, 1))(q, rpb)
    assert_close(gq, np.asarray(gq0, np.float64), 1e-5, 1e-5)
    assert_close(gr, np.asarray(gr0, np.float64), 1e-4, 1e-5)


def test_xla_memory_is_linear_in_tokens():
    """The compiled XLA path never allocates O(tokens^2) nor a [tokens, K^2, d] gather of keys
    and values; its temporaries grow linearly with the number of tokens."""
    dim, kernel = 64, 13

    def temp_bytes(n):
        s = jax.ShapeDtypeStruct((1, n, n, 1, dim), jnp.float32)
        fn = jax.jit(lambda q, k, v: kernels.na2d(q, k, v, kernel, backend="xla"))
        return fn.lower(s, s, s).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(96), temp_bytes(192)
    tokens = 192 * 192
    kv_gather_bytes = 2 * tokens * kernel**2 * dim * 4
    assert large < kv_gather_bytes / 4, large
    assert large < tokens * tokens * 4 / 20, large
    # Doubling the side quadruples tokens: memory should grow ~4x, not ~16x.
    assert large < 6 * small, (small, large)


def test_chunked_xla_path_matches(rng, monkeypatch):
    """Large problems run the XLA path in chunks of tiles; the result must not change."""
    from nat_jax.kernels import xla
    c = na_cases.case((24, 16), (5, 3), dilation=(2, 1))
    (q, k, v, rpb), _ = make_inputs(rng, c, with_rpb=True)
    want = xla.na_fused(q, k, v, kernels.make_params(c["shape"], 16, c["kernel"],
                                                      dilation=c["dilation"]), rpb)
    monkeypatch.setattr(xla, "_LOGITS_BUDGET", 4096)
    p = kernels.make_params(c["shape"], 16, c["kernel"], dilation=c["dilation"])
    got = xla.na_fused(q, k, v, p, rpb)
    for a, b in zip(got, want):
        assert_close(a, np.asarray(b, np.float64), 1e-6, 1e-6)
    g = jax.grad(lambda q, r: xla.na_fused(q, k, v, p, r)[0].sum(), argnums=(0, 1))(q, rpb)
    monkeypatch.setattr(xla, "_LOGITS_BUDGET", None)
    g0 = jax.grad(lambda q, r: xla.na_fused(q, k, v, p, r)[0].sum(), argnums=(0, 1))(q, rpb)
    for a, b in zip(g, g0):
        assert_close(a, np.asarray(b, np.float64), 1e-5, 1e-5)


@pytest.mark.parametrize("chunk", [(1, None), (2, None), (3, None), (6, None), (1, 2)])
def test_xla_chunks_of_pairs_take_their_heads_bias(rng, monkeypatch, chunk):
    """Chunks of (batch, head) pairs that hold whole batches (6 = 2 images x 3 heads; 3), part
    of one batch's heads (1), or pairs straddling two images (2), and tiles of one pair: each
    takes its heads' rows of the per-head bias table, forward and backward."""
    from nat_jax.kernels import xla
    q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 10, 3, 8)), jnp.float32)
               for _ in range(3))
    rpb = jnp.asarray(rng.standard_normal((3, 5, 5)), jnp.float32)
    p = kernels.make_params((12, 10), 8, 3)

    def run(q, k, v, rpb):
        out, lse = xla.na_fused(q, k, v, p, rpb)
        return jnp.sum(out * v) + jnp.sum(lse)

    want = jax.value_and_grad(run, argnums=(0, 1, 2, 3))(q, k, v, rpb)
    cz, cn = chunk
    monkeypatch.setattr(xla, "_chunk_sizes", lambda z, n, _: (cz, cn or n))
    got = jax.value_and_grad(run, argnums=(0, 1, 2, 3))(q, k, v, rpb)
    assert_close(got[0], np.asarray(want[0], np.float64), 1e-6, 1e-6)
    for name, a, b in zip("q k v rpb".split(), got[1], want[1]):
        assert_close(a, np.asarray(b, np.float64), 1e-5, 1e-5, f"d{name}")


# ---------------------------------------------------------------------------- validation


def _qkv(shape=(1, 8, 8, 2, 4), dtype=jnp.float32):
    x = jnp.ones(shape, dtype)
    return x, x, x


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=1), "kernel size must be >= 2"),
    (dict(kernel_size=3, stride=4), "stride must satisfy"),
    (dict(kernel_size=3, stride=0), "stride must satisfy"),
    (dict(kernel_size=3, dilation=3), r"kernel_size \* dilation must not exceed"),
    (dict(kernel_size=9), r"kernel_size \* dilation must not exceed"),
    (dict(kernel_size=(3, 3, 3)), "one entry per spatial axis"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
    (dict(kernel_size=3, is_causal=(True,)), "one entry per spatial axis"),
    (dict(kernel_size=3, backend="cuda-magic"), "backend="),
    (dict(kernel_size=True), "must be an int"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.na2d(*_qkv(), **kwargs)


def test_bad_operands_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="expects rank 5"):
        kernels.na2d(q[0], k[0], v[0], 3)
    with pytest.raises(ValueError, match="key.shape"):
        kernels.na2d(q, k[:, :4], v, 3)
    with pytest.raises(ValueError, match="key.dtype"):
        kernels.na2d(q, k.astype(jnp.bfloat16), v, 3)
    with pytest.raises(ValueError, match="floating dtype"):
        kernels.na2d(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32), 3)
    with pytest.raises(ValueError, match="value.shape"):
        kernels.na2d(q, k, v[:, :, :, :1], 3)
    with pytest.raises(ValueError, match="expected 4, 5 or 6"):
        kernels.neighborhood_attention(q[..., None, None], k[..., None, None],
                                       v[..., None, None], 3)


@pytest.mark.parametrize("kwargs,rpb_shape,match", [
    (dict(kernel_size=4), (2, 7, 7), "odd kernel_size"),
    (dict(kernel_size=3, stride=2), (2, 5, 5), "stride=1"),
    (dict(kernel_size=3, is_causal=(False, True)), (2, 5, 5), "causal"),
    (dict(kernel_size=3), (2, 5, 3), r"\[heads, 2K-1, ...\]"),
    (dict(kernel_size=3), (3, 5, 5), r"\[heads, 2K-1, ...\]"),
])
def test_bad_rpb_raises(kwargs, rpb_shape, match):
    with pytest.raises(ValueError, match=match):
        kernels.na2d(*_qkv(), rpb=jnp.zeros(rpb_shape), **kwargs)


def test_av_checks_weights_shape():
    q, _, v = _qkv()
    with pytest.raises(ValueError, match="weights.shape"):
        kernels.na2d_av(jnp.ones((1, 8, 8, 2, 8)), v, 3)


def test_auto_backend_resolves_to_a_registered_backend():
    q, k, v = _qkv()
    p = kernels.make_params(q.shape[1:3], q.shape[-1], 3)
    name = kernels.resolve_backend("auto", q, k, v, p, None)
    assert name in kernels.available_backends()
    if jax.default_backend() == "cpu":
        assert name == na_cases.auto_on_cpu()
    with pytest.raises(ValueError, match="is not one of"):
        kernels.resolve_backend("fastest", q, k, v, p, None)
