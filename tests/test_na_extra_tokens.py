"""Extra global tokens (``additional_keys`` / ``additional_values``) and ``merge_attentions``.

Every query attends to its neighborhood *and* a few extra tokens with one softmax. Checked
against the float64 oracle (which puts the extra keys into each query's key list, from the
rules, not from ``kernels/merge.py``), gradients against the gather reference's autodiff of
that concatenated softmax, ``merge_attentions`` against attention over the union of key sets,
and natten 0.21.7's flex backend where it runs on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import na_cases
import oracle
from nat_jax import kernels
from test_na_ops import assert_close

BACKENDS = ["reference", "xla", "cpu"]

CASES = [
    # (case, extra tokens, extra kv heads, rpb)
    (na_cases.case((9, 11), (3, 5), dilation=(2, 1), heads=4), 5, 4, True),
    (na_cases.case((12,), 4, stride=2, causal=True, heads=2), 3, 1, False),
    (na_cases.case((5, 6, 7), 3, dilation=(1, 2, 1), heads=2), 7, 2, False),
]


def _inputs(rng, c, n_extra, heads_extra, with_rpb, dtype=jnp.float32):
    b, h, d = c["batch"], c["heads"], c["head_dim"]
    q, k, v = (rng.standard_normal((b, *c["shape"], h, d)).astype(np.float32) for _ in range(3))
    ek, ev = (rng.standard_normal((b, n_extra, heads_extra, d)).astype(np.float32)
              for _ in range(2))
    rpb = (rng.standard_normal((h, *(2 * x - 1 for x in c["kernel"]))).astype(np.float32)
           if with_rpb else None)
    as_j = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    return [as_j(x) for x in (q, k, v, ek, ev, rpb)]


def _call(c, q, k, v, ek, ev, rpb, backend, **kw):
    return kernels.neighborhood_attention(q, k, v, c["kernel"], c["stride"], c["dilation"],
                                          c["causal"], rpb=rpb, backend=backend,
                                          additional_keys=ek, additional_values=ev, **kw)


def _f64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("backend", BACKENDS + ["pallas"])
@pytest.mark.parametrize("case", CASES, ids=lambda x: f"{na_cases.case_id(x[0])}-x{x[1]}h{x[2]}")
def test_forward_matches_oracle(rng, case, backend):
    c, n_extra, heads_extra, with_rpb = case
    if backend == "pallas" and len(c["shape"]) == 3:
        pytest.skip("interpret-mode Pallas is slow; one rank is enough for the composition")
    q, k, v, ek, ev, rpb = _inputs(rng, c, n_extra, heads_extra, with_rpb)
    out, lse = _call(c, q, k, v, ek, ev, rpb, backend, return_lse=True)
    want, want_lse = oracle.na_forward(*map(_f64, (q, k, v)), c["kernel"], c["stride"],
                                       c["dilation"], c["causal"], rpb=_f64(rpb),
                                       extra_k=_f64(ek), extra_v=_f64(ev))
    assert_close(out, want, 2e-5, 1e-5, "out")
    assert_close(lse, want_lse, 5e-5, 1e-5, "lse")


@pytest.mark.parametrize("case", CASES[:2], ids=lambda x: f"{na_cases.case_id(x[0])}")
def test_gradients(rng, case):
    """Gradients of q, k, v, the extra keys/values and RPB through the merged softmax equal
    autodiff of one explicit softmax over [window logits | extra logits] (reference pieces)."""
    c, n_extra, heads_extra, with_rpb = case
    q, k, v, ek, ev, rpb = _inputs(rng, c, n_extra, heads_extra, with_rpb)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    rank = len(c["shape"])
    kw = dict(stride=c["stride"], dilation=c["dilation"], is_causal=c["causal"])

    def explicit(q, k, v, ek, ev, rpb):
        logits = getattr(kernels, f"na{rank}d_qk")(q, k, c["kernel"], rpb=rpb,
                                                    backend="reference", **kw)
        g = q.shape[-2] // ek.shape[2]
        eq = q.reshape(q.shape[0], -1, ek.shape[2], g, q.shape[-1])
        extra = jnp.einsum("bnkgd,blkd->bnkgl", eq, ek) * q.shape[-1] ** -0.5
        extra = extra.reshape(*logits.shape[:-1], -1)
        p = jax.nn.softmax(jnp.concatenate([logits, extra], -1), -1)
        w = p[..., :logits.shape[-1]]
        pe = p[..., logits.shape[-1]:].reshape(q.shape[0], -1, ek.shape[2], g, ek.shape[1])
        out = getattr(kernels, f"na{rank}d_av")(w, v, c["kernel"], backend="reference", **kw)
        out_e = jnp.einsum("bnkgl,blkd->bnkgd", pe, ev).reshape(out.shape)
        return jnp.sum((out + out_e) * dout)

    def fused(q, k, v, ek, ev, rpb, backend):
        return jnp.sum(_call(c, q, k, v, ek, ev, rpb, backend) * dout)

    argnums = (0, 1, 2, 3, 4, 5) if with_rpb else (0, 1, 2, 3, 4)
    want = jax.grad(explicit, argnums=argnums)(q, k, v, ek, ev, rpb)
    # The Pallas kernels take the lse cotangent the merge sends back (interpret mode: one rank).
    for backend in BACKENDS + (["pallas"] if rank == 1 else []):
        got = jax.grad(fused, argnums=argnums)(q, k, v, ek, ev, rpb, backend)
        for name, g_, w_ in zip(["q", "k", "v", "extra k", "extra v", "rpb"], got, want):
            scale = max(1.0, float(jnp.abs(w_).max()))
            assert_close(g_ / scale, np.asarray(w_, np.float64) / scale, 2e-5, 0,
                         f"{backend} d{name}")


def test_merge_attentions_is_attention_over_the_union(rng):
    """Dense attention over 3 disjoint key sets, merged, equals attention over all keys: output,
    lse and the gradients of q, k, v (through every part's lse)."""
    b, n, h, d = 2, 6, 3, 8
    q = jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, 10, h, d)), jnp.float32) for _ in range(2))
    parts = [(0, 3), (3, 4), (4, 10)]

    def attend(q, k, v):
        s = jnp.einsum("bnhd,blhd->bnhl", q, k)
        lse = jax.nn.logsumexp(s, -1)
        return jnp.einsum("bnhl,blhd->bnhd", jnp.exp(s - lse[..., None]), v), lse

    def merged(q, k, v):
        outs, lses = zip(*(attend(q, k[:, a:e], v[:, a:e]) for a, e in parts))
        return kernels.merge_attentions(list(outs), list(lses))

    (out, lse), (want, want_lse) = merged(q, k, v), attend(q, k, v)
    assert_close(out, np.asarray(want, np.float64), 1e-5, 1e-5, "out")
    assert_close(lse, np.asarray(want_lse, np.float64), 1e-5, 1e-5, "lse")
    loss = lambda f: lambda *a: jnp.sum(f(*a)[0] ** 2) + jnp.sum(jnp.sin(f(*a)[1]))  # noqa: E731
    for g, w in zip(jax.grad(loss(merged), (0, 1, 2))(q, k, v),
                    jax.grad(loss(attend), (0, 1, 2))(q, k, v)):
        assert_close(g, np.asarray(w, np.float64), 1e-5, 1e-5)
    # A query with no key in one part (lse -inf) takes the others'.
    empty = kernels.merge_attentions([out, jnp.full_like(out, 7.0)],
                                     [lse, jnp.full_like(lse, -jnp.inf)])
    assert_close(empty[0], np.asarray(out, np.float64), 1e-6, 1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_low_precision(rng, dtype):
    c, n_extra, heads_extra, _ = CASES[0]
    q, k, v, ek, ev, _ = _inputs(rng, c, n_extra, heads_extra, False, dtype)
    out = _call(c, q, k, v, ek, ev, None, "xla")
    assert out.dtype == dtype
    want, _ = oracle.na_forward(*map(_f64, (q, k, v)), c["kernel"], c["stride"], c["dilation"],
                                c["causal"], extra_k=_f64(ek), extra_v=_f64(ev))
    assert_close(out, want, 2e-2, 2e-2)


def test_matches_natten_flex(rng):
    """natten 0.21.7's na2d with additional_keys (flex backend on CPU)."""
    import natten
    import torch

    c = na_cases.case((10, 12), 5, dilation=(2, 1), heads=2)
    q, k, v, ek, ev, _ = _inputs(rng, c, 6, 2, False)
    t = [torch.from_numpy(np.asarray(x)) for x in (q, k, v, ek, ev)]
    try:
        want, want_lse = natten.na2d(*t[:3], kernel_size=c["kernel"], dilation=c["dilation"],
                                     additional_keys=t[3], additional_values=t[4],
                                     backend="flex-fna", return_lse=True)
    except (NotImplementedError, RuntimeError, ValueError) as err:  # no CPU path for it
        pytest.skip(f"natten cannot run additional_keys here: {err}")
    out, lse = _call(c, q, k, v, ek, ev, None, "xla", return_lse=True)
    assert_close(out, want.numpy().astype(np.float64), 2e-5, 1e-5, "out")
    assert_close(lse, want_lse.numpy().astype(np.float64), 5e-5, 1e-5, "lse")


def test_bad_arguments():
    q = jnp.ones((1, 8, 8, 4, 16))
    ek = jnp.ones((1, 3, 2, 16))
    with pytest.raises(ValueError, match="both or neither"):
        kernels.na2d(q, q, q, 3, additional_keys=ek)
    with pytest.raises(ValueError, match="additional_keys.shape"):
        kernels.na2d(q, q, q, 3, additional_keys=jnp.ones((2, 3, 2, 16)),
                     additional_values=jnp.ones((2, 3, 2, 16)))
    with pytest.raises(ValueError, match="additional_values.shape"):
        kernels.na2d(q, q, q, 3, additional_keys=ek, additional_values=jnp.ones((1, 4, 2, 16)))
    with pytest.raises(ValueError, match="multiple"):
        kernels.na2d(q, q, q, 3, additional_keys=jnp.ones((1, 3, 3, 16)),
                     additional_values=jnp.ones((1, 3, 3, 16)))
    with pytest.raises(ValueError, match="dtype"):
        kernels.na2d(q, q, q, 3, additional_keys=ek.astype(jnp.bfloat16),
                     additional_values=ek.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="one lse per output"):
        kernels.merge_attentions([q], [])
