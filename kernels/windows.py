"""Neighborhood windows and query tiling: the index arithmetic every backend shares.

Everything here is plain arithmetic on integer arrays, written against an array module ``xp``
(``numpy`` for tables built at trace time, ``jax.numpy`` for index math inside a kernel), so the
reference, the tiled XLA path and the Pallas kernels all derive their masks from one place.

Conventions (see NATTEN's rules, reproduced in ``shared/reference/na-semantics.md``):

* One axis of length ``L`` with dilation ``d`` is split into ``d`` interleaved groups; token ``i``
  lives in group ``i % d`` at *group coordinate* ``i // d``. Group ``g`` has
  ``L // d + (g < L % d)`` tokens. A query only sees keys of its own group.
* Within a group, NA is plain (undilated) NA over the group's length: the window of group
  coordinate ``ic`` is ``[start, end)`` in group coordinates, as returned by :func:`window_bounds`.
* Multi-dimensional NA is the Cartesian product of the per-axis windows.
* Periodic axes: the window is centred on the (leader) query, ``K // 2`` keys before and
  ``K // 2 - 1 + K % 2`` after, and wraps around the query's *dilation group* (group
  coordinates modulo that group's length) instead of shifting inwards. Window bounds on a
  periodic axis are *unwrapped* coordinates (``start`` may be negative, ``end`` may pass the
  group's end); the key of unwrapped coordinate ``c`` is ``c mod group_len``. Keeping them
  unwrapped keeps every rule below monotone in the query, and a key's unwrapped offset from
  its query is the wrapped offset RPB uses.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import numpy as np


def index(x: Any, xp: Any = np) -> Any:
    """``x`` as a strongly typed int32 index (scalar or array).

    Index math evaluated inside a kernel must never be weakly typed: Pallas's Triton lowering
    gives a weakly typed literal in a select the *predicate's* type (``arith.select`` with an
    ``i1`` operand and an ``i32`` result), a module XLA's Triton then refuses to parse. Every
    function below keeps its results int32 as long as its traced inputs are, and the one place
    a weak integer is born (a bool used as a count) goes through here."""
    return xp.asarray(x, dtype=xp.int32)


def group_length(length: int, dilation: int, group: Any, xp: Any = np) -> Any:
    """Number of tokens in dilation group(s) ``group`` of an axis of ``length`` tokens."""
    return length // dilation + index(group < length % dilation, xp)


def window_bounds(ic: Any, group_len: Any, kernel: int, stride: int, causal: bool, xp: Any = np,
                  periodic: bool = False):
    """Neighborhood ``[start, end)`` of group coordinate(s) ``ic`` along one axis.

    Args:
      ic: query group coordinate(s), any integer array (or scalar).
      group_len: length of the query's dilation group (broadcastable against ``ic``).
      kernel, stride: static window size and stride along this axis.
      causal: static; causal windows end at the query itself.
      xp: ``numpy`` or ``jax.numpy``.
      periodic: static; the window is centred on the leader and wraps around the group
        (never together with ``causal``; :func:`params.make_params` rejects that).

    Returns:
      ``(start, end)`` in group coordinates. Non-causal windows always hold exactly ``kernel``
      keys (shifted inwards at the borders, never padded); causal windows hold
      ``min(ic + 1, kernel)``-ish keys, fewer near the start. Periodic windows hold ``kernel``
      keys in *unwrapped* coordinates ``leader - kernel // 2 + [0, kernel)`` (reduce modulo
      ``group_len`` for the key).
    """
    left = kernel // 2
    right = kernel // 2 + (kernel % 2 - 1)
    assert not (causal and periodic), "causal and periodic on one axis"
    if periodic:
        leader = xp.minimum((ic // stride) * stride + stride // 2, group_len - 1)
        return leader - left, leader - left + kernel
    if causal:
        leader = xp.minimum((ic // stride) * stride + stride - 1, group_len - 1)
        start = xp.maximum(leader - left - right, 0)
        end = xp.minimum(ic + 1, group_len)
        return start, end
    leader = xp.minimum((ic // stride) * stride + stride // 2, group_len - 1)
    # NATTEN's rule, `max(leader - left, 0) + (leader + right >= L) * (L - right - leader - 1)`,
    # is a clamp of the centred start into [0, L - K] whenever K <= L (which validation ensures).
    start = xp.minimum(xp.maximum(leader - left, 0), group_len - kernel)
    return start, start + kernel


def _axis_tables(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                 periodic: bool = False):
    """Per-token window bounds of one axis in *original* token order (group coordinates), and
    the length of each token's group."""
    i = np.arange(length)
    g, ic = i % dilation, i // dilation
    glen = group_length(length, dilation, g)
    start, end = window_bounds(ic, glen, kernel, stride, causal, periodic=periodic)
    return g, ic, start, end, glen


