"""``nat_jax.layers``: the NNX neighborhood-attention layers, checked against the ops they are
built from (projections by hand, then the gather reference) and used by the NAT blocks."""

from __future__ import annotations

import numpy as np
import pytest

import flax.nnx as nnx
import jax
import jax.numpy as jnp

import nat_jax
from nat_jax import kernels, layers
from test_na_ops import assert_close

LAYERS = {1: layers.NeighborhoodAttention1D, 2: layers.NeighborhoodAttention2D,
          3: layers.NeighborhoodAttention3D}

CASES = [
    (1, (30,), dict(kernel_size=5, stride=2, dilation=3, is_causal=True, num_kv_heads=1)),
    (2, (12, 13), dict(kernel_size=(3, 5), dilation=(2, 1), rpb=True, num_kv_heads=2)),
    (2, (10, 9), dict(kernel_size=(4, 3), is_periodic=(True, False), is_causal=(False, True))),
    (3, (5, 6, 7), dict(kernel_size=3, dilation=(1, 2, 1), is_periodic=True, rpb=True)),
]


def _by_hand(layer, x, extra=None):
    """The layer's math written out with the gather reference backend."""
    params = nnx.state(layer, nnx.Param)
    h, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def split(t):
        y = t @ params["qkv"]["kernel"][...]
        if "bias" in params["qkv"]:
            y = y + params["qkv"]["bias"][...]
        return (y[..., :h * d].reshape(*t.shape[:-1], h, d),
                y[..., h * d:(h + hk) * d].reshape(*t.shape[:-1], hk, d),
                y[..., (h + hk) * d:].reshape(*t.shape[:-1], hk, d))

    q, k, v = split(x)
    ek = ev = None
    if extra is not None:
        _, ek, ev = split(extra)
    out = kernels.neighborhood_attention(
        q, k, v, layer.kernel_size, layer.stride, layer.dilation, layer.is_causal,
        rpb=None if layer.rpb is None else layer.rpb[...], is_periodic=layer.is_periodic,
        backend="reference", additional_keys=ek, additional_values=ev)
    out = out.reshape(*x.shape[:-1], -1) @ params["proj"]["kernel"][...]
    return out + params["proj"]["bias"][...]


@pytest.mark.parametrize("rank,shape,kw", CASES, ids=lambda x: str(x) if not isinstance(x, dict)
                         else "-".join(f"{k}{v}" for k, v in x.items()).replace(" ", ""))
def test_layer_is_projections_around_the_op(rng, rank, shape, kw):
    layer = LAYERS[rank](32, 4, rngs=nnx.Rngs(0), **kw)
    x = jnp.asarray(rng.standard_normal((2, *shape, 32)), jnp.float32)
    extra = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    out = layer(x)
    assert out.shape == x.shape
    assert_close(out, np.asarray(_by_hand(layer, x), np.float64), 2e-5, 1e-5)
    assert_close(layer(x, additional_tokens=extra),
                 np.asarray(_by_hand(layer, x, extra), np.float64), 2e-5, 1e-5, "extra")
    # The weights path (unfused pieces) gives the same output, and weights that sum to one.
    view = nnx.view(layer, return_weights=True)
    for tokens in (None, extra):
        got, weights = view.attend(x, tokens)
        assert_close(got, np.asarray(layer(x, tokens), np.float64), 2e-5, 1e-5, "weights path")
        width = int(np.prod(layer.kernel_size)) + (0 if tokens is None else tokens.shape[1])
        assert weights.shape == (2, *shape, 4, width)
        np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-5)


def test_layer_trains_under_jit_with_dropout(rng):
    layer = layers.NeighborhoodAttention2D(16, 2, 3, rpb=True, attn_drop=0.5, proj_drop=0.1,
                                           rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    evaluated = layer(x)
    np.testing.assert_array_equal(evaluated, layer(x))  # eval mode: deterministic
    layer.train()

    @nnx.jit
    def step(layer, x):
        return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(layer)

    loss1, grads = step(layer, x)
    loss2, _ = step(layer, x)
    assert float(loss1) != float(loss2)  # fresh dropout masks each call
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["rpb"][...]).sum()) > 0
    layer.eval()
    np.testing.assert_array_equal(layer(x), evaluated)


def test_nat_blocks_use_the_2d_layer():
    model = nat_jax.build_model(nat_jax.configs.get("nat_mini"), rngs=nnx.Rngs(0))
    attn = next(node for _, node in nnx.iter_graph(model)
                if isinstance(node, nat_jax.modeling.NeighborhoodAttention))
    assert isinstance(attn, layers.NeighborhoodAttention2D)
    assert attn.rpb is not None and attn.kernel_size == (7, 7)


def test_flops():
    layer = layers.NeighborhoodAttention2D(64, 4, 7, num_kv_heads=2, rngs=nnx.Rngs(0))
    b, n, c, d = 2, 14 * 14, 64, 16
    want = (2 * b * n * c * (4 + 2 * 2) * d          # qkv
            + 4 * b * 4 * n * 49 * d                  # NA, NATTEN's convention
            + 2 * b * n * c * c)                      # proj
    assert layer.flops((b, 14, 14, c)) == want
    extra = 4 * b * n * 4 * 5 * d + 2 * b * 5 * c * 2 * 2 * d
    assert layer.flops((b, 14, 14, c), additional_tokens=5) == want + extra


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        layers.NeighborhoodAttention2D(30, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        layers.NeighborhoodAttention2D(32, 4, 3, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rpb=True needs"):
        layers.NeighborhoodAttention2D(32, 4, 4, rpb=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size"):
        layers.NeighborhoodAttention3D(32, 4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="1D, 2D or 3D"):
        layers.NeighborhoodAttention(32, 4, 3, rngs=nnx.Rngs(0))
    layer = layers.NeighborhoodAttention2D(32, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected"):
        layer(jnp.ones((1, 8, 32)))
    with pytest.raises(ValueError, match="additional_tokens"):
        layer(jnp.ones((1, 8, 8, 32)), additional_tokens=jnp.ones((1, 3, 16)))
