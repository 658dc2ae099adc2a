"""Tiled neighborhood attention in plain XLA: the portable fast path (CPU, GPU, TPU).

Algorithm (per call; every table is static, built once in numpy by :mod:`windows`):

1. Dilation: every axis is regrouped so that each dilation group is contiguous
   (``i -> (i // d, i % d)``); the groups become batch-like axes and the problem is NA with
   dilation 1 inside each group.
2. Queries are cut into multi-dimensional tiles (:func:`windows.xla_tile_sizes`). Every tile
   sees a key box ("halo") at the *same* offset from its first query
   (:func:`windows.halo_plan`), so halos are built by padding and slicing (no gather; its
   transpose in the backward pass is a pad-and-add, not a scatter), and the relative position
   of halo slot ``h`` to tile row ``q`` is the same in every tile: RPB is one ``[heads, Tq,
   Hk]`` table shared by all tiles, and its gradient one reduction.
3. Inside a tile: dense attention with batched matmuls, fp32 logits and softmax, the exact
   per-element window mask (built in-graph from small per-axis tables).
4. Results go back by the inverse regrouping.

Grouped-query attention (key/value with ``heads_kv < heads``): the ``heads // heads_kv`` query
heads that share a key/value head are folded into the rows of each query tile (logits
``[B*heads_kv, tiles, group*Tq, Hk]``), so each key/value halo is built once and serves its
whole group; key and value are never repeated per query head, and their gradients come out
summed over the group by the same contractions.

Periodic axes: a tile's halo is cut from the group's rows *wrapped* around the group
(:meth:`windows.HaloPlan.source_tokens`, built by slicing and concatenating when the wrap is a
few contiguous runs, as it is whenever the dilation divides the length, else one static gather),
so the halo arithmetic, mask and RPB table stay those of unwrapped coordinates.

Memory is ``O(tokens * halo)``: no ``O(tokens^2)`` term and no ``[tokens, K^2, head_dim]``
gather. When the logits would exceed ``_LOGITS_BUDGET`` bytes, (batch, head) pairs (or, for one
large pair, its tiles) are processed in chunks inside a ``fori_loop``.

Backward: an explicit flash-style ``custom_vjp``. It keeps the tiled queries, key/value halos,
output and logsumexp from the forward pass (no layout work is redone) and recomputes the
probabilities. Unlike autodiff it controls every contraction, which non-finite containment
needs (below). Re-measured against autodiff of this forward (2026-11-22, 112x112, 2 heads,
K=7, RPB, fwd+bwd, interleaved, load ~7, ``benchmarks/na_ab.py --autodiff``): 302 ms vs 486 ms
(1.6x), where the previous gather-based path's autodiff took 566 ms. Keeping the forward's
probabilities instead of recomputing them measured no faster (interleaved, load 13-16:
1038 vs 1052 ms at 112x112, 2990 vs 3072 ms at 56x56 batch 16) and costs ``O(tokens * halo)``
memory, so they are recomputed.

Non-finite containment. Dense in-tile matmuls multiply masked entries (exact zeros) by operand
rows outside a query's window, and ``0 * nan = nan``: one NaN value would poison every query of
its tile's neighbours. Masked logits are ``-inf``, so the probabilities outside the windows
are exact zeros as long as each row's logsumexp is finite (the clean path skips a select
there), and ``ds`` is masked with a select; leaks can then only come from the four contraction
operands that are inputs: ``v`` (forward ``p @ v``), ``k`` (``dq = ds @ k``), ``q`` (``dk =
ds^T @ q``) and the output cotangent (``dv = p^T @ do``), or from a non-finite logsumexp (a
non-finite bias). When one of those holds a non-finite value (checked with one reduction
each), ``lax.cond`` runs the *contained* variant of the same tiled computation: sanitized operands
(non-finite -> 0) plus indicator matmuls that make an element non-finite exactly when a window
really holds a non-finite value of its contraction. Elements whose windows hold no non-finite
value are bitwise what finite inputs give. The contained path has the same tiling and memory
profile (XLA reserves memory for both branches of a conditional); under ``vmap`` the predicate
is batched and both branches run (correct, slower). :func:`na_fused_contained` and
:func:`na_backward_contained` expose it for other backends to fall back to.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from nat_jax.kernels import sharding, windows
from nat_jax.kernels.params import NAParams

# Non-finite containment (module docstring) on every backend that uses this module's helpers
# (xla, pallas, pallas_tpu), decided when a function is traced. Compile-only measurements turn it
# off: XLA's cost analysis adds up both branches of a conditional, so the never-taken contained
# branch would double a program's counted FLOPs and bytes. Results with non-finite inputs are
# then unspecified outside the windows that hold them.
NONFINITE_CONTAINMENT = True

# Bytes of fp32 logits per chunk of (batch, head) pairs; None picks per platform. On CPU,
# chunks that stay in cache measured ~2x faster at 112x112 and 224x224; accelerators prefer
# few, large chunks. (Compiled for v5e, a nat_mini stage-1 layer's forward + backward at 128
# images per chip needs 5.6 GB of temporaries with any budget from 16 MiB to 1 GiB, 8.5 GB with
# non-finite containment: the tiled layout and residuals, not the chunk, set its memory.)
_LOGITS_BUDGET: int | None = None


# Window masks ([tiles, Tq, Hk] bool, one byte per logit of one (batch, head) pair) up to this
# size are compile-time constants. Built in-graph, XLA:CPU spent ~2-4 ms per call on the index
# arithmetic of the 2 MB mask of a 112x112, K=7 layer; far larger masks (long 1-D windows) stay
# in-graph so that no program embeds them.
_MASK_CONSTANT_BYTES = 1 << 23


@contextlib.contextmanager
def logits_budget(nbytes: int | None) -> Iterator[None]:
    """Trace with the logits chunked at ``nbytes`` (None: the per-platform default) inside the
    ``with`` block, e.g. ``1 << 62`` for no chunk loop at all: XLA's cost analysis counts a
    loop's body once, so a program compiled to be counted should have none."""
    global _LOGITS_BUDGET
    old, _LOGITS_BUDGET = _LOGITS_BUDGET, nbytes
    try:
        yield
    finally:
        _LOGITS_BUDGET = old


