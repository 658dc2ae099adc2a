"""Reference neighborhood attention: gather every query's window, then dense softmax.

Written for clarity, not speed: it materializes ``[B, *spatial, prod(K), heads, head_dim]`` for
keys and values. It is the project's ground truth for the other backends (alongside the float64
oracle in the tests), and it provides the unfused ``qk`` / ``av`` pieces used for
``output_attentions``. Gradients come from JAX autodiff.

Grouped-query attention (key/value with ``heads_kv`` heads, ``heads`` a multiple of it): query
heads are viewed as ``[heads_kv, group]`` and contracted against their key/value head's
gathered windows, so key and value are never repeated per query head.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nat_jax.kernels import windows
from nat_jax.kernels.params import NAParams


def _window_index(spatial: tuple[int, ...], p: NAParams):
    """Advanced-index tuple gathering ``[*spatial, *kernel]`` keys, and the window validity mask
    ``[N, W]`` (N = prod(spatial), W = prod(kernel))."""
    n = len(spatial)
    idx, valid = [], np.ones((), bool)
    for a in range(n):
        ia, va = windows.neighbor_indices(spatial[a], p.kernel_size[a], p.stride[a],
                                          p.dilation[a], p.is_causal[a], p.is_periodic[a])
        idx.append(windows.interleave_axis(ia, a, n, 2))
        valid = valid & windows.interleave_axis(va, a, n, 2)
    valid = np.broadcast_to(valid, spatial + p.kernel_size)
    return tuple(idx), valid.reshape(math.prod(spatial), -1)


def _rpb_bias(rpb: jax.Array, spatial: tuple[int, ...], p: NAParams) -> jax.Array:
    """RPB gathered per (query, window slot): ``[heads, N, W]`` float32."""
    n = len(spatial)
    flat = np.zeros((), np.int64)
    for a in range(n):
        rel = windows.rpb_indices(spatial[a], p.kernel_size[a], p.dilation[a],
                                  p.is_periodic[a])
        flat = flat * (2 * p.kernel_size[a] - 1) + windows.interleave_axis(rel, a, n, 2)
    flat = np.broadcast_to(flat, spatial + p.kernel_size).reshape(math.prod(spatial), -1)
    return rpb.astype(jnp.float32).reshape(rpb.shape[0], -1)[:, flat]


def _gather(x: jax.Array, idx, valid: np.ndarray) -> jax.Array:
    """``[B, *spatial, h, d]`` -> ``[B, N, W, h, d]``; slots outside a (causal) window hold 0.

    Those slots gather a clamped, real token: they are zeroed by a select, not multiplied by a
    zero weight, so a non-finite token never reaches a window it is not in (``0 * nan = nan``),
    forward or backward (the select's transpose zeroes their gradient too)."""
    g = x[(slice(None), *idx)]  # [B, *spatial, *kernel, h, d]
    n = len(idx)
    b = x.shape[0]
    g = g.reshape(b, math.prod(g.shape[1:1 + n]), math.prod(g.shape[1 + n:1 + 2 * n]),
                  *x.shape[-2:])
    if valid.all():
        return g
    return jnp.where(valid[None, :, :, None, None], g, jnp.zeros((), x.dtype))


def na_qk(query: jax.Array, key: jax.Array, p: NAParams, rpb: jax.Array | None = None
          ) -> jax.Array:
    """Scaled (+ biased) logits ``[B, *spatial, heads, prod(K)]`` in float32; slots outside a
    causal window hold ``-inf``. ``key`` may have fewer heads (grouped-query attention)."""
    spatial = query.shape[1:-2]
    idx, valid = _window_index(spatial, p)
    b, h, hk = query.shape[0], query.shape[-2], key.shape[-2]
    qf = query.reshape(b, -1, hk, h // hk, query.shape[-1])
    logits = jnp.einsum("bnkgd,bnwkd->bnkgw", qf, _gather(key, idx, valid),
                        preferred_element_type=jnp.float32).reshape(b, -1, h, valid.shape[-1])
    logits = logits * p.scale
    if rpb is not None:
        logits = logits + jnp.transpose(_rpb_bias(rpb, spatial, p), (1, 0, 2))[None]
    logits = jnp.where(valid[None, :, None, :], logits, -jnp.inf)
    return logits.reshape(*query.shape[:-1], -1)


def na_av(weights: jax.Array, value: jax.Array, p: NAParams) -> jax.Array:
    """``weights [B, *spatial, heads, prod(K)]`` times window values -> ``[B, *spatial, heads,
    head_dim]`` in ``value.dtype``. ``value`` may have fewer heads (grouped-query attention)."""
    spatial = value.shape[1:-2]
    idx, valid = _window_index(spatial, p)
    b, h, hk = weights.shape[0], weights.shape[-2], value.shape[-2]
    wf = weights.reshape(b, -1, h, weights.shape[-1])
    wf = jnp.where(valid[None, :, None, :], wf, 0).astype(
        jnp.promote_types(weights.dtype, value.dtype))
    wf = wf.reshape(b, wf.shape[1], hk, h // hk, wf.shape[-1])
    out = jnp.einsum("bnkgw,bnwkd->bnkgd", wf, _gather(value, idx, valid),
                     preferred_element_type=jnp.float32)
    return out.astype(value.dtype).reshape(*weights.shape[:-1], value.shape[-1])


def na_fused(query: jax.Array, key: jax.Array, value: jax.Array, p: NAParams,
             rpb: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Neighborhood attention by gather; returns ``(out, lse)`` with ``lse [B, *spatial, heads]``
    float32 (natural-log logsumexp of the scaled, biased logits)."""
    logits = na_qk(query, key, p, rpb)
    # Plain max-shifted logsumexp (not jax.nn.logsumexp, which treats a +inf maximum as 0 and
    # gives the row's other keys probability 0): a non-finite row is non-finite throughout, as
    # a per-pair computation gives. The shift is a constant for the gradient.
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = (m + jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1, keepdims=True)))[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    out = na_av(probs.astype(value.dtype), value, p)
    return out, lse