def interleave_axis(arr: Any, axis: int, rank: int, slots: int) -> Any:
    """Reshape a per-axis table so its dims land at positions ``axis, axis + rank, ...`` of a
    ``slots * rank``-dim layout (e.g. ``[d1..dn, nt1..ntn, T1..Tn, H1..Hn]``), size 1 elsewhere,
    ready to broadcast against the other axes' tables."""
    shape = [1] * (slots * rank)
    for k in range(arr.ndim):
        shape[axis + k * rank] = arr.shape[k]
    return arr.reshape(shape)


@functools.lru_cache(maxsize=512)
def neighbor_indices(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                     periodic: bool = False):
    """Original key indices of every query's window along one axis.

    Returns:
      ``(idx, valid)``, both ``[length, kernel]``: slot ``j`` of query ``i`` holds key
      ``g + (start + j) * dilation`` (periodic: ``g + ((start + j) mod group_len) * dilation``,
      i.e. the key at offset ``j - kernel // 2`` from the leader); ``valid`` is False for slots
      past the window end (only causal windows have those; their ``idx`` is clamped to a real
      token).
    """
    g, _, start, end, glen = _axis_tables(length, kernel, stride, dilation, causal, periodic)
    slot = start[:, None] + np.arange(kernel)[None, :]
    valid = slot < end[:, None]
    slot = np.minimum(slot, end[:, None] - 1)
    if periodic:
        slot = slot % glen[:, None]
    idx = g[:, None] + slot * dilation
    idx.setflags(write=False)
    valid.setflags(write=False)
    return idx, valid


@functools.lru_cache(maxsize=512)
def rpb_indices(length: int, kernel: int, dilation: int, periodic: bool = False):
    """RPB column of every (query, window slot) pair along one axis, ``[length, kernel]``.

    The bias of a key ``kernel - 1 + (key_g - query_g)`` depends on the offset in dilated units
    (stride 1, non-causal: the only case RPB is defined for). On a periodic axis the offset is
    the wrapped one (unwrapped coordinates), so only the centre ``kernel`` columns occur.
    """
    _, ic, start, _, _ = _axis_tables(length, kernel, 1, dilation, False, periodic)
    slot = start[:, None] + np.arange(kernel)[None, :]
    out = kernel - 1 + slot - ic[:, None]
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# Query tiling with a uniform key halo (the XLA path).