@contextlib.contextmanager
def counted_whole() -> Iterator[None]:
    """Trace inside the ``with`` block as XLA's cost analysis can count a program whole: no
    non-finite containment (a conditional, both of whose branches it adds up) and no chunk loop
    (whose body it counts once). The work of a call on finite inputs; not the memory a program
    with containment needs."""
    global NONFINITE_CONTAINMENT
    old, NONFINITE_CONTAINMENT = NONFINITE_CONTAINMENT, False
    try:
        with logits_budget(1 << 62):
            yield
    finally:
        NONFINITE_CONTAINMENT = old


def _logits_budget() -> int:
    """Per platform: the context mesh's (a TPU program compiled on a CPU host is chunked as
    on a TPU), else the default backend's."""
    if _LOGITS_BUDGET is not None:
        return _LOGITS_BUDGET
    platform = sharding.mesh_platform() or jax.default_backend()
    return 1 << 24 if platform == "cpu" else 1 << 30


# ------------------------------------------------------------------------------------- layout


def _plans(spatial: tuple[int, ...], p: NAParams, head_dim: int,
           tile_sizes: tuple[int, ...] | None) -> tuple[windows.HaloPlan, ...]:
    if tile_sizes is None:
        tile_sizes = windows.xla_tile_sizes(spatial, p.kernel_size, p.dilation, p.stride,
                                            p.is_causal, head_dim, p.is_periodic)
    return tuple(windows.halo_plan(spatial[a], p.kernel_size[a], p.stride[a], p.dilation[a],
                                   p.is_causal[a], tile_sizes[a], p.is_periodic[a])
                 for a in range(p.rank))


def _fit(x: jax.Array, axis: int, before: int, total: int) -> jax.Array:
    """Pad ``before`` zeros in front of ``axis``, then pad or crop it to ``total``."""
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    [(before, 0, 0) if a == axis else (0, 0, 0) for a in range(x.ndim)])
    size = x.shape[axis]
    if size > total:
        return jax.lax.slice_in_dim(x, 0, total, axis=axis)
    return jax.lax.pad(x, jnp.zeros((), x.dtype),
                       [(0, total - size, 0) if a == axis else (0, 0, 0) for a in range(x.ndim)])


def _regroup(x: jax.Array, plans, rows_per_axis) -> jax.Array:
    """``[B, *spatial, h, c]`` -> ``[B, h, *dil, *(rows x per axis)], c]`` (zero padded):
    ``rows_per_axis[a]`` is a tuple of sizes the group rows of axis ``a`` are split into."""
    b, h, c = x.shape[0], x.shape[-2], x.shape[-1]
    for a, (pl, rows) in enumerate(zip(plans, rows_per_axis)):
        x = _fit(x, 1 + a, 0, math.prod(rows) * pl.dilation)
    split = [b]
    for pl, rows in zip(plans, rows_per_axis):
        split += [*rows, pl.dilation]
    x = x.reshape(*split, h, c)
    # positions of each axis' pieces in `split`
    pos, at = [], 1
    for rows in rows_per_axis:
        pos.append(list(range(at, at + len(rows) + 1)))
        at += len(rows) + 1
    perm = [0, at] + [q[-1] for q in pos]
    depth = max(len(r) for r in rows_per_axis)
    for level in range(depth):
        perm += [q[level] for q, rows in zip(pos, rows_per_axis) if level < len(rows)]
    return jnp.transpose(x, perm + [at + 1])


def _to_tiles(x: jax.Array, plans) -> jax.Array:
    """``[B, *spatial, h, c]`` -> ``[B, h, G, NT, Tq, c]`` query tiles (zero padded)."""
    b, h, c = x.shape[0], x.shape[-2], x.shape[-1]
    x = _regroup(x, plans, [(pl.num_tiles, pl.tile) for pl in plans])
    g = math.prod(pl.dilation for pl in plans)
    nt = math.prod(pl.num_tiles for pl in plans)
    return x.reshape(b, h, g, nt, -1, c)


def _take_tokens(x: jax.Array, axis: int, src: np.ndarray) -> jax.Array:
    """``x`` indexed by the static ``src`` along ``axis``. Contiguous runs of ``src`` become
    slices joined by one concatenation (their transpose pads and adds); only a wrap made of many
    short runs (dilation not dividing the length) takes a gather, whose transpose scatters."""
    breaks = np.flatnonzero(np.diff(src) != 1) + 1
    if len(breaks) >= 8:
        return jnp.take(x, jnp.asarray(src, jnp.int32), axis=axis)
    runs = np.split(src, breaks)
    parts = [jax.lax.slice_in_dim(x, int(r[0]), int(r[-1]) + 1, axis=axis) for r in runs]
    return jnp.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]


