"""Float64 numpy brute-force neighborhood attention, written from the rules alone.

This file deliberately shares no code with ``kernels/``: it re-derives every window from
NATTEN's rules (stated in the README's "Neighborhood attention ops" section: windows shifted
inwards at the borders, even kernels, stride leaders, dilation groups, causal windows, RPB at the
relative offset) with plain Python loops over queries, so it can
serve as the ground truth for every backend.

Two extensions, from their stated rules as well: periodic axes (the window is centred on the
stride leader, ``K // 2`` keys before, and wraps around the query's dilation group: group
coordinate ``c`` means ``c mod group_length``; the RPB offset is the wrapped offset in
``[-(K // 2), K - 1 - K // 2]``), and grouped-query attention (key/value with fewer heads; query
head ``i`` reads key/value head ``i // (heads // heads_kv)``). Gradients are computed analytically in float64
(and checked against finite differences in ``test_oracle.py``).
"""

from __future__ import annotations

import itertools

import numpy as np


def _group_len(i: int, length: int, dilation: int) -> int:
    g = i % dilation
    return length // dilation + (1 if g < length % dilation else 0)


def axis_window(i: int, length: int, kernel: int, stride: int, dilation: int,
                causal: bool, periodic: bool = False) -> list[int]:
    """Original key indices that query ``i`` attends to along one axis, in window order."""
    g, ic = i % dilation, i // dilation
    lg = _group_len(i, length, dilation)
    left = kernel // 2
    right = kernel // 2 + (kernel % 2 - 1)
    if periodic:
        assert not causal and kernel <= lg
        leader = min((ic // stride) * stride + stride // 2, lg - 1)
        return [g + ((leader - left + j) % lg) * dilation for j in range(kernel)]
    if causal:
        leader = min((ic // stride) * stride + stride - 1, lg - 1)
        start = max(leader - left - right, 0)
        end = min(ic + 1, lg)
    else:
        leader = min((ic // stride) * stride + stride // 2, lg - 1)
        start = max(leader - left, 0) + (leader + right >= lg) * (lg - right - leader - 1)
        end = start + kernel
    return [g + j * dilation for j in range(start, end)]


def axis_offset(i: int, j: int, kernel: int, dilation: int, length: int = 0,
                periodic: bool = False) -> int:
    """RPB column along one axis for query ``i`` and key ``j`` (offset in dilated units; on a
    periodic axis of ``length`` the representative of ``key - query`` modulo the group length
    that lies in the centred window's offsets ``[-(K // 2), K - 1 - K // 2]``)."""
    off = j // dilation - i // dilation
    if periodic:
        off = (off + kernel // 2) % _group_len(i, length, dilation) - kernel // 2
    return kernel - 1 + off


def _offsets(idx, key, kernel, dilation, shape, periodic):
    return tuple(axis_offset(i, j, kk, d, n, w)
                 for i, j, kk, d, n, w in zip(idx, key, kernel, dilation, shape, periodic))


def _bias(rpb, idx, keys, kernel, dilation, shape, periodic):
    """``[heads, W]`` bias of query ``idx`` towards each of its ``keys``."""
    offs = np.array([_offsets(idx, key, kernel, dilation, shape, periodic) for key in keys])
    return np.asarray(rpb, np.float64)[(slice(None), *offs.T)]


def _kv_heads(heads: int, heads_kv: int) -> np.ndarray:
    """Key/value head of every query head (grouped-query attention)."""
    assert heads % heads_kv == 0
    return np.arange(heads) // (heads // heads_kv)


def _neighbors(shape, kernel, stride, dilation, causal, periodic=None):
    """For each query (row-major), the list of key multi-indices and, per key, its window slot."""
    periodic = periodic or (False,) * len(shape)
    out = []
    for idx in itertools.product(*[range(n) for n in shape]):
        per_axis = [axis_window(i, n, k, s, d, c, w)
                    for i, n, k, s, d, c, w in zip(idx, shape, kernel, stride, dilation, causal,
                                                   periodic)]
        keys = list(itertools.product(*per_axis))
        slots = list(itertools.product(*[range(len(a)) for a in per_axis]))
        out.append((idx, keys, slots))
    return out


def _as_tuple(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def na_forward(q, k, v, kernel, stride=1, dilation=1, causal=False, scale=None, rpb=None,
               periodic=False, extra_k=None, extra_v=None):
    """Neighborhood attention in float64.

    Args: q ``[B, *spatial, heads, dim]``, k, v ``[B, *spatial, heads_kv, dim]``; rpb
    ``[heads, 2K-1, ...]`` or None; ``extra_k``, ``extra_v`` ``[B, L, heads_extra, dim]``
    (optional): keys every query sees besides its neighborhood, in the same softmax, unbiased.
    Returns: ``(out [B, *spatial, heads, dim_v], lse [B, *spatial, heads])``.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n = q.ndim - 3
    kernel, stride, dilation, causal, periodic = (
        _as_tuple(a, n) for a in (kernel, stride, dilation, causal, periodic))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    shape = q.shape[1:1 + n]
    heads = _kv_heads(q.shape[-2], k.shape[-2])
    out = np.zeros(q.shape[:-1] + v.shape[-1:])
    lse = np.zeros(q.shape[:-1])
    for idx, keys, _ in _neighbors(shape, kernel, stride, dilation, causal, periodic):
        qi = q[(slice(None), *idx)]  # [B, h, d]
        kidx = tuple(np.array(keys).T)
        kk, vv = k[(slice(None), *kidx)][:, :, heads], v[(slice(None), *kidx)][:, :, heads]
        logits = np.einsum("bhd,bwhd->bhw", qi, kk) * scale
        if rpb is not None:
            logits = logits + _bias(rpb, idx, keys, kernel, dilation, shape, periodic)[None]
        if extra_k is not None:
            eh = _kv_heads(q.shape[-2], extra_k.shape[-2])
            ek = np.asarray(extra_k, np.float64)[:, :, eh]
            ev = np.asarray(extra_v, np.float64)[:, :, eh]
            logits = np.concatenate([logits, np.einsum("bhd,blhd->bhl", qi, ek) * scale], -1)
            vv = np.concatenate([vv, ev], 1)
        m = logits.max(-1, keepdims=True)
        p = np.exp(logits - m)
        s = p.sum(-1, keepdims=True)
        out[(slice(None), *idx)] = np.einsum("bhw,bwhd->bhd", p / s, vv)
        lse[(slice(None), *idx)] = (m + np.log(s))[..., 0]
    return out, lse


def na_backward(q, k, v, dout, kernel, stride=1, dilation=1, causal=False, scale=None, rpb=None,
                periodic=False):
    """Analytic float64 gradients ``(dq, dk, dv, drpb)`` of ``sum(out * dout)`` (dk, dv summed
    over the query heads sharing a key/value head)."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    n = q.ndim - 3
    kernel, stride, dilation, causal, periodic = (
        _as_tuple(a, n) for a in (kernel, stride, dilation, causal, periodic))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    shape = q.shape[1:1 + n]
    heads = _kv_heads(q.shape[-2], k.shape[-2])
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    drpb = None if rpb is None else np.zeros(np.shape(rpb))
    for idx, keys, _ in _neighbors(shape, kernel, stride, dilation, causal, periodic):
        sl = (slice(None), *idx)
        qi, do = q[sl], dout[sl]
        kidx = tuple(np.array(keys).T)
        kk, vv = k[(slice(None), *kidx)][:, :, heads], v[(slice(None), *kidx)][:, :, heads]
        logits = np.einsum("bhd,bwhd->bhw", qi, kk) * scale
        if rpb is not None:
            logits = logits + _bias(rpb, idx, keys, kernel, dilation, shape, periodic)[None]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        dp = np.einsum("bhd,bwhd->bhw", do, vv)
        ds = p * (dp - (dp * p).sum(-1, keepdims=True))
        dq[sl] += np.einsum("bhw,bwhd->bhd", ds, kk) * scale
        dkk = np.einsum("bhw,bhd->bwhd", ds, qi) * scale
        dvv = np.einsum("bhw,bhd->bwhd", p, do)
        # Keys within one window are distinct, so plain fancy-index accumulation is exact; the
        # query heads of a group add onto their shared key/value head.
        for h, hk in enumerate(heads):
            dk[(slice(None), *kidx, hk)] += dkk[:, :, h]
            dv[(slice(None), *kidx, hk)] += dvv[:, :, h]
        if drpb is not None:
            offs = tuple(np.array([_offsets(idx, key, kernel, dilation, shape, periodic)
                                   for key in keys]).T)
            np.add.at(drpb, (slice(None), *offs), ds.sum(0))
    return dq, dk, dv, drpb


def na_qk(q, k, kernel, dilation=1, causal=False, scale=None, rpb=None, stride=1,
          periodic=False):
    """Logits ``[B, *spatial, heads, prod(K)]``, window slots row-major, -inf where a causal
    window has fewer than K keys. On a periodic axis slot ``j`` is the key at offset
    ``j - K // 2`` from the (leader) query."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n = q.ndim - 3
    kernel, dilation, causal, periodic = (
        _as_tuple(a, n) for a in (kernel, dilation, causal, periodic))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    shape = q.shape[1:1 + n]
    heads = _kv_heads(q.shape[-2], k.shape[-2])
    width = int(np.prod(kernel))
    out = np.full(q.shape[:-1] + (width,), -np.inf)
    strides = _as_tuple(stride, n)
    for idx, keys, slots in _neighbors(shape, kernel, strides, dilation, causal, periodic):
        qi = q[(slice(None), *idx)]
        for key, slot in zip(keys, slots):
            flat = int(np.ravel_multi_index(slot, kernel))
            val = np.einsum("bhd,bhd->bh", qi, k[(slice(None), *key)][:, heads]) * scale
            if rpb is not None:
                o = _offsets(idx, key, kernel, dilation, shape, periodic)
                val = val + np.asarray(rpb, np.float64)[(slice(None), *o)][None]
            out[(slice(None), *idx, slice(None), flat)] = val
    return out


def na_av(attn, v, kernel, dilation=1, causal=False, stride=1, periodic=False):
    """Weighted sum of window values: ``attn [B, *spatial, heads, prod(K)]``, ``v [B, *spatial,
    heads_kv, dim]`` -> ``[B, *spatial, heads, dim]``."""
    attn, v = np.asarray(attn, np.float64), np.asarray(v, np.float64)
    n = v.ndim - 3
    kernel, dilation, causal, periodic = (
        _as_tuple(a, n) for a in (kernel, dilation, causal, periodic))
    heads = _kv_heads(attn.shape[-2], v.shape[-2])
    out = np.zeros(attn.shape[:-1] + v.shape[-1:])
    strides = _as_tuple(stride, n)
    for idx, keys, slots in _neighbors(v.shape[1:1 + n], kernel, strides, dilation, causal,
                                       periodic):
        for key, slot in zip(keys, slots):
            flat = int(np.ravel_multi_index(slot, kernel))
            w = attn[(slice(None), *idx, slice(None), flat)]  # [B, h]
            out[(slice(None), *idx)] += w[..., None] * v[(slice(None), *key)][:, heads]
    return out
