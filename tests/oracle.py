"""Float64 numpy brute-force neighborhood attention, written from the rules alone.

This file deliberately shares no code with ``kernels/``: it re-derives every window from
NATTEN's rules (stated in the README's "Neighborhood attention ops" section: windows shifted
inwards at the borders, even kernels, stride leaders, dilation groups, causal windows, RPB at the
relative offset) with plain Python loops over queries, so it can
serve as the ground truth for every backend. Gradients are computed analytically in float64
(and checked against finite differences in ``test_oracle.py``).
"""

from __future__ import annotations

import itertools

import numpy as np


def axis_window(i: int, length: int, kernel: int, stride: int, dilation: int,
                causal: bool) -> list[int]:
    """Original key indices that query ``i`` attends to along one axis, in window order."""
    g, ic = i % dilation, i // dilation
    lg = length // dilation + (1 if g < length % dilation else 0)
    left = kernel // 2
    right = kernel // 2 + (kernel % 2 - 1)
    if causal:
        leader = min((ic // stride) * stride + stride - 1, lg - 1)
        start = max(leader - left - right, 0)
        end = min(ic + 1, lg)
    else:
        leader = min((ic // stride) * stride + stride // 2, lg - 1)
        start = max(leader - left, 0) + (leader + right >= lg) * (lg - right - leader - 1)
        end = start + kernel
    return [g + j * dilation for j in range(start, end)]


def axis_offset(i: int, j: int, kernel: int, dilation: int) -> int:
    """RPB column along one axis for query ``i`` and key ``j`` (offset in dilated units)."""
    return kernel - 1 + (j // dilation - i // dilation)


def _bias(rpb, idx, keys, kernel, dilation):
    """``[heads, W]`` bias of query ``idx`` towards each of its ``keys``."""
    offs = np.array([[axis_offset(i, j, kk, d) for i, j, kk, d in zip(idx, key, kernel, dilation)]
                     for key in keys])
    return np.asarray(rpb, np.float64)[(slice(None), *offs.T)]


def _neighbors(shape, kernel, stride, dilation, causal):
    """For each query (row-major), the list of key multi-indices and, per key, its window slot."""
    out = []
    for idx in itertools.product(*[range(n) for n in shape]):
        per_axis = [axis_window(i, n, k, s, d, c)
                    for i, n, k, s, d, c in zip(idx, shape, kernel, stride, dilation, causal)]
        keys = list(itertools.product(*per_axis))
        slots = list(itertools.product(*[range(len(a)) for a in per_axis]))
        out.append((idx, keys, slots))
    return out


def _as_tuple(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def na_forward(q, k, v, kernel, stride=1, dilation=1, causal=False, scale=None, rpb=None):
    """Neighborhood attention in float64.

    Args: q, k, v ``[B, *spatial, heads, dim]``; rpb ``[heads, 2K-1, ...]`` or None.
    Returns: ``(out [B, *spatial, heads, dim], lse [B, *spatial, heads])``.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n = q.ndim - 3
    kernel, stride, dilation, causal = (_as_tuple(a, n) for a in (kernel, stride, dilation, causal))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = np.zeros_like(q)
    lse = np.zeros(q.shape[:-1])
    for idx, keys, _ in _neighbors(q.shape[1:1 + n], kernel, stride, dilation, causal):
        qi = q[(slice(None), *idx)]  # [B, h, d]
        kidx = tuple(np.array(keys).T)
        kk, vv = k[(slice(None), *kidx)], v[(slice(None), *kidx)]  # [B, W, h, d]
        logits = np.einsum("bhd,bwhd->bhw", qi, kk) * scale
        if rpb is not None:
            logits = logits + _bias(rpb, idx, keys, kernel, dilation)[None]
        m = logits.max(-1, keepdims=True)
        p = np.exp(logits - m)
        s = p.sum(-1, keepdims=True)
        out[(slice(None), *idx)] = np.einsum("bhw,bwhd->bhd", p / s, vv)
        lse[(slice(None), *idx)] = (m + np.log(s))[..., 0]
    return out, lse


def na_backward(q, k, v, dout, kernel, stride=1, dilation=1, causal=False, scale=None, rpb=None):
    """Analytic float64 gradients ``(dq, dk, dv, drpb)`` of ``sum(out * dout)``."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    n = q.ndim - 3
    kernel, stride, dilation, causal = (_as_tuple(a, n) for a in (kernel, stride, dilation, causal))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    drpb = None if rpb is None else np.zeros(np.shape(rpb))
    for idx, keys, _ in _neighbors(q.shape[1:1 + n], kernel, stride, dilation, causal):
        sl = (slice(None), *idx)
        qi, do = q[sl], dout[sl]
        kidx = tuple(np.array(keys).T)
        kk, vv = k[(slice(None), *kidx)], v[(slice(None), *kidx)]
        logits = np.einsum("bhd,bwhd->bhw", qi, kk) * scale
        if rpb is not None:
            logits = logits + _bias(rpb, idx, keys, kernel, dilation)[None]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        dp = np.einsum("bhd,bwhd->bhw", do, vv)
        ds = p * (dp - (dp * p).sum(-1, keepdims=True))
        dq[sl] += np.einsum("bhw,bwhd->bhd", ds, kk) * scale
        dkk = np.einsum("bhw,bhd->bwhd", ds, qi) * scale
        dvv = np.einsum("bhw,bhd->bwhd", p, do)
        # Keys within one window are distinct, so plain fancy-index accumulation is exact.
        dk[(slice(None), *kidx)] += dkk
        dv[(slice(None), *kidx)] += dvv
        if drpb is not None:
            offs = tuple(np.array([[axis_offset(i, j, kk_, d) for i, j, kk_, d in
                                    zip(idx, key, kernel, dilation)] for key in keys]).T)
            np.add.at(drpb, (slice(None), *offs), ds.sum(0))
    return dq, dk, dv, drpb


def na_qk(q, k, kernel, dilation=1, causal=False, scale=None, rpb=None, stride=1):
    """Logits ``[B, *spatial, heads, prod(K)]``, window slots row-major, -inf where a causal
    window has fewer than K keys."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n = q.ndim - 3
    kernel, dilation, causal = (_as_tuple(a, n) for a in (kernel, dilation, causal))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    width = int(np.prod(kernel))
    out = np.full(q.shape[:-1] + (width,), -np.inf)
    strides = _as_tuple(stride, n)
    for idx, keys, slots in _neighbors(q.shape[1:1 + n], kernel, strides, dilation, causal):
        qi = q[(slice(None), *idx)]
        for key, slot in zip(keys, slots):
            flat = int(np.ravel_multi_index(slot, kernel))
            val = np.einsum("bhd,bhd->bh", qi, k[(slice(None), *key)]) * scale
            if rpb is not None:
                o = tuple(axis_offset(i, j, kk_, d) for i, j, kk_, d in
                          zip(idx, key, kernel, dilation))
                val = val + np.asarray(rpb, np.float64)[(slice(None), *o)][None]
            out[(slice(None), *idx, slice(None), flat)] = val
    return out


def na_av(attn, v, kernel, dilation=1, causal=False, stride=1):
    """Weighted sum of window values: ``attn [B, *spatial, heads, prod(K)]`` -> ``[B, *spatial,
    heads, dim]``."""
    attn, v = np.asarray(attn, np.float64), np.asarray(v, np.float64)
    n = v.ndim - 3
    kernel, dilation, causal = (_as_tuple(a, n) for a in (kernel, dilation, causal))
    out = np.zeros_like(v)
    strides = _as_tuple(stride, n)
    for idx, keys, slots in _neighbors(v.shape[1:1 + n], kernel, strides, dilation, causal):
        for key, slot in zip(keys, slots):
            flat = int(np.ravel_multi_index(slot, kernel))
            w = attn[(slice(None), *idx, slice(None), flat)]  # [B, h]
            out[(slice(None), *idx)] += w[..., None] * v[(slice(None), *key)]
    return out