def _to_halos(x: jax.Array, plans, slots_minor: bool = False) -> jax.Array:
    """``[B, *spatial, h, c]`` -> ``[B, h, G, NT, Hk, c]`` (``[B, h, G, NT, c, Hk]`` with
    ``slots_minor``): each tile's key box. Along each axis
    the padded group rows are cut into tiles and every tile is joined with the start of the
    next ones (slices and a concatenation: no gather). A periodic axis first takes its wrapped
    halo rows (:meth:`windows.HaloPlan.source_tokens`), which then need no padding."""
    n = len(plans)
    b, h, c = x.shape[0], x.shape[-2], x.shape[-1]
    for a, pl in enumerate(plans):
        if pl.periodic:
            x = _take_tokens(x, 1 + a, pl.source_tokens())
    rows = [(pl.halo_rows if pl.periodic else pl.rows,) for pl in plans]
    x = _regroup(x, plans, rows)  # [B, h, *dil, *rows, c]
    for a, pl in enumerate(plans):
        ax = 2 + n + 2 * a  # rows of axis a (earlier axes are already (nt, H) pairs)
        m = -(-pl.halo // pl.tile)
        x = _fit(x, ax, 0 if pl.periodic else pl.offset, pl.halo_rows)
        x = x.reshape(*x.shape[:ax], pl.num_tiles + m - 1, pl.tile, *x.shape[ax + 1:])
        parts = [jax.lax.slice_in_dim(x, j, j + pl.num_tiles, axis=ax) for j in range(m)]
        x = jnp.concatenate(parts, axis=ax + 1) if m > 1 else parts[0]
        x = jax.lax.slice_in_dim(x, 0, pl.halo, axis=ax + 1)
    # [B, h, *dil, nt0, H0, nt1, H1, ..., c] -> [B, h, *dil, *nt, *H, c]
    lead = 2 + n
    slots = [lead + 2 * a + 1 for a in range(n)]
    perm = list(range(lead)) + [lead + 2 * a for a in range(n)] \
        + ([lead + 2 * n] + slots if slots_minor else slots + [lead + 2 * n])
    x = jnp.transpose(x, perm)
    g = math.prod(pl.dilation for pl in plans)
    nt = math.prod(pl.num_tiles for pl in plans)
    return x.reshape(b, h, g, nt, c, -1) if slots_minor else x.reshape(b, h, g, nt, -1, c)


def _from_tiles(y: jax.Array, plans, spatial: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_to_tiles` on the real tokens: ``[B, h, G, NT, Tq, c]`` ->
    ``[B, *spatial, h, c]``."""
    b, h, c = y.shape[0], y.shape[1], y.shape[-1]
    shape = jax.ShapeDtypeStruct((b, *spatial, h, c), y.dtype)
    (x,) = jax.linear_transpose(lambda x: _to_tiles(x, plans), shape)(y)
    return x


def _fold_halos(y: jax.Array, plans, spatial: tuple[int, ...], slots_minor: bool = False
                ) -> jax.Array:
    """Transpose of :func:`_to_halos`: sums each halo slot back onto its token
    (``[B, h, G, NT, Hk, c]`` or, ``slots_minor``, ``[B, h, G, NT, c, Hk]`` -> ``[B, *spatial,
    h, c]``; pads and adds, no scatter)."""
    b, h, c = y.shape[0], y.shape[1], y.shape[-2 if slots_minor else -1]
    shape = jax.ShapeDtypeStruct((b, *spatial, h, c), y.dtype)
    (x,) = jax.linear_transpose(lambda x: _to_halos(x, plans, slots_minor), shape)(y)
    return x


def _mask(plans, xp=jnp):
    """``[G, NT, Tq, Hk]`` window mask from the small per-axis tables, computed by ``xp``:
    numpy (a compile-time constant) or jax.numpy (in-graph)."""
    n = len(plans)
    mask = xp.ones((), bool)
    for a, pl in enumerate(plans):
        mask = mask & windows.interleave_axis(xp.asarray(pl.mask), a, n, 4)
    full = (tuple(pl.dilation for pl in plans) + tuple(pl.num_tiles for pl in plans)
            + tuple(pl.tile for pl in plans) + tuple(pl.halo for pl in plans))
    mask = xp.broadcast_to(mask, full)
    return mask.reshape(math.prod(full[:n]), math.prod(full[n:2 * n]),
                        math.prod(full[2 * n:3 * n]), -1)


def _rel(plans) -> np.ndarray:
    """``[Tq, Hk]`` flat RPB index shared by every tile."""
    n = len(plans)
    flat = np.zeros((), np.int64)
    for a, pl in enumerate(plans):
        flat = flat * (2 * pl.kernel - 1) + windows.interleave_axis(pl.rel(), a, n, 2)
    full = tuple(pl.tile for pl in plans) + tuple(pl.halo for pl in plans)
    return np.broadcast_to(flat, full).reshape(math.prod(full[:n]), -1).astype(np.int32)


# ------------------------------------------------------------------------------- tile compute


def _bad(x: jax.Array) -> jax.Array:
    return jnp.logical_not(jnp.isfinite(x))


def _clean(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _hits(pattern: jax.Array, bad: jax.Array, spec: str) -> jax.Array:
    """Indicator matmul: how many non-finite operand entries each result element contracts
    within its windows (``pattern`` is the 0/1 window mask, ``bad`` the 0/1 indicator)."""
    return jnp.einsum(spec, pattern.astype(jnp.float32), bad.astype(jnp.float32))


def _scores(qt, kh, bias, mask, scale):
    """``[C, N, Tq, Hk]`` masked logits; ``qt [C, N, Tq, d]``, ``kh [C, N, d, Hk]`` (key halos
    are kept with their slots minor, see :func:`_layout`), ``bias [C or H, Tq, Hk]`` or None,
    ``mask [N, Tq, Hk]``."""
    s = jnp.einsum("cnqd,cndk->cnqk", qt, kh, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        # bias holds one row per pair, or one per head for a chunk of whole batches (pairs are
        # batch-major): either way pair c takes row c % len(bias).
        c, h = s.shape[0], bias.shape[0]
        s = (s.reshape(c // h, h, *s.shape[1:]) + bias[None, :, None]).reshape(s.shape)
    return jnp.where(mask, s, -jnp.inf)


def _forward_tiles(qt, kh, vh, bias, *, mask, scale: float, contained: bool):
    """One chunk of tiles: ``(out [C, N, Tq, dv] in v's dtype, lse [C, N, Tq] f32)``."""
    s = _scores(qt, kh, bias, mask, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    # Masked logits are -inf, so exp gives them exact zeros without a select over the logits,
    # given a max that is not -inf: only padding rows (past the input's end) have every entry
    # masked, and they get max 0, sum 1 (output 0, lse 0, so their backward is zero too).
    # The contained variant keeps the select: with a non-finite max (a NaN in the window)
    # exp(-inf - nan) would not be zero, and its indicator matmuls read e.
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(s - m)
    if contained:
        e = jnp.where(mask, e, 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    l = jnp.where(l == 0.0, 1.0, l)
    v_op = _clean(vh) if contained else vh
    o = jnp.einsum("cnqk,cnkd->cnqd", e.astype(vh.dtype), v_op,
                   preferred_element_type=jnp.float32) / l
    if contained:
        # p @ v element-wise: a window value nan, or +inf and -inf together, or an infinity met
        # with probability 0 give nan; otherwise an infinity keeps its sign.
        pos = e > 0
        window = mask & jnp.ones_like(pos)
        nan = (_hits(window, jnp.isnan(vh), "cnqk,cnkd->cnqd")
               + _hits(window & ~pos, jnp.isinf(vh), "cnqk,cnkd->cnqd")) > 0
        plus = _hits(pos, vh == jnp.inf, "cnqk,cnkd->cnqd") > 0
        minus = _hits(pos, vh == -jnp.inf, "cnqk,cnkd->cnqd") > 0
        o = jnp.where(plus, jnp.inf, o)
        o = jnp.where(minus, -jnp.inf, o)
        o = jnp.where(nan | (plus & minus), jnp.nan, o)
    lse = (m + jnp.log(l))[..., 0]
    return o.astype(vh.dtype), lse


def _backward_tiles(qt, kh, vh, bias, ot, lset, dot, dlset, *, mask, scale: float,
                    contained: bool):
    """Gradients of one chunk: ``(dq [C,N,Tq,d], dk [C,N,d,Hk], dv [C,N,Hk,dv], dbias [C,Tq,Hk]
    f32)`` (halo-shaped dk/dv laid out like ``kh``/``vh``, summed back onto tokens by the
    caller)."""
    s = _scores(qt, kh, bias, mask, scale)
    p = jnp.exp(s - lset[..., None])  # masked: exp(-inf) = 0 (see _forward_tiles)
    if contained:
        # A NaN logsumexp (non-finite q or k in the window) would make the masked entries
        # NaN, and p^T do would carry them to keys outside the window.
        p = jnp.where(mask, p, 0.0)
    # do v^T as a plain matmul wants v slots-minor (see _layout): transposed per chunk.
    dp = jnp.einsum("cnqd,cndk->cnqk", dot, jnp.swapaxes(vh, -1, -2),
                    preferred_element_type=jnp.float32)
    delta = jnp.sum(dot.astype(jnp.float32) * ot.astype(jnp.float32), axis=-1) - dlset
    ds = jnp.where(mask, p * (dp - delta[..., None]), 0.0)
    dtype = qt.dtype
    k_op, q_op, do_op = (_clean(x) if contained else x for x in (kh, qt, dot))
    dq = jnp.einsum("cnqk,cndk->cnqd", ds.astype(dtype), k_op,
                    preferred_element_type=jnp.float32) * scale
    # dk = ds^T q and dv = p^T do contract the query axis, which is not minor in ds / p:
    # XLA:CPU runs such dots on a slow generic path (2x slower at 112x112). Transposing the
    # small [Tq, d] operand instead gives plain [d, Tq] @ [Tq, Hk] matmuls; their [d, Hk]
    # results are the key halos' layout, and dv is transposed back inside the fold's fusion.
    q_t = jnp.swapaxes(q_op, -1, -2)
    do_t = jnp.swapaxes(do_op, -1, -2)
    dk = jnp.einsum("cndq,cnqk->cndk", q_t, ds.astype(dtype),
                    preferred_element_type=jnp.float32) * scale
    dv = jnp.einsum("cndq,cnqk->cndk", do_t, p.astype(dtype),
                    preferred_element_type=jnp.float32)
    if contained:
        window = mask & jnp.ones(ds.shape, bool)
        dq = jnp.where(_hits(window, _bad(kh), "cnqk,cndk->cnqd") > 0, jnp.nan, dq)
        dk = jnp.where(_hits(window, _bad(qt), "cnqk,cnqd->cndk") > 0, jnp.nan, dk)
        dv = jnp.where(_hits(window, _bad(dot), "cnqk,cnqd->cndk") > 0, jnp.nan, dv)
    return dq, dk, jnp.swapaxes(dv, -1, -2), jnp.sum(ds, axis=1)


def _chunk_sizes(z: int, n: int, pair_bytes: int) -> tuple[int, int]:
    """``(cz, cn)``: (batch*head) pairs and tiles per chunk so that one chunk's logits (and
    probabilities) stay within the budget; whole pairs first, tiles of one pair only when a
    single pair is over budget."""
    budget = _logits_budget()
    if 2 * z * pair_bytes <= budget:
        return z, n
    cz = max((c for c in range(1, z + 1) if z % c == 0 and 2 * c * pair_bytes <= budget),
             default=None)
    if cz is not None:
        return cz, n
    tile_bytes = pair_bytes // n
    cn = max((c for c in range(1, n + 1) if n % c == 0 and 2 * c * tile_bytes <= budget),
             default=1)
    return 1, cn


def _chunked(fn, args, kinds: str, out_kinds: str, pair_bytes: int):
    """Run ``fn`` chunk by chunk. ``kinds[i]`` says how ``args[i]`` is laid out: ``"p"`` =
    ``[Z, N, ...]`` (pairs x tiles), ``"n"`` = ``[N, ...]`` (per tile, the mask), ``"h"`` =
    ``[H, ...]`` per head, pair ``z`` taking row ``z % H`` (the bias: a chunk of whole batches
    gets the table itself); None args pass through. Outputs are ``"p"`` or ``"s"`` (``[Z, ...]``
    summed over tiles). Chunks are dynamic slices inside a ``fori_loop`` whose outputs are
    updated in place."""
    z, n = next(a.shape[:2] for a, k in zip(args, kinds) if k == "p")
    cz, cn = _chunk_sizes(z, n, pair_bytes)
    if (cz, cn) == (z, n):
        return fn(*args)
    nn = n // cn
    steps = (z // cz) * nn

    def piece(i, a, k):
        if a is None:
            return None
        z0, n0 = (i // nn) * cz, (i % nn) * cn
        if k == "p":
            return jax.lax.dynamic_slice(a, (z0, n0) + (0,) * (a.ndim - 2),
                                         (cz, cn) + a.shape[2:])
        if k == "h":
            h = a.shape[0]
            if cz % h == 0:
                return a
            if h % cz == 0:
                return jax.lax.dynamic_slice_in_dim(a, z0 % h, cz, axis=0)
            return jnp.take(a, (z0 + jnp.arange(cz)) % h, axis=0)
        return jax.lax.dynamic_slice_in_dim(a, n0, cn, axis=0)

    shapes = jax.eval_shape(lambda *xs: fn(*xs),
                            *(piece(0, a, k) for a, k in zip(args, kinds)))
    init = tuple(jnp.zeros((z, n) + s.shape[2:] if k == "p" else (z,) + s.shape[1:], s.dtype)
                 for s, k in zip(shapes, out_kinds))

    def body(i, outs):
        res = fn(*(piece(i, a, k) for a, k in zip(args, kinds)))
        z0, n0 = (i // nn) * cz, (i % nn) * cn
        new = []
        for o, r, k in zip(outs, res, out_kinds):
            if k == "p":
                new.append(jax.lax.dynamic_update_slice(o, r, (z0, n0) + (0,) * (r.ndim - 2)))
            else:
                start = (z0,) + (0,) * (r.ndim - 1)
                old = jax.lax.dynamic_slice(o, start, r.shape)
                new.append(jax.lax.dynamic_update_slice(o, old + r, start))
        return tuple(new)

    return jax.lax.fori_loop(0, steps, body, init)


# --------------------------------------------------------------------------- forward/backward


def _fold_heads(x: jax.Array, heads_kv: int) -> jax.Array:
    """``[B, h, G, NT, T, c]`` -> ``[B*heads_kv, G*NT, group*T, c]``: the ``group = h //
    heads_kv`` query heads sharing a key/value head become extra rows of every tile (row
    ``i * T + t`` is head ``kv * group + i``), so one key halo serves them all."""
    b, h, g, nt, t, c = x.shape
    x = x.reshape(b, heads_kv, h // heads_kv, g, nt, t, c)
    x = jnp.transpose(x, (0, 1, 3, 4, 2, 5, 6))
    return x.reshape(b * heads_kv, g * nt, (h // heads_kv) * t, c)


def _unfold_heads(x: jax.Array, batch: int, heads: int, groups: int) -> jax.Array:
    """Inverse of :func:`_fold_heads`: ``[B*heads_kv, G*NT, group*T, c]`` -> ``[B, heads, G, NT,
    T, c]``."""
    z, n, rows, c = x.shape
    grp = heads // (z // batch)
    x = x.reshape(batch, z // batch, groups, n // groups, grp, rows // grp, c)
    x = jnp.transpose(x, (0, 1, 4, 2, 3, 5, 6))
    return x.reshape(batch, heads, groups, n // groups, rows // grp, c)


def _flat_halos(x: jax.Array, plans, slots_minor: bool = False) -> jax.Array:
    """``[B, *spatial, h, c]`` -> ``[B*h, G*NT, Hk, c]`` (``[B*h, G*NT, c, Hk]`` with
    ``slots_minor``)."""
    y = _to_halos(x, plans, slots_minor)
    return y.reshape(y.shape[0] * y.shape[1], -1, *y.shape[4:])


def _groups(plans) -> int:
    return math.prod(pl.dilation for pl in plans)


def _layout(query, key, value, p, tile_sizes):
    """Tiled queries ``[B*heads_kv, G*NT, group*Tq, d]`` (heads folded, :func:`_fold_heads`),
    key halos ``[B*heads_kv, G*NT, d, Hk]`` and value halos ``[B*heads_kv, G*NT, Hk, d]``.

    Key halos keep their slots minor, so ``q k^T`` is a plain ``[Tq, d] @ [d, Hk]`` matmul; with
    ``[Hk, d]`` halos it contracts the minor axis of both operands, which XLA:CPU ran at half
    the rate (112x112 tiles, fp32, head_dim 32: 17.7 vs 9.0 ms). Value halos stay ``[Hk, d]``
    for the forward's ``p v`` (interleaved at 112x112: forward 10-20% faster than with
    slots-minor values); the backward transposes them per chunk for ``do v^T``. Accelerators
    choose physical layouts themselves (TPU bytes per layer unchanged)."""
    spatial = tuple(query.shape[1:1 + p.rank])
    plans = _plans(spatial, p, query.shape[-1], tile_sizes)
    qt = _fold_heads(_to_tiles(query, plans), key.shape[-2])
    return (spatial, plans, qt, _flat_halos(key, plans, slots_minor=True),
            _flat_halos(value, plans))


def _bias_table(rpb, plans, heads_kv: int):
    """``[heads_kv, group*Tq, Hk]`` f32 bias per key/value head (rows folded like the
    queries'), or None. Pair ``z`` (batch-major) uses row ``z % heads_kv``: the table is not
    repeated per image (it was the forward's largest copy at 14x14, 8 heads)."""
    if rpb is None:
        return None
    h = rpb.shape[0]
    table = rpb.astype(jnp.float32).reshape(h, -1)[:, _rel(plans)]  # [h, Tq, Hk]
    return table.reshape(heads_kv, -1, table.shape[-1])


def _mask_flat(plans, group: int):
    """``[G*NT, group*Tq, Hk]``: every folded query head sees the same windows. A constant up
    to ``_MASK_CONSTANT_BYTES``, else built in-graph."""
    size = group * math.prod(pl.dilation * pl.num_tiles * pl.tile * pl.halo for pl in plans)
    xp = np if size <= _MASK_CONSTANT_BYTES else jnp
    m = _mask(plans, xp)
    m = m.reshape(-1, *m.shape[2:])
    return jnp.asarray(xp.tile(m, (1, group, 1)) if group > 1 else m)


def _pair_bytes(qt, kh) -> int:
    return 4 * qt.shape[1] * qt.shape[2] * kh.shape[-1]


def _forward_core(qt, kh, vh, bias, plans, scale: float, contained: bool):
    def fn(q, k, v, b, mask):
        return _forward_tiles(q, k, v, b, mask=mask, scale=scale, contained=contained)

    group = qt.shape[2] // math.prod(pl.tile for pl in plans)
    return _chunked(fn, (qt, kh, vh, bias, _mask_flat(plans, group)), "ppphn", "pp",
                    _pair_bytes(qt, kh))


def _backward_core(qt, kh, vh, bias, ot, lset, dot, dlset, plans, scale: float,
                   contained: bool):
    def fn(q, k, v, b, o, lse, do, dlse, mask):
        return _backward_tiles(q, k, v, b, o, lse, do, dlse, mask=mask, scale=scale,
                               contained=contained)

    group = qt.shape[2] // math.prod(pl.tile for pl in plans)
    return _chunked(fn, (qt, kh, vh, bias, ot, lset, dot, dlset, _mask_flat(plans, group)),
                    "ppphppppn", "ppps", _pair_bytes(qt, kh))


def _forward(query, key, value, rpb, p: NAParams, tile_sizes, contained: bool | None):
    """Forward pass and the tiled residuals. ``contained=None`` decides at run time."""
    spatial, plans, qt, kh, vh = _layout(query, key, value, p, tile_sizes)
    bias = _bias_table(rpb, plans, key.shape[-2])
    run = functools.partial(_forward_core, plans=plans, scale=p.scale)
    if contained is None and not NONFINITE_CONTAINMENT:
        contained = False
    if contained is None:
        ot, lset = jax.lax.cond(jnp.any(_bad(value)), functools.partial(run, contained=True),
                                functools.partial(run, contained=False), qt, kh, vh, bias)
    else:
        ot, lset = run(qt, kh, vh, bias, contained=contained)
    b, h, g = query.shape[0], query.shape[-2], _groups(plans)
    out = _from_tiles(_unfold_heads(ot, b, h, g), plans, spatial)
    lse = _from_tiles(_unfold_heads(lset[..., None], b, h, g), plans, spatial)[..., 0]
    # Whether the backward pass may leak: through its contractions with q and k, or through a
    # non-finite logsumexp (from q, k or the bias; the clean backward's probabilities rely on a
    # finite one to be zero outside the windows). One reduction each over the compact arrays
    # (the halos repeat every key ~3x).
    leaky = jnp.any(_bad(query)) | jnp.any(_bad(key)) | jnp.any(_bad(lse))
    return (out, lse), (qt, kh, vh, ot, lset, leaky)


def _backward(res, cotangents, rpb, p: NAParams, tile_sizes, spatial, batch: int, heads: int,
              contained: bool | None):
    qt, kh, vh, ot, lset, leaky = res
    dout, dlse = cotangents
    plans = _plans(spatial, p, qt.shape[-1], tile_sizes)
    hk = qt.shape[0] // batch
    dot = _fold_heads(_to_tiles(dout.astype(qt.dtype), plans), hk)
    dlset = _fold_heads(_to_tiles(dlse.astype(jnp.float32)[..., None], plans), hk)[..., 0]
    bias = _bias_table(rpb, plans, hk)
    run = functools.partial(_backward_core, plans=plans, scale=p.scale)
    args = (qt, kh, vh, bias, ot, lset, dot, dlset)
    if contained is None and not NONFINITE_CONTAINMENT:
        contained = False
    if contained is None:
        leak = leaky | jnp.any(_bad(dout))
        dqt, dkh, dvh, dbias = jax.lax.cond(leak, functools.partial(run, contained=True),
                                            functools.partial(run, contained=False), *args)
    else:
        dqt, dkh, dvh, dbias = run(*args, contained=contained)
    g = _groups(plans)
    unflat = lambda x: x.reshape(batch, hk, g, -1, *x.shape[2:])  # noqa: E731
    dq = _from_tiles(_unfold_heads(dqt, batch, heads, g), plans, spatial).astype(qt.dtype)
    # Halo gradients are per key/value head: the folded rows already summed over the group.
    # They are rounded to the input dtype before the fold (each key sums the slots of the
    # halos that overlap it): with 16-bit inputs the fp32 halos were the backward's largest
    # arrays. Compiled for v5e (a nat_mini stage-1 layer, fwd+bwd, 128 images): 43.8 -> 32.1
    # GB accessed, temporaries 5.35 -> 3.19 GB; bf16 dk/dv error against fp32 2.4e-3 -> 3.1e-3
    # rms (dq's is 2.5e-3). fp32 inputs are unchanged.
    dk = _fold_halos(unflat(dkh.astype(kh.dtype)), plans, spatial, slots_minor=True)
    dv = _fold_halos(unflat(dvh.astype(vh.dtype)), plans, spatial)
    drpb = None
    if rpb is not None:
        # Folded rows are (query head in group, tile row): a plain reshape gives query heads.
        # Summed over the batch as a contraction with ones: XLA:CPU's reduce over this leading
        # axis took 35 ms for [16, 8, 196 * 196] (nat_mini's stage-3 layers at batch 16),
        # the contraction 1.1 ms. HIGHEST keeps fp32 sums on TPU.
        dtab = jnp.einsum("b,bhx->hx", jnp.ones((batch,), jnp.float32),
                          dbias.reshape(batch, heads, -1),
                          precision=jax.lax.Precision.HIGHEST)  # [h, Tq*Hk]
        flat = jnp.zeros((heads, math.prod(rpb.shape[1:])), jnp.float32)
        flat = flat.at[:, _rel(plans).reshape(-1)].add(dtab)
        drpb = flat.reshape(rpb.shape).astype(rpb.dtype)
    return dq, dk, dv, drpb


@functools.partial(jax.custom_vjp, nondiff_argnames=("p", "tile_sizes", "contained"))
def _na(query, key, value, rpb, p, tile_sizes, contained):
    return _forward(query, key, value, rpb, p, tile_sizes, contained)[0]


def _na_fwd(query, key, value, rpb, p, tile_sizes, contained):
    outs, res = _forward(query, key, value, rpb, p, tile_sizes, contained)
    # A zero-size array carries the static batch, spatial shape and heads to the backward pass.
    shape = jnp.zeros((*query.shape[:-1], 0), jnp.bool_)
    return outs, (res, rpb, shape)


def _na_bwd(p, tile_sizes, contained, saved, cotangents):
    res, rpb, shape = saved
    return _backward(res, cotangents, rpb, p, tile_sizes, tuple(shape.shape[1:-2]),
                     shape.shape[0], shape.shape[-2], contained)


_na.defvjp(_na_fwd, _na_bwd)


def na_fused(query: jax.Array, key: jax.Array, value: jax.Array, p: NAParams,
             rpb: jax.Array | None = None, tile_sizes: tuple[int, ...] | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Tiled neighborhood attention; returns ``(out, lse)`` like the reference backend.

    Non-finite inputs are contained (see the module docstring): the exact contained path runs
    only when a contraction operand holds a non-finite value.

    Args:
      query, key: ``[B, *spatial, heads, head_dim]``; value ``[B, *spatial, heads, head_dim_v]``.
      p: normalized parameters (see :func:`params.make_params`).
      rpb: optional ``[heads, 2K-1, ...]``.
      tile_sizes: query tile per axis in group rows; defaults to
        :func:`windows.xla_tile_sizes`.

    Returns:
      ``out [B, *spatial, heads, head_dim_v]`` (value dtype) and ``lse [B, *spatial, heads]``
      float32.
    """
    return _na(query, key, value, rpb, p, tile_sizes, None)


def na_fused_contained(query: jax.Array, key: jax.Array, value: jax.Array, p: NAParams,
                       rpb: jax.Array | None = None,
                       tile_sizes: tuple[int, ...] | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """:func:`na_fused` always on the contained path (forward and its ``custom_vjp``): the
    fallback for backends whose kernels cannot contain non-finite values themselves. Same
    arguments and results as :func:`na_fused`."""
    return _na(query, key, value, rpb, p, tile_sizes, True)


def na_backward_contained(query: jax.Array, key: jax.Array, value: jax.Array,
                          rpb: jax.Array | None, out: jax.Array, lse: jax.Array,
                          dout: jax.Array, dlse: jax.Array | None, p: NAParams,
                          tile_sizes: tuple[int, ...] | None = None):
    """Contained gradients ``(dq, dk, dv, drpb)`` of NA given the forward's ``out``/``lse``
    (e.g. from another backend's kernel) and the cotangents ``dout`` ``[B, *spatial, heads,
    head_dim_v]`` and ``dlse`` ``[B, *spatial, heads]`` (None = zero). ``drpb`` is None
    without ``rpb``."""
    spatial, plans, qt, kh, vh = _layout(query, key, value, p, tile_sizes)
    hk = key.shape[-2]
    ot = _fold_heads(_to_tiles(out, plans), hk)
    lset = _fold_heads(_to_tiles(lse.astype(jnp.float32)[..., None], plans), hk)[..., 0]
    if dlse is None:
        dlse = jnp.zeros(lse.shape, jnp.float32)
    return _backward((qt, kh, vh, ot, lset, None), (dout, dlse), rpb, p, tile_sizes, spatial,
                     query.shape[0], query.shape[-2], True)


# ------------------------------------------------------------------------------ unfused pieces
#
# ``na_qk`` / ``na_av`` return or take one value per (query, window slot), so they gather each
# tile row's window out of its tile's halo (a static ``[NT, Tq, W]`` table of halo slots)
# instead of running dense tile products: a gathered key or value only ever meets its own
# query's weight, so non-finite inputs cannot leak and autodiff gives exact gradients. The
# gathered ``[Tq, W, d]`` block of a chunk of tiles is the only large intermediate; chunks keep
# it within the logits budget and are rematerialized in the backward pass, so memory beyond
# the inputs' halos is the ``O(tokens * W)`` weights themselves.


def _slot_tables(plans) -> tuple[np.ndarray, np.ndarray]:
    """``(slot [G*NT, Tq, W] int32, valid [G*NT, Tq, W] bool)``: the flat halo slot of each
    (tile row, window slot) pair, window slots row-major over the axes as in the reference."""
    n = len(plans)
    flat, valid = np.zeros((), np.int64), np.ones((), bool)
    for a, pl in enumerate(plans):
        idx, ok = pl.slots()
        flat = flat * pl.halo + windows.interleave_axis(idx, a, n, 4)
        valid = valid & windows.interleave_axis(ok, a, n, 4)
    full = (tuple(pl.dilation for pl in plans) + tuple(pl.num_tiles for pl in plans)
            + tuple(pl.tile for pl in plans) + tuple(pl.kernel for pl in plans))

    def shape(x):
        x = np.broadcast_to(x, full)
        return x.reshape(math.prod(full[:2 * n]), math.prod(full[2 * n:3 * n]), -1)

    return shape(flat).astype(np.int32), shape(valid)


def _window_gather(xh: jax.Array, slot: jax.Array, valid: jax.Array) -> jax.Array:
    """``xh [C, N, Hk, c]`` -> ``[C, N, Tq, W, c]``, zero where a slot is not in the window
    (a select, so a clamped slot's non-finite token reaches nothing, forward or backward)."""
    g = jax.vmap(lambda x: jax.vmap(lambda xn, sn: xn[sn])(x, slot))(xh)
    return jnp.where(valid[None, ..., None], g, jnp.zeros((), xh.dtype))


def _unfused_chunks(fn, args, kinds: str, pair_bytes: int):
    # Rematerialized: autodiff of the chunk loop would otherwise keep every chunk's gathered
    # windows, O(tokens * W * d) in all.
    return _chunked(jax.checkpoint(fn), args, kinds, "p", pair_bytes)


def na_qk(query: jax.Array, key: jax.Array, p: NAParams, rpb: jax.Array | None = None,
          tile_sizes: tuple[int, ...] | None = None) -> jax.Array:
    """Tiled logits ``[B, *spatial, heads, prod(K)]`` float32: ``scale * q.k (+ rpb)``; slots
    outside a causal window hold ``-inf``. Same contract as :func:`reference.na_qk`, without its
    ``[tokens, prod(K), head_dim]`` gather of every window at once. ``key`` may have fewer heads
    (grouped-query attention): each key head's windows are gathered once for its group."""
    spatial = tuple(query.shape[1:1 + p.rank])
    plans = _plans(spatial, p, query.shape[-1], tile_sizes)
    qt = _fold_heads(_to_tiles(query, plans), key.shape[-2])
    kh = _flat_halos(key, plans)
    slot, valid = _slot_tables(plans)
    b, h, g = query.shape[0], query.shape[-2], _groups(plans)
    tq, w = slot.shape[1:]

    def fn(q, kb, s, ok):
        qg = q.reshape(*q.shape[:2], -1, tq, q.shape[-1])  # [C, N, group, Tq, d]
        logits = jnp.einsum("cngqd,cnqwd->cngqw", qg, _window_gather(kb, s, ok),
                            preferred_element_type=jnp.float32)
        return (logits.reshape(*q.shape[:3], w),)

    pair_bytes = max(4, kh.dtype.itemsize) * qt.shape[1] * qt.shape[2] * w * kh.shape[-1]
    (logits,) = _unfused_chunks(fn, (qt, kh, jnp.asarray(slot), jnp.asarray(valid)), "ppnn",
                                pair_bytes)
    logits = _unfold_heads(logits * p.scale, b, h, g).reshape(b, h, *slot.shape)
    if rpb is not None:
        rel = np.take_along_axis(np.broadcast_to(_rel(plans), slot.shape[:1] + _rel(plans).shape),
                                 slot, axis=-1)  # [G*NT, Tq, W]
        logits = logits + rpb.astype(jnp.float32).reshape(h, -1)[:, rel][None]
    logits = jnp.where(valid, logits, -jnp.inf)
    return _from_tiles(logits.reshape(b, h, g, -1, tq, w), plans, spatial)


def na_av(weights: jax.Array, value: jax.Array, p: NAParams,
          tile_sizes: tuple[int, ...] | None = None) -> jax.Array:
    """Tiled ``weights [B, *spatial, heads, prod(K)]`` times window values -> ``[B, *spatial,
    heads, head_dim]`` in ``value.dtype``; weights of slots outside a causal window are ignored.
    Same contract as :func:`reference.na_av`. ``value`` may have fewer heads (grouped-query
    attention): each value head's windows are gathered once for its group."""
    spatial = tuple(value.shape[1:1 + p.rank])
    plans = _plans(spatial, p, value.shape[-1], tile_sizes)
    vh = _flat_halos(value, plans)
    slot, valid = _slot_tables(plans)
    b, h, g = weights.shape[0], weights.shape[-2], _groups(plans)
    tq, w = slot.shape[1:]
    dtype = jnp.promote_types(weights.dtype, value.dtype)
    wt = _to_tiles(weights, plans).reshape(b, h, *slot.shape)
    wt = jnp.where(valid, wt, jnp.zeros((), wt.dtype)).astype(dtype)
    wt = _fold_heads(wt.reshape(b, h, g, -1, tq, w), value.shape[-2])

    def fn(wb, vb, s, ok):
        wg = wb.reshape(*wb.shape[:2], -1, tq, w)  # [C, N, group, Tq, W]
        out = jnp.einsum("cngqw,cnqwd->cngqd", wg, _window_gather(vb, s, ok).astype(dtype),
                         preferred_element_type=jnp.float32).astype(value.dtype)
        return (out.reshape(*wb.shape[:3], out.shape[-1]),)

    pair_bytes = max(4, vh.dtype.itemsize) * wt.shape[1] * wt.shape[2] * w * vh.shape[-1]
    (out,) = _unfused_chunks(fn, (wt, vh, jnp.asarray(slot), jnp.asarray(valid)), "ppnn",
                             pair_bytes)
    return _from_tiles(_unfold_heads(out, b, h, g), plans, spatial)


def _finite_or_zero(tree):
    return jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), tree)


def contain_nonfinite(results, rerun, exact):
    """A kernel backend's ``results``, with non-finite values kept inside their windows.

    For the Pallas backends (``pallas``, ``pallas_tpu``). The kernels' dense tile products multiply masked probabilities (exact zeros) by every key
    row of a tile, so one NaN/Inf in a key, value or output gradient outside a query's window
    would still reach that query (0 * NaN = NaN). A leak can only make an element non-finite,
    so every finite element is exact. For the others, ``exact()`` is the xla path's contained
    computation (non-finite exactly where a window holds NaN/Inf, exact to rounding elsewhere)
    and ``rerun(sanitize)`` the same kernels on inputs with NaN/Inf replaced by zeros: for an
    element no NaN/Inf reaches, the replaced entries only ever met masked, exactly-zero weights,
    so the rerun gives it bitwise as on inputs without them, and it agrees with ``exact()`` to
    rounding. Where the two disagree beyond rounding, a replaced entry did reach the element
    (e.g. a -inf logit that drops a key): ``exact()`` is taken. The check reads the results
    once; without NaN/Inf anywhere the other branch never runs."""
    if not NONFINITE_CONTAINMENT:
        return results
    finite = functools.reduce(jnp.logical_and, [jnp.isfinite(x).all() for x in
                                                jax.tree.leaves(results)])

    def pick(got, clean, want):
        tol = 1e-4 if got.dtype == jnp.float32 else 2e-2
        agree = jnp.isfinite(want) & jnp.isclose(clean, want, rtol=tol, atol=tol)
        return jnp.where(jnp.isfinite(got), got, jnp.where(agree, clean, want))

    return lax.cond(finite, lambda: results,
                    lambda: jax.tree.map(pick, results, rerun(_finite_or_zero), exact()))