@dataclasses.dataclass(frozen=True)
class HaloPlan:
    """How one axis is regrouped by dilation and cut into query tiles with a *uniform* key halo.

    Token ``i`` goes to group ``i % dilation``, group row ``i // dilation``; each group is padded
    to ``num_tiles * tile`` query rows. Query tile ``t`` sees the key rows
    ``t * tile - offset + [0, halo)`` of its group: the same shift for every tile, so halos are
    slices of a padded array (no gather) and a key's offset from a query,
    ``h - offset - q`` for halo slot ``h`` and tile row ``q``, does not depend on the tile (one
    RPB table serves every tile). ``mask[g, t, q, h]`` says whether halo slot ``h`` is in the
    window of tile row ``q`` (keys outside the group, including the padding, never are; padded
    query rows have no keys).

    On a periodic axis the key rows are unwrapped coordinates: halo row ``r`` holds the group's
    row ``r mod group_len`` (:meth:`source_tokens`), so a key can sit in a halo more than once,
    but only one copy lies in any window (``kernel <= group_len``).
    """

    length: int
    kernel: int
    stride: int
    dilation: int
    causal: bool
    tile: int
    rows: int  # ceil(length / dilation): rows per group after regrouping (before tile padding)
    num_tiles: int
    offset: int
    halo: int
    mask: np.ndarray  # [dilation, num_tiles, tile, halo] bool
    periodic: bool = False

    @property
    def halo_rows(self) -> int:
        """Key rows per group that the halos are cut from: every tile's halo, tile-aligned."""
        return (self.num_tiles + -(-self.halo // self.tile) - 1) * self.tile

    def source_tokens(self) -> np.ndarray:
        """``[halo_rows * dilation]`` original token index of halo row ``e`` of group ``g`` at
        ``e * dilation + g`` (periodic axes): unwrapped group row ``e - offset`` wraps modulo
        the group's own length."""
        assert self.periodic
        glen = _group_lengths_column(self.length, self.dilation)  # [d, 1]
        rows = (np.arange(self.halo_rows)[None, :] - self.offset) % glen
        src = np.arange(self.dilation)[:, None] + rows * self.dilation  # [d, halo_rows]
        return src.T.reshape(-1)

    def rel(self) -> np.ndarray:
        """``[tile, halo]`` RPB column ``kernel - 1 + key - query`` (stride 1, non-causal; clipped
        into the table where the slot is masked anyway)."""
        off = self.kernel - 1 - self.offset + np.arange(self.halo)[None, :] \
            - np.arange(self.tile)[:, None]
        return np.clip(off, 0, 2 * self.kernel - 2).astype(np.int32)

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """``(halo_slot, valid)``, both ``[dilation, num_tiles, tile, kernel]``: the halo slot
        holding window slot ``j`` of tile row ``q`` (window slot ``j`` = key ``start + j``, as
        :func:`neighbor_indices`), and whether that slot is in the window (False past a causal
        window's end and on padded query rows; the slot is then clamped to a real halo slot)."""
        glen = _group_lengths_column(self.length, self.dilation)[..., None, None]  # [d,1,1,1]
        t = np.arange(self.num_tiles)[:, None, None]
        q = t * self.tile + np.arange(self.tile)[:, None]  # [nt, tile, 1]
        start, end = window_bounds(np.minimum(q, glen - 1), glen, self.kernel, self.stride,
                                   self.causal, periodic=self.periodic)
        slot = start + np.arange(self.kernel)  # [d, nt, tile, kernel]
        valid = (slot < end) & (q < glen)
        halo_slot = np.minimum(slot, end - 1) - (t * self.tile - self.offset)
        return np.clip(halo_slot, 0, self.halo - 1).astype(np.int32), valid


def _group_lengths_column(length: int, dilation: int) -> np.ndarray:
    """``[dilation, 1]`` length of every dilation group."""
    return group_length(length, dilation, np.arange(dilation)[:, None])


def _uniform_halo(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                  tile: int, periodic: bool = False) -> tuple[int, int, int, int]:
    """``(tile, num_tiles, offset, halo)``: the smallest uniform halo covering every query
    tile's :func:`tile_box` (one-row key tiles) in every dilation group."""
    rows = -(-length // dilation)
    tile = max(1, min(tile, rows))
    num_tiles = -(-rows // tile)
    t = np.arange(num_tiles)[None, :]
    lo, hi = tile_box(t, tile, 1, _group_lengths_column(length, dilation), kernel, stride,
                      causal, periodic=periodic)
    offset = int((t * tile - lo).max())
    halo = int((hi - t * tile).max()) + offset
    return tile, num_tiles, offset, halo


@functools.lru_cache(maxsize=512)
def halo_plan(length: int, kernel: int, stride: int, dilation: int, causal: bool,
              tile: int, periodic: bool = False) -> HaloPlan:
    """Build the static plan of one axis (numpy, cached); the mask is :func:`in_window`, the
    arithmetic the Pallas kernels evaluate in-kernel."""
    tile, num_tiles, offset, halo = _uniform_halo(length, kernel, stride, dilation, causal, tile,
                                                  periodic)
    glen = _group_lengths_column(length, dilation)[..., None, None]  # [d, 1, 1, 1]
    t = np.arange(num_tiles)[:, None, None]
    keys = t * tile - offset + np.arange(halo)  # [nt, 1, halo]
    q = t * tile + np.arange(tile)[:, None]  # [nt, tile, 1]
    # Query rows past the group's end (tile padding) get no keys at all: their results are
    # cropped, and in the backward pass they must contribute nothing (not even 0 * nan).
    mask = in_window(q, keys, glen, kernel, stride, causal, periodic=periodic) & (q < glen)
    mask.setflags(write=False)  # [d, nt, tile, halo]
    return HaloPlan(length, kernel, stride, dilation, causal, tile, -(-length // dilation),
                    num_tiles, offset, halo, mask, periodic)


@functools.lru_cache(maxsize=512)
def xla_tile_sizes(shape: tuple[int, ...], kernel: tuple[int, ...],
                   dilation: tuple[int, ...], stride: tuple[int, ...] | None = None,
                   causal: tuple[bool, ...] | None = None, head_dim: int = 32,
                   periodic: tuple[bool, ...] | None = None) -> tuple[int, ...]:
    """Query tile per axis for the XLA path, from a small cost model fitted on CPU.

    Every (padded) query computes logits against its tile's whole halo (``Hk`` keys). Measured
    per-logit cost (fwd+bwd, 112x112, K=7, 2026-11-22, shared 2-core CPU, interleaved): small
    tiles pay for small matmuls (4x4: 304 ms, 4x8: 248, 7x7: 198, 8x8: 205), large ones for
    logits that leave the cache (8x16: 356, 14x14: 448, 16x16: 559). Model per query:
    ``Hk * (1 + 48 / Tq) * max(1, Tq * Hk * 4 bytes / 256 KiB)``; ties go to the smaller tile.
    ``head_dim`` is accepted for future use (the fit is for head_dim 32).
    """
    del head_dim
    rank = len(shape)
    stride = stride or (1,) * rank
    causal = causal or (False,) * rank
    periodic = periodic or (False,) * rank
    limit = {1: 512, 2: 32, 3: 16}.get(rank, 16)
    per_axis = []
    for n, k, s, d, c, w in zip(shape, kernel, stride, dilation, causal, periodic):
        rows = -(-n // d)
        opts = set()
        for t in range(1, min(rows, limit) + 1):
            t, nt, _, halo = _uniform_halo(n, k, s, d, c, t, w)
            opts.add((t, d * nt * t, halo))
        per_axis.append(sorted(opts))
    best = None
    for combo in itertools.product(*per_axis):
        tq = math.prod(o[0] for o in combo)
        hk = math.prod(o[2] for o in combo)
        queries = math.prod(o[1] for o in combo)
        cost = queries * hk * (1 + 48 / tq) * max(1.0, tq * hk * 4 / 2**18)
        key = (cost, tq)
        if best is None or key < best[0]:
            best = (key, tuple(o[0] for o in combo))
    return best[1]


def na_flops(batch: int, heads: int, shape: tuple[int, ...], kernel: tuple[int, ...],
             head_dim: int, head_dim_v: int | None = None, additional_tokens: int = 0) -> int:
    """Forward FLOPs of one NA call by NATTEN's convention: what the math needs, not the tiles
    an implementation computes. Each query meets ``prod(kernel)`` keys (causal masking and
    stride are not subtracted, as NATTEN counts) plus ``additional_tokens`` extra keys:
    ``2 * B * heads * N * keys * (head_dim + head_dim_v)`` (``q.k`` and ``p.v``; softmax not
    counted). Without ``head_dim_v`` (= ``head_dim``) and extra tokens this is NATTEN's
    ``4 * B * heads * N * prod(K) * head_dim``. A backward pass is counted as 2.5x the forward.

    Args:
      batch, heads: batch size and query heads (grouped-query attention counts query heads).
      shape: spatial shape ``(L,)``, ``(X, Y)`` or ``(X, Y, Z)``.
      kernel: window size per axis.
      head_dim, head_dim_v: query/key and value head dims.
      additional_tokens: extra global keys every query also attends to.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    keys = math.prod(kernel) + additional_tokens
    return 2 * batch * heads * math.prod(shape) * keys * (head_dim + head_dim_v)


# --------------------------------------------------------------------------------------------
# Tile boxes: which key tiles a query tile needs (and the inverse), per axis, in group rows.
# Written against ``xp`` so the Pallas kernels evaluate them on traced scalars (program ids) and
# the static extents below come from the very same formulas in numpy.


def in_window(qc: Any, kc: Any, group_len: Any, kernel: int, stride: int, causal: bool,
              xp: Any = np, periodic: bool = False) -> Any:
    """Whether key group coordinate(s) ``kc`` lie in the window of query coordinate(s) ``qc``
    (broadcasting). Query rows past the group's end (tile padding) borrow the last row's window,
    so every row has keys; keys past the end are never inside a window. On a periodic axis
    ``kc`` is an unwrapped coordinate (see the module docstring)."""
    start, end = window_bounds(xp.minimum(qc, group_len - 1), group_len, kernel, stride, causal,
                               xp=xp, periodic=periodic)
    return (kc >= start) & (kc < end)


def tile_box(tile: Any, q_tile: int, kv_tile: int, group_len: Any, kernel: int, stride: int,
             causal: bool, xp: Any = np, periodic: bool = False):
    """Key tiles ``[lo, hi)`` (tiles of ``kv_tile`` rows) holding every key that a query of query
    tile ``tile`` (tiles of ``q_tile`` rows) attends to along one axis.

    Window starts and ends grow monotonically with the query, so the box runs from the window
    start of the tile's first query to the window end of its last (padded rows clamp to the last
    real row)."""
    first = xp.minimum(tile * q_tile, group_len - 1)
    last = xp.minimum(tile * q_tile + q_tile - 1, group_len - 1)
    start, _ = window_bounds(first, group_len, kernel, stride, causal, xp=xp, periodic=periodic)
    _, end = window_bounds(last, group_len, kernel, stride, causal, xp=xp, periodic=periodic)
    return start // kv_tile, (end + kv_tile - 1) // kv_tile


def _first_true(pred, size: Any, max_size: int, xp: Any):
    """Smallest ``i`` in ``[0, size)`` with monotone ``pred(i)`` true, else ``size``: bisection
    with a static step count, so it unrolls into plain scalar arithmetic inside a kernel."""
    hi = index(size, xp)
    lo = xp.zeros_like(hi)
    for _ in range(max(1, int(max_size).bit_length() + 1)):
        mid = (lo + hi) // 2
        ok = pred(xp.minimum(mid, size - 1)) & (mid < hi)
        hi = xp.where(ok, mid, hi)
        lo = xp.where(ok, lo, xp.minimum(mid + 1, hi))
    return hi


def query_span(key_lo: Any, key_hi: Any, group_len: Any, max_len: int, kernel: int, stride: int,
               causal: bool, xp: Any = np):
    """Queries ``[lo, hi)`` whose windows meet keys ``[key_lo, key_hi]`` (inclusive), one axis.

    ``max_len`` is a static bound on ``group_len`` (it fixes the bisection depth). Because window
    starts and ends are monotone in the query, the queries seeing a key range are contiguous:
    from the first whose window ends after ``key_lo`` to the last whose window starts at or
    before ``key_hi``.
    """
    def bounds(i):
        return window_bounds(i, group_len, kernel, stride, causal, xp=xp)

    lo = _first_true(lambda i: bounds(i)[1] > key_lo, group_len, max_len, xp)
    hi = _first_true(lambda i: bounds(i)[0] > key_hi, group_len, max_len, xp)
    return lo, hi


def inverse_tile_box(tile: Any, kv_tile: int, q_tile: int, group_len: Any, max_len: int,
                     kernel: int, stride: int, causal: bool, xp: Any = np):
    """Query tiles ``[lo, hi)`` whose queries attend to some key of key tile ``tile`` (the inverse
    of :func:`tile_box`, used by the dK/dV pass). Empty (``lo >= hi``) for pure padding tiles."""
    key_lo = tile * kv_tile
    key_hi = xp.minimum(key_lo + kv_tile - 1, group_len - 1)
    lo, hi = query_span(key_lo, key_hi, group_len, max_len, kernel, stride, causal, xp=xp)
    hi = xp.where(key_lo < group_len, hi, lo)
    return lo // q_tile, (hi + q_tile - 1) // q_tile


def _group_lengths(length: int, dilation: int) -> np.ndarray:
    return np.unique(group_length(length, dilation, np.arange(dilation)))


@functools.lru_cache(maxsize=1024)
def tile_box_extent(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                    q_tile: int, kv_tile: int) -> int:
    """Largest :func:`tile_box` width (in key tiles) over all query tiles and dilation groups of
    one axis: the static trip count of a kernel's key loop along that axis."""
    rows = -(-length // dilation)
    width = 1
    for glen in _group_lengths(length, dilation):
        t = np.arange(-(-rows // q_tile))
        lo, hi = tile_box(t, q_tile, kv_tile, glen, kernel, stride, causal)
        width = max(width, int((hi - lo).max()))
    return width


@functools.lru_cache(maxsize=1024)
def inverse_tile_box_extent(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                            q_tile: int, kv_tile: int) -> int:
    """Largest :func:`inverse_tile_box` width (in query tiles) over all key tiles and groups."""
    rows = -(-length // dilation)
    width = 1
    for glen in _group_lengths(length, dilation):
        t = np.arange(-(-rows // kv_tile))
        lo, hi = inverse_tile_box(t, kv_tile, q_tile, glen, rows, kernel, stride, causal)
        width = max(width, int((hi - lo).max()))
    return width


def clamp_box(lo: Any, width: int, num_tiles: int, xp: Any = np) -> Any:
    """Shift a box start so ``[lo, lo + width)`` stays inside ``[0, num_tiles)``; the shifted box
    still covers the original ``[lo, hi)`` whenever ``hi - lo <= width`` and ``hi <= num_tiles``."""
    return xp.maximum(xp.minimum(lo, num_tiles - width), 0)


def tile_inside_windows(first_q: Any, last_q: Any, key_lo: Any, key_hi: Any, group_len: Any,
                        kernel: int, stride: int, causal: bool, xp: Any = np) -> Any:
    """Whether every key of ``[key_lo, key_hi)`` lies in the window of every query of
    ``[first_q, last_q]`` along one axis (query rows clamped to the group as in
    :func:`in_window`). Such a tile pair needs no per-element mask. Window starts and ends are
    monotone in the query, so the latest start and the earliest end decide."""
    start, _ = window_bounds(xp.minimum(last_q, group_len - 1), group_len, kernel, stride, causal,
                             xp=xp)
    _, end = window_bounds(xp.minimum(first_q, group_len - 1), group_len, kernel, stride, causal,
                           xp=xp)
    return (start <= key_lo) & (end >= key_hi)


def offset_range(first_q: Any, last_q: Any, group_len: Any, kernel: int, causal: bool,
                 xp: Any = np):
    """Relative offsets ``key - query`` (inclusive ``[lo, hi]``) that occur in the windows of
    queries ``[first_q, last_q]`` along one axis, for stride 1 (the RPB case). With stride 1,
    window starts and ends advance by at most one per query, so ``start - query`` and
    ``end - 1 - query`` never increase: the last query has the lowest offset, the first the
    highest. Interior tiles see just ``kernel`` offsets, border tiles up to ``2 * kernel - 1``."""
    first = xp.minimum(first_q, group_len - 1)
    last = xp.minimum(last_q, group_len - 1)
    start, _ = window_bounds(last, group_len, kernel, 1, causal, xp=xp)
    _, end = window_bounds(first, group_len, kernel, 1, causal, xp=xp)
    return start - last, end - 1 - first
