"""Fused neighborhood attention in Pallas: forward, dQ, dK/dV and dRPB kernels.

One kernel family for 1-D, 2-D and 3-D NA (backend name ``"pallas"``). On GPU the kernels use
Pallas's Triton lowering; on CPU the very same kernel bodies run with ``interpret=True``.

Layout and tiling (done in XLA around the kernels, see :func:`_to_tiles`):

* Dilation: every axis is regrouped so each dilation group is contiguous (token ``i`` -> group
  ``i % d``, row ``i // d``) and the groups are folded into a batch-like axis. Inside a kernel the
  problem is NA with dilation 1 over one group; the group's length per axis comes from the grid
  index. (Chosen over indexing groups in the kernel: loads stay contiguous tiles, and the XLA
  path uses the same regrouping.)
* Tokens are then permuted *tile-major*: each multi-dimensional tile (e.g. 8x8 rows of a 2-D
  group) becomes a contiguous block of ``prod(tile)`` rows, a power of two as Triton requires.
  Queries and keys may use different tile shapes; each array is permuted with its own.
* ``head_dim`` is zero-padded to a power of two (at least 16, Triton's smallest dot).

Forward (grid ``(query tiles, batch * groups, heads)``): a query tile loads its queries once and
loops over the key tiles of its neighborhood box (:func:`windows.tile_box`: from the window start
of its first query to the window end of its last, per axis, with a static trip count from
:func:`windows.tile_box_extent`), with an online softmax in float32 (exp2 domain). Tile pairs
entirely inside every query's window (:func:`windows.tile_inside_windows`) skip masking; the
others get the exact per-element window mask, :func:`windows.in_window` evaluated on iota
arithmetic. The RPB is a pointer gather from the bias Ref at the relative offset (in dilated
units).

Backward: ``delta = sum(out * dout) - dlse`` in XLA, then

* dQ kernel: per query tile, the same key box as the forward;
* dK/dV kernel: per key tile, the query tiles whose boxes touch it
  (:func:`windows.inverse_tile_box`, exact, by bisection on the monotone window bounds);
* dRPB kernel (only with ``rpb``): per query tile, a loop over the relative offsets occurring in
  the tile's windows (``prod(K)`` for interior tiles, up to ``prod(2K-1)`` at borders); each
  offset pairs every query with exactly one key (a row gather), so the reduction needs no
  atomics. Each (query tile, batch*group, head) writes its own partial sums, which an XLA
  reduce adds up: **no kernel uses atomics; every gradient, dRPB included, is deterministic.**
  Its cost is about one more forward pass, on CUDA cores (row-wise dots, no tensor cores).

Limits: ``head_dim <= 256`` (q/k and v separately), float32/bfloat16/float16 inputs, RPB with odd
kernels, stride 1 and no causal axis (as everywhere in nat-jax).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nat_jax.kernels import reference, windows, xla
from nat_jax.kernels.params import NAParams, missing_features

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite "minus infinity" for masked logits: exp2 of its difference to any real logit is 0,
# and it never produces inf - inf = NaN in the running max.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_ROWS = 16  # Triton's smallest dot operand dimension.
MAX_HEAD_DIM = 256
_MAX_GRID = 65535
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _grow_tile(rows: Sequence[int], total: int) -> tuple[int, ...]:
    """A power-of-two tile per axis with ``prod == total``, doubling the axis that has the most
    rows left uncovered (ties: the last, most contiguous axis); tiny axes stop growing at their
    (power-of-two rounded) size unless every axis is saturated."""
    n = len(rows)
    tile = [1] * n
    while math.prod(tile) < total:
        grow = [a for a in range(n) if tile[a] < _pow2(rows[a])] or [n - 1]
        a = max(grow, key=lambda a: (rows[a] / tile[a], a))
        tile[a] *= 2
    return tuple(tile)


# Default tile rows (forward query, forward key, backward query, backward key) and warps by
# dtype family and padded head_dim, chosen with the GPU compile gate (kernels/gpu_gate.py) so
# that every kernel compiles without register spills on sm_80 and sm_90 with XLA's own Triton.
# float32 products run as exact FMA loops (no TF32), whose operand layouts take far more
# registers than tensor-core dots: smaller tiles and 8 warps. float32 with a padded head_dim
# of 256 has no spill-free dK/dV configuration (16-row tiles at 4, 8 or 16 warps still spill
# 0.6-2 KB), so :func:`unsupported` sends it to the xla backend.
DEFAULT_TILES: dict[str, dict[int, tuple[int, int, int, int, int, int]]] = {
    "16bit": {16: (64, 64, 32, 32, 4, 4), 32: (64, 64, 32, 32, 4, 4), 64: (64, 64, 32, 32, 4, 4),
              128: (64, 32, 32, 32, 8, 8), 256: (64, 32, 16, 16, 8, 8)},
    "float32": {16: (32, 32, 32, 32, 4, 4), 32: (32, 32, 32, 32, 4, 4),
                64: (32, 32, 16, 16, 8, 8), 128: (32, 16, 16, 16, 4, 8)},
}


def default_tiles(head_dim: int, dtype) -> tuple[int, int, int, int, int, int]:
    """``(q, kv, q_bwd, kv_bwd, num_warps, num_warps_dkv)`` for a head_dim (the larger of query
    and value) and dtype, from :data:`DEFAULT_TILES`."""
    family = "float32" if jnp.dtype(dtype) == jnp.float32 else "16bit"
    table = DEFAULT_TILES[family]
    feat = _feat(head_dim)
    if feat not in table:
        raise ValueError(f"head_dim={head_dim} with {jnp.dtype(dtype).name}: the pallas kernels "
                         f"support padded head dims {sorted(table)} for this dtype")
    return table[feat]


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile shapes (group rows per spatial axis) of the Pallas NA kernels.

    Attributes:
      q, kv: query and key/value tile of the forward kernel.
      q_bwd, kv_bwd: query and key/value tile of the dQ, dK/dV and dRPB kernels.
      num_warps: Triton warps per program (``None``: 4 for head_dim <= 64, else 8).
      num_stages: Triton software-pipelining stages.
      num_warps_dkv: warps of the dK/dV kernel, which holds the most state (a key/value tile
        and both accumulators); ``None``: ``num_warps``.

    Every entry is a power of two and each tile holds at least 16 rows in total (Triton's
    smallest dot). Hashable, so it can be a static ``jax.jit`` argument.
    """

    q: tuple[int, ...]
    kv: tuple[int, ...]
    q_bwd: tuple[int, ...]
    kv_bwd: tuple[int, ...]
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_dkv: int | None = None

    def __post_init__(self):
        rank = len(self.q)
        for name in ("q", "kv", "q_bwd", "kv_bwd"):
            tile = getattr(self, name)
            if not isinstance(tile, tuple) or len(tile) != rank or rank not in (1, 2, 3):
                raise ValueError(f"{name}={tile!r} must be a tuple with one entry per spatial "
                                 f"axis (rank {rank} from q)")
            if not all(isinstance(t, int) and _is_pow2(t) for t in tile):
                raise ValueError(f"{name}={tile!r}: tile entries must be powers of two")
            if math.prod(tile) < _MIN_ROWS:
                raise ValueError(f"{name}={tile!r}: a tile must hold at least {_MIN_ROWS} rows")
        for name in ("num_warps", "num_warps_dkv"):
            warps = getattr(self, name)
            if warps is not None and not _is_pow2(warps):
                raise ValueError(f"{name}={warps} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")

    @property
    def rank(self) -> int:
        return len(self.q)

    @classmethod
    def get_default(cls, shape: Sequence[int], kernel_size: Sequence[int],
                    dilation: Sequence[int], head_dim: int, dtype=jnp.float32) -> BlockSizes:
        """Per-shape defaults from :data:`DEFAULT_TILES` (by dtype and padded head_dim), each
        tile spread over the axes by :func:`_grow_tile`. ``kernel_size`` is part of the
        signature so a tuned table can refine the choice."""
        del kernel_size
        rows = [-(-n // d) for n, d in zip(shape, dilation)]
        q, kv, q_bwd, kv_bwd, warps, warps_dkv = default_tiles(head_dim, dtype)
        return cls(q=_grow_tile(rows, q), kv=_grow_tile(rows, kv),
                   q_bwd=_grow_tile(rows, q_bwd), kv_bwd=_grow_tile(rows, kv_bwd),
                   num_warps=warps, num_warps_dkv=warps_dkv)

    def warps(self, head_dim: int) -> int:
        return self.num_warps or (4 if head_dim <= 64 else 8)

    def warps_dkv(self, head_dim: int) -> int:
        return self.num_warps_dkv or self.warps(head_dim)


# ------------------------------------------------------------------------------- tiling plan


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static geometry of one kernel launch: NA parameters plus a (query tile, key tile) pair."""

    lengths: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    scale: float
    has_rpb: bool

    @property
    def rank(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> tuple[int, ...]:  # rows per dilation group (the longest group)
        return tuple(-(-n // d) for n, d in zip(self.lengths, self.dilation))

    @property
    def groups(self) -> int:
        return math.prod(self.dilation)

    @property
    def nq(self) -> tuple[int, ...]:
        return tuple(-(-r // t) for r, t in zip(self.rows, self.q_tile))

    @property
    def nk(self) -> tuple[int, ...]:
        return tuple(-(-r // t) for r, t in zip(self.rows, self.kv_tile))

    def _axis(self, a: int):
        return (self.lengths[a], self.kernel[a], self.stride[a], self.dilation[a],
                self.causal[a])

    @property
    def box(self) -> tuple[int, ...]:
        """Key tiles per axis visited by a query tile."""
        return tuple(windows.tile_box_extent(*self._axis(a), self.q_tile[a], self.kv_tile[a])
                     for a in range(self.rank))

    @property
    def inverse_box(self) -> tuple[int, ...]:
        """Query tiles per axis visited by a key tile."""
        return tuple(windows.inverse_tile_box_extent(*self._axis(a), self.q_tile[a],
                                                     self.kv_tile[a]) for a in range(self.rank))

    @property
    def rpb_size(self) -> int:
        return math.prod(2 * k - 1 for k in self.kernel)


def _make_plan(p: NAParams, lengths, q_tile, kv_tile, has_rpb: bool) -> _Plan:
    return _Plan(tuple(lengths), p.kernel_size, p.stride, p.dilation, p.is_causal,
                 tuple(q_tile), tuple(kv_tile), p.scale, has_rpb)


def _offsets_visited(plan: _Plan) -> int:
    """Relative offsets the dRPB kernel visits, summed over the query tiles and dilation groups
    of one (batch, head). Per axis, :func:`windows.offset_range` gives each tile's count; a
    multi-dimensional tile visits the product, so the total is the product of per-axis sums."""
    total = 1
    for a in range(plan.rank):
        n, k, _, d, causal = plan._axis(a)  # noqa: SLF001
        lengths = windows.group_length(n, d, np.arange(d))
        first = np.arange(plan.nq[a])[None, :] * plan.q_tile[a]
        lo, hi = windows.offset_range(first, first + plan.q_tile[a] - 1, lengths[:, None], k,
                                      causal)
        total *= int((hi - lo + 1).sum())
    return total


def kernel_costs(q_shape: Sequence[int], head_dim_v: int, dtype, p: NAParams, has_rpb: bool,
                 blocks: BlockSizes) -> dict[str, dict[str, int]]:
    """FLOPs, transcendentals and bytes of each kernel of one call (``fwd``, ``dq``, ``dkv``,
    ``drpb``), from the static launch geometry.

    ``flops`` counts the tiles the kernels actually compute (masked pairs and padding included);
    ``flops_needed`` only the (query, key) pairs inside windows, by NATTEN's convention
    (``prod(kernel_size)`` keys per query, causal masking not subtracted). ``bytes`` counts every
    load and store a launch issues (key/value tiles once per visit). The ``pl.CostEstimate`` of
    each ``pallas_call`` takes ``flops_needed``, ``transcendentals`` and ``bytes``.
    """
    rank = p.rank
    b, h, dq = q_shape[0], q_shape[-2], q_shape[-1]
    fq, fv = _feat(dq), _feat(head_dim_v)
    es = jnp.dtype(dtype).itemsize
    lengths = tuple(q_shape[1:1 + rank])
    pairs = b * h * math.prod(lengths) * p.window  # needed (query, key) pairs
    fwd = _make_plan(p, lengths, blocks.q, blocks.kv, has_rpb)
    bwd = _make_plan(p, lengths, blocks.q_bwd, blocks.kv_bwd, has_rpb)
    streams = b * fwd.groups * h  # (batch * group, head) programs per tile

    def geometry(plan: _Plan, box, tiles):
        return streams * math.prod(tiles), math.prod(box), math.prod(plan.q_tile), \
            math.prod(plan.kv_tile)

    rpb_bytes = 4 * _pow2(fwd.rpb_size) if has_rpb else 0
    n, visits, tq, tk = geometry(fwd, fwd.box, fwd.nq)
    costs = {"fwd": dict(
        programs=n, flops=n * visits * 2 * tq * tk * (fq + fv),
        flops_needed=2 * pairs * (dq + head_dim_v), transcendentals=n * visits * tq * tk,
        bytes=n * (tq * fq * es + visits * tk * (fq + fv) * es + tq * fv * es + 4 * tq
                   + rpb_bytes))}
    # dQ: recompute q.k, then do.v and ds.k; reads q, do, lse, delta once per query tile.
    n, visits, tq, tk = geometry(bwd, bwd.box, bwd.nq)
    costs["dq"] = dict(
        programs=n, flops=n * visits * 2 * tq * tk * (2 * fq + fv),
        flops_needed=2 * pairs * (2 * dq + head_dim_v), transcendentals=n * visits * tq * tk,
        bytes=n * (tq * (2 * fq + fv) * es + 8 * tq + visits * tk * (fq + fv) * es + rpb_bytes))
    # dK/dV: per key tile, q.k, p^T.do, do.v and ds^T.q over the query tiles that see it.
    n, visits, tq, tk = geometry(bwd, bwd.inverse_box, bwd.nk)
    costs["dkv"] = dict(
        programs=n, flops=n * visits * 2 * tq * tk * (2 * fq + 2 * fv),
        flops_needed=2 * pairs * (2 * dq + 2 * head_dim_v),
        transcendentals=n * visits * tq * tk,
        bytes=n * (2 * tk * (fq + fv) * es + visits * tq * (fq + fv) * es + visits * 8 * tq
                   + rpb_bytes))
    if has_rpb:
        # One row-wise q.k and do.v per query and visited offset, on gathered key/value rows.
        offsets = b * h * _offsets_visited(bwd)
        tq = math.prod(bwd.q_tile)
        n = streams * math.prod(bwd.nq)
        costs["drpb"] = dict(
            programs=n, flops=offsets * tq * 2 * (fq + fv),
            flops_needed=2 * pairs * (dq + head_dim_v), transcendentals=offsets * tq,
            bytes=n * (tq * (fq + fv) * es + 8 * tq + 2 * rpb_bytes)
            + offsets * tq * (fq + fv) * es)
    return costs


# --------------------------------------------------------------------- in-kernel index math


def _i32(x):
    """Strongly typed int32 (:func:`windows.index`): in-kernel index math is never weakly typed,
    e.g. a ``fori_loop`` index, whose remainders Triton's lowering also mishandles."""
    return windows.index(x, jnp)


def _unravel(flat, sizes: Sequence) -> list:
    """Row-major multi-index of non-negative ``flat`` over ``sizes`` (static ints or traced
    int32 scalars); digits beyond ``sizes`` (e.g. the batch in a grid index) are dropped."""
    flat = _i32(flat)
    out = []
    for s in reversed(sizes):
        s = _i32(s)
        out.append(lax.rem(flat, s))
        flat = lax.div(flat, s)
    return out[::-1]


def _ravel(index: Sequence, sizes: Sequence[int]):
    flat = 0
    for i, s in zip(index, sizes):
        flat = flat * s + i
    return flat


def _group_lengths(plan: _Plan, z) -> list:
    """Per-axis length of the dilation group of grid row ``z`` (= batch * groups + group)."""
    group = _unravel(z, plan.dilation)
    return [windows.group_length(n, d, g, xp=jnp)
            for n, d, g in zip(plan.lengths, plan.dilation, group)]


def _tile_coords(tile_index: Sequence, tile: Sequence[int], shape: tuple[int, int], dim: int):
    """Group coordinates per axis of the rows of one tile, as int32 arrays of ``shape`` varying
    along ``dim`` (rows of a tile are row-major over the tile's axes)."""
    r = lax.broadcasted_iota(jnp.int32, shape, dim)
    local = _unravel(r, tile)
    return [t * s + loc for t, s, loc in zip(tile_index, tile, local)]


def _window_mask(plan: _Plan, qc: Sequence, kc: Sequence, glen: Sequence):
    """Exact NA mask: key coords ``kc`` inside the window of query coords ``qc`` on every axis."""
    mask = None
    for a in range(plan.rank):
        m = windows.in_window(qc[a], kc[a], glen[a], plan.kernel[a], plan.stride[a],
                              plan.causal[a], xp=jnp)
        mask = m if mask is None else mask & m
    return mask


def _rpb_index(plan: _Plan, qc: Sequence, kc: Sequence, glen: Sequence):
    """Flat RPB column of each (query, key) pair: ``K - 1 + key - query`` per axis in group
    coordinates (= dilated units), row-major over axes. Clipped per axis so pairs outside the
    window (masked later) still read in bounds."""
    flat = 0
    for a in range(plan.rank):
        k = plan.kernel[a]
        rel = k - 1 + kc[a] - jnp.minimum(qc[a], glen[a] - 1)
        flat = flat * (2 * k - 1) + jnp.clip(rel, 0, 2 * k - 2)
    return flat


def _dot(a, b, trans_b: bool = False):
    """float32-accumulated matmul; float32 inputs use full precision (no TF32). (3xTF32 on
    tensor cores was measured by the GPU gate as well: it needs *more* registers than the FMA
    dot, 255 + spills for head_dim 128 where the FMA dot took 158.)"""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    if trans_b:
        b = b.T
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _pair_inside(plan: _Plan, qt: Sequence, kt: Sequence, glen: Sequence):
    """Scalar: the key tile ``kt`` lies inside the window of every query of query tile ``qt``
    (on every axis), so the pair needs no per-element mask."""
    inside = None
    for a in range(plan.rank):
        tq, tk = plan.q_tile[a], plan.kv_tile[a]
        ok = windows.tile_inside_windows(qt[a] * tq, qt[a] * tq + tq - 1, kt[a] * tk,
                                         kt[a] * tk + tk, glen[a], plan.kernel[a],
                                         plan.stride[a], plan.causal[a], xp=jnp)
        inside = ok if inside is None else inside & ok
    return inside


def _logits2(plan: _Plan, q, k, rpb_ref, qt, kt, qc, kc, glen):
    """Logits in log2 units ``[Tq, Tk]`` (scaled, biased); pairs outside the window hold
    ``_MASK_VALUE``. The exact per-element mask is computed only for tile pairs that are not
    entirely inside every window (border and box-edge tiles)."""
    s = _dot(q, k, trans_b=True) * (plan.scale * LOG2E)
    if rpb_ref is not None:
        s = s + rpb_ref[_rpb_index(plan, qc, kc, glen)].astype(jnp.float32) * LOG2E

    def masked(s):
        return jnp.where(_window_mask(plan, qc, kc, glen), s, _MASK_VALUE)

    return lax.cond(_pair_inside(plan, qt, kt, glen), lambda s: s, masked, s)


def _key_tiles(plan: _Plan, qt: Sequence, glen: Sequence):
    """Clamped box start per axis (key tiles) of query tile ``qt``."""
    lo = []
    for a in range(plan.rank):
        start, _ = windows.tile_box(qt[a], plan.q_tile[a], plan.kv_tile[a], glen[a],
                                    plan.kernel[a], plan.stride[a], plan.causal[a], xp=jnp)
        lo.append(windows.clamp_box(start, plan.box[a], plan.nk[a], xp=jnp))
    return lo


# --------------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, plan: _Plan):
    if plan.has_rpb:
        q_ref, k_ref, v_ref, rpb_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    glen = _group_lengths(plan, pl.program_id(1))
    qt = _unravel(pl.program_id(0), plan.nq)
    qc = _tile_coords(qt, plan.q_tile, (tq, 1), 0)
    lo = _key_tiles(plan, qt, glen)
    q = q_ref[...]

    def body(it, carry):
        acc, m_prev, l_prev = carry
        kt = [lo[a] + j for a, j in enumerate(_unravel(it, plan.box))]
        rows = pl.ds(_ravel(kt, plan.nk) * tk, tk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        kc = _tile_coords(kt, plan.kv_tile, (1, tk), 1)
        s = _logits2(plan, q, k, rpb_ref, qt, kt, qc, kc, glen)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        # A row that has met only masked keys so far (m_next == _MASK_VALUE) accumulates
        # exp2(0) = 1 terms here; its first real key rescales them by exp2(-huge) = 0.
        probs = jnp.exp2(s - m_next[:, None])
        l_next = l_prev * correction + jnp.sum(probs, axis=1)
        acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
        return acc, m_next, l_next

    init = (jnp.zeros((tq, o_ref.shape[-1]), jnp.float32),
            jnp.full((tq,), _MASK_VALUE, jnp.float32), jnp.zeros((tq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, math.prod(plan.box), body, init)
    # Every row (padding rows too, which borrow the last real row's window) has >= 1 key: l > 0.
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) * LN2


def _dq_kernel(*refs, plan: _Plan):
    if plan.has_rpb:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    glen = _group_lengths(plan, pl.program_id(1))
    qt = _unravel(pl.program_id(0), plan.nq)
    qc = _tile_coords(qt, plan.q_tile, (tq, 1), 0)
    lo = _key_tiles(plan, qt, glen)
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]

    def body(it, dq):
        kt = [lo[a] + j for a, j in enumerate(_unravel(it, plan.box))]
        rows = pl.ds(_ravel(kt, plan.nk) * tk, tk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        kc = _tile_coords(kt, plan.kv_tile, (1, tk), 1)
        # Masked pairs: exp2(_MASK_VALUE - lse) == 0 exactly.
        probs = jnp.exp2(_logits2(plan, q, k, rpb_ref, qt, kt, qc, kc, glen) - lse2[:, None])
        ds = probs * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, math.prod(plan.box), body,
                       jnp.zeros((tq, dq_ref.shape[-1]), jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, plan: _Plan):
    if plan.has_rpb:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    glen = _group_lengths(plan, pl.program_id(1))
    kt = _unravel(pl.program_id(0), plan.nk)
    kc = _tile_coords(kt, plan.kv_tile, (1, tk), 1)
    lo = []
    for a in range(plan.rank):
        start, _ = windows.inverse_tile_box(kt[a], plan.kv_tile[a], plan.q_tile[a], glen[a],
                                            plan.rows[a], plan.kernel[a], plan.stride[a],
                                            plan.causal[a], xp=jnp)
        lo.append(windows.clamp_box(start, plan.inverse_box[a], plan.nq[a], xp=jnp))
    k, v = k_ref[...], v_ref[...]

    def body(it, carry):
        dk, dv = carry
        qt = [lo[a] + j for a, j in enumerate(_unravel(it, plan.inverse_box))]
        rows = pl.ds(_ravel(qt, plan.nq) * tq, tq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse2 = lse_ref[rows] * LOG2E
        delta = delta_ref[rows]
        qc = _tile_coords(qt, plan.q_tile, (tq, 1), 0)
        # Masked pairs and padding query rows (lse = +inf) get probs == 0 exactly.
        probs = jnp.exp2(_logits2(plan, q, k, rpb_ref, qt, kt, qc, kc, glen) - lse2[:, None])
        dv = dv + _dot(probs.astype(do.dtype).T, do)
        ds = probs * (_dot(do, v, trans_b=True) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype).T, q)
        return dk, dv

    init = (jnp.zeros((tk, dk_ref.shape[-1]), jnp.float32),
            jnp.zeros((tk, dv_ref.shape[-1]), jnp.float32))
    dk, dv = lax.fori_loop(0, math.prod(plan.inverse_box), body, init)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _drpb_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, out_ref, *,
                 plan: _Plan):
    """Partial dRPB of one query tile. For each relative offset (one bias entry) that occurs in
    the tile's windows, every query meets exactly one key: gather those key rows, recompute
    ``ds`` row-wise and sum it over the tile's queries. Interior tiles visit ``prod(K)`` offsets,
    border tiles up to ``prod(2K-1)`` (:func:`windows.offset_range`). RPB implies stride 1."""
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    glen = _group_lengths(plan, pl.program_id(1))
    qt = _unravel(pl.program_id(0), plan.nq)
    qc = _tile_coords(qt, plan.q_tile, (tq,), 0)
    qcw = [jnp.minimum(c, g - 1) for c, g in zip(qc, glen)]
    lo, count = [], []
    for a in range(plan.rank):
        first = qt[a] * plan.q_tile[a]
        o_lo, o_hi = windows.offset_range(first, first + plan.q_tile[a] - 1, glen[a],
                                          plan.kernel[a], plan.causal[a], xp=jnp)
        lo.append(_i32(o_lo))
        count.append(_i32(o_hi - o_lo + 1))
    q = q_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    bias = rpb_ref[...].astype(jnp.float32)
    entries = lax.broadcasted_iota(jnp.int32, bias.shape, 0)

    def body(i, acc):
        offset = [lo_a + j for lo_a, j in zip(lo, _unravel(i, count))]
        b = _ravel([o + k - 1 for o, k in zip(offset, plan.kernel)],
                   [2 * k - 1 for k in plan.kernel])
        kc = [c + o for c, o in zip(qcw, offset)]
        valid = _window_mask(plan, qc, kc, glen)
        kc = [jnp.clip(c, 0, r - 1) for c, r in zip(kc, plan.rows)]
        tile = _ravel([c // t for c, t in zip(kc, plan.kv_tile)], plan.nk)
        rows = tile * tk + _ravel([c % t for c, t in zip(kc, plan.kv_tile)], plan.kv_tile)
        k = k_ref[rows, :].astype(jnp.float32)
        v = v_ref[rows, :].astype(jnp.float32)
        bias_b = jnp.sum(jnp.where(entries == b, bias, 0.0))
        s2 = jnp.sum(q * k, axis=1) * (plan.scale * LOG2E) + bias_b * LOG2E
        probs = jnp.where(valid, jnp.exp2(s2 - lse2), 0.0)
        ds = probs * (jnp.sum(do * v, axis=1) - delta)
        return acc + jnp.where(entries == b, jnp.sum(ds), 0.0)

    total = functools.reduce(lambda x, y: x * y, count)
    out_ref[...] = lax.fori_loop(0, total, body, jnp.zeros(bias.shape, jnp.float32))


# ------------------------------------------------------------------------ layout (XLA side)


def _to_tiles(x: jax.Array, plan: _Plan, tile: tuple[int, ...], fill: float = 0.0,
              feat: int | None = None) -> jax.Array:
    """``[B, *spatial, h, (D)]`` -> ``[B * groups, h, prod(num_tiles * tile), (feat)]``:
    dilation groups folded next to the batch, each group padded to whole tiles (with ``fill``)
    and permuted tile-major; the feature axis zero-padded to ``feat``."""
    n = plan.rank
    b, h = x.shape[0], x.shape[1 + n]
    rest = x.shape[2 + n:]
    nts = [-(-r // t) for r, t in zip(plan.rows, tile)]
    pads = [(0, 0)] + [(0, nt * t * d - length) for nt, t, d, length in
                       zip(nts, tile, plan.dilation, plan.lengths)] + [(0, 0)] * (1 + len(rest))
    x = jnp.pad(x, pads, constant_values=fill)
    if rest and feat is not None and feat > rest[0]:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, feat - rest[0])])
        rest = (feat,)
    split = [b] + [s for nt, t, d in zip(nts, tile, plan.dilation) for s in (nt, t, d)]
    x = x.reshape(*split, h, *rest)
    perm = ([0] + [3 + 3 * a for a in range(n)] + [1 + 3 * n] + [1 + 3 * a for a in range(n)]
            + [2 + 3 * a for a in range(n)] + list(range(2 + 3 * n, x.ndim)))
    x = jnp.transpose(x, perm)
    return x.reshape(b * plan.groups, h, math.prod(nts) * math.prod(tile), *rest)


def _from_tiles(y: jax.Array, plan: _Plan, tile: tuple[int, ...], batch: int,
                feat: int | None = None) -> jax.Array:
    """Inverse of :func:`_to_tiles`: ``[B * groups, h, N, (F)]`` -> ``[B, *spatial, h, (feat)]``."""
    n = plan.rank
    h = y.shape[1]
    rest = y.shape[3:]
    nts = [-(-r // t) for r, t in zip(plan.rows, tile)]
    y = y.reshape(batch, *plan.dilation, h, *nts, *tile, *rest)
    perm = [0] + [x for a in range(n) for x in (2 + n + a, 2 + 2 * n + a, 1 + a)] + [1 + n]
    perm += list(range(2 + 3 * n, y.ndim))
    y = jnp.transpose(y, perm)
    y = y.reshape(batch, *[nt * t * d for nt, t, d in zip(nts, tile, plan.dilation)], h, *rest)
    crop = (slice(None), *[slice(0, length) for length in plan.lengths], slice(None))
    if rest and feat is not None:
        crop += (slice(0, feat),)
    return y[crop]


def _feat(d: int) -> int:
    return max(_MIN_ROWS, _pow2(d))


def _rpb_table(rpb: jax.Array) -> jax.Array:
    """``[h, 2K-1, ...]`` -> ``[h, P]`` float32, ``P`` a power of two (zero padded)."""
    flat = rpb.reshape(rpb.shape[0], -1).astype(jnp.float32)
    return jnp.pad(flat, [(0, 0), (0, _pow2(flat.shape[1]) - flat.shape[1])])


# ------------------------------------------------------------------------- pallas_call wrappers


def _call(kernel, plan: _Plan, grid, in_specs, out_specs, out_shape, args, *, name: str,
          num_warps: int, num_stages: int, interpret: bool | None, poison: bool,
          cost: dict | None):
    """``pl.pallas_call`` with Triton compiler params and a cost estimate (``cost``, one entry
    of :func:`kernel_costs`). ``interpret=None`` compiles the kernel where the program is lowered
    for CUDA and interprets it on every other platform. With ``poison`` every output starts as a
    NaN buffer (aliased input), so an element the kernel fails to write stays NaN."""
    aliases = {}
    nin = len(args)
    if poison:
        args = list(args) + [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs = list(in_specs) + list(out_specs)
        aliases = {nin + i: i for i in range(len(out_shape))}

    def body(*refs):  # the poison buffers (aliased to the outputs) are not kernel arguments
        return kernel(*refs[:nin], *refs[len(refs) - len(out_shape):], plan=plan)

    def launch(*args, interpret: bool):
        return pl.pallas_call(
            body, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            input_output_aliases=aliases, interpret=interpret, name=name,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            cost_estimate=None if cost is None else pl.CostEstimate(
                flops=cost["flops_needed"], transcendentals=cost["transcendentals"],
                bytes_accessed=cost["bytes"]),
        )(*args)

    if interpret is not None:
        return launch(*args, interpret=interpret)
    # Decided when lowering, not from jax.default_backend(): a CPU host exporting for CUDA gets
    # the compiled kernels, and CPU/TPU programs get the interpreter.
    return lax.platform_dependent(*args, cuda=functools.partial(launch, interpret=False),
                                  default=functools.partial(launch, interpret=True))


def _specs_rows(rows: int, feat: int | None):
    """BlockSpec of ``rows`` rows of grid tile ``i`` (``feat=None``: a vector like lse)."""
    if feat is None:
        return pl.BlockSpec((None, None, rows), lambda i, z, h: (z, h, i))
    return pl.BlockSpec((None, None, rows, feat), lambda i, z, h: (z, h, i, 0))


def _specs_all(x: jax.Array):
    """BlockSpec handing a program the whole ``[N, (F)]`` slab of its (batch*group, head)."""
    if x.ndim == 3:
        return pl.BlockSpec((None, None, x.shape[2]), lambda i, z, h: (z, h, 0))
    return pl.BlockSpec((None, None, *x.shape[2:]), lambda i, z, h: (z, h, 0, 0))


def _rpb_spec(table: jax.Array):
    return pl.BlockSpec((None, table.shape[1]), lambda i, z, h: (h, 0))


def _forward_call(q_tiled, k_tiled, v_tiled, table, plan: _Plan, blocks: BlockSizes,
                  interpret: bool | None, poison: bool, costs: dict):
    """Forward kernel on tiled operands -> ``(out [BG, h, Nq, Fv], lse [BG, h, Nq] float32)``."""
    bg, h, nrows, fq = q_tiled.shape
    fv = v_tiled.shape[-1]
    tq = math.prod(plan.q_tile)
    args = [q_tiled, k_tiled, v_tiled] + ([table] if plan.has_rpb else [])
    in_specs = [_specs_rows(tq, fq), _specs_all(k_tiled), _specs_all(v_tiled)]
    in_specs += [_rpb_spec(table)] if plan.has_rpb else []
    out_shape = [jax.ShapeDtypeStruct((bg, h, nrows, fv), v_tiled.dtype),
                 jax.ShapeDtypeStruct((bg, h, nrows), jnp.float32)]
    out_specs = [_specs_rows(tq, fv), _specs_rows(tq, None)]
    return _call(_fwd_kernel, plan, (nrows // tq, bg, h), in_specs, out_specs, out_shape, args,
                 name="na_pallas_fwd", num_warps=blocks.warps(max(fq, fv)),
                 num_stages=blocks.num_stages, interpret=interpret, poison=poison,
                 cost=costs["fwd"])


def _backward_calls(q_tiled, k_tiled, v_tiled, do_tiled, lse_tiled, delta_tiled, table,
                    plan: _Plan, blocks: BlockSizes, interpret: bool | None, poison: bool,
                    costs: dict):
    """dQ, dK/dV (and dRPB partials) kernels on tiled operands (tiles ``plan.q_tile`` /
    ``plan.kv_tile``). Returns ``(dq, dk, dv, drpb_partial or None)``."""
    bg, h, nq_rows, fq = q_tiled.shape
    nk_rows, fv = k_tiled.shape[2], v_tiled.shape[-1]
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    warps = blocks.warps(max(fq, fv))
    common = dict(num_warps=warps, num_stages=blocks.num_stages, interpret=interpret,
                  poison=poison)
    rpb_args = [table] if plan.has_rpb else []
    rpb_specs = [_rpb_spec(table)] if plan.has_rpb else []
    tensors = [q_tiled, k_tiled, v_tiled, do_tiled, lse_tiled, delta_tiled]

    (dq,) = _call(
        _dq_kernel, plan, (nq_rows // tq, bg, h),
        [_specs_rows(tq, fq), _specs_all(k_tiled), _specs_all(v_tiled), _specs_rows(tq, fv),
         _specs_rows(tq, None), _specs_rows(tq, None)] + rpb_specs,
        [_specs_rows(tq, fq)], [jax.ShapeDtypeStruct(q_tiled.shape, q_tiled.dtype)],
        tensors + rpb_args, name="na_pallas_dq", cost=costs["dq"], **common)

    dk, dv = _call(
        _dkv_kernel, plan, (nk_rows // tk, bg, h),
        [_specs_all(q_tiled), _specs_rows(tk, fq), _specs_rows(tk, fv), _specs_all(do_tiled),
         _specs_all(lse_tiled), _specs_all(delta_tiled)] + rpb_specs,
        [_specs_rows(tk, fq), _specs_rows(tk, fv)],
        [jax.ShapeDtypeStruct(k_tiled.shape, k_tiled.dtype),
         jax.ShapeDtypeStruct(v_tiled.shape, v_tiled.dtype)],
        tensors + rpb_args, name="na_pallas_dkv", cost=costs["dkv"],
        **dict(common, num_warps=blocks.warps_dkv(max(fq, fv))))

    drpb = None
    if plan.has_rpb:
        nqt = nq_rows // tq
        (drpb,) = _call(
            _drpb_kernel, plan, (nqt, bg, h),
            [_specs_rows(tq, fq), _specs_all(k_tiled), _specs_all(v_tiled), _specs_rows(tq, fv),
             _specs_rows(tq, None), _specs_rows(tq, None), _rpb_spec(table)],
            [pl.BlockSpec((None, None, None, table.shape[1]), lambda i, z, hh: (i, z, hh, 0))],
            [jax.ShapeDtypeStruct((nqt, bg, h, table.shape[1]), jnp.float32)],
            tensors + [table], name="na_pallas_drpb", cost=costs["drpb"], **common)
    return dq, dk, dv, drpb


# ----------------------------------------------------------------------- forward / backward


def _plans(query, p: NAParams, rpb, blocks: BlockSizes):
    lengths = query.shape[1:1 + p.rank]
    has_rpb = rpb is not None
    return (_make_plan(p, lengths, blocks.q, blocks.kv, has_rpb),
            _make_plan(p, lengths, blocks.q_bwd, blocks.kv_bwd, has_rpb))


def _forward(query, key, value, rpb, p: NAParams, blocks: BlockSizes, interpret: bool | None,
             poison: bool = False):
    plan, _ = _plans(query, p, rpb, blocks)
    fq, fv = _feat(query.shape[-1]), _feat(value.shape[-1])
    q_tiled = _to_tiles(query, plan, plan.q_tile, feat=fq)
    k_tiled = _to_tiles(key, plan, plan.kv_tile, feat=fq)
    v_tiled = _to_tiles(value, plan, plan.kv_tile, feat=fv)
    table = _rpb_table(rpb) if rpb is not None else None
    costs = kernel_costs(query.shape, value.shape[-1], query.dtype, p, rpb is not None, blocks)
    out_t, lse_t = _forward_call(q_tiled, k_tiled, v_tiled, table, plan, blocks, interpret,
                                 poison, costs)
    b = query.shape[0]
    out = _from_tiles(out_t, plan, plan.q_tile, b, feat=value.shape[-1])
    lse = _from_tiles(lse_t, plan, plan.q_tile, b)
    return out, lse, (out_t, lse_t)


def _backward(query, key, value, rpb, out, lse, dout, dlse, p: NAParams, blocks: BlockSizes,
              interpret: bool | None, poison: bool = False):
    _, plan = _plans(query, p, rpb, blocks)
    fq, fv = _feat(query.shape[-1]), _feat(value.shape[-1])
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    if dlse is not None:
        # d lse / d logits = probabilities, so a cotangent on lse only shifts delta.
        delta = delta - dlse.astype(jnp.float32)
    q_tiled = _to_tiles(query, plan, plan.q_tile, feat=fq)
    do_tiled = _to_tiles(dout.astype(value.dtype), plan, plan.q_tile, feat=fv)
    # Padding query rows get lse = +inf: their probabilities (and gradients) are exactly 0.
    lse_tiled = _to_tiles(lse, plan, plan.q_tile, fill=jnp.inf)
    delta_tiled = _to_tiles(delta, plan, plan.q_tile)
    k_tiled = _to_tiles(key, plan, plan.kv_tile, feat=fq)
    v_tiled = _to_tiles(value, plan, plan.kv_tile, feat=fv)
    table = _rpb_table(rpb) if rpb is not None else None
    costs = kernel_costs(query.shape, value.shape[-1], query.dtype, p, rpb is not None, blocks)
    dqt, dkt, dvt, drpb_t = _backward_calls(q_tiled, k_tiled, v_tiled, do_tiled, lse_tiled,
                                            delta_tiled, table, plan, blocks, interpret, poison,
                                            costs)
    b = query.shape[0]
    dq = _from_tiles(dqt, plan, plan.q_tile, b, feat=query.shape[-1])
    dk = _from_tiles(dkt, plan, plan.kv_tile, b, feat=key.shape[-1])
    dv = _from_tiles(dvt, plan, plan.kv_tile, b, feat=value.shape[-1])
    drpb = None
    if rpb is not None:
        # Partials of (query tile, batch * group) summed by an XLA reduce: no atomics.
        drpb = drpb_t.sum(axis=(0, 1))[:, :plan.rpb_size].reshape(rpb.shape).astype(rpb.dtype)
    return dq, dk, dv, drpb, (dqt, dkt, dvt, drpb_t)


@functools.partial(jax.custom_vjp, nondiff_argnames=("p", "blocks", "interpret"))
def _na_pallas(query, key, value, rpb, p: NAParams, blocks: BlockSizes, interpret: bool | None):
    return _na_pallas_fwd(query, key, value, rpb, p, blocks, interpret)[0]


def _na_pallas_fwd(query, key, value, rpb, p, blocks, interpret):
    def run(clean):
        q, k, v, r = clean((query, key, value, rpb))
        return _forward(q, k, v, r, p, blocks, interpret)[:2]

    out, lse = xla.contain_nonfinite(run(lambda x: x), run,
                          lambda: xla.na_fused_contained(query, key, value, p, rpb))
    return (out, lse), (query, key, value, rpb, out, lse)


def _na_pallas_bwd(p, blocks, interpret, res, cts):
    query, key, value, rpb, out, lse = res
    dout, dlse = cts

    def run(clean):
        return _backward(*clean((query, key, value, rpb, out, lse, dout, dlse)), p, blocks,
                         interpret)[:4]

    return xla.contain_nonfinite(run(lambda x: x), run, lambda: xla.na_backward_contained(
        query, key, value, rpb, out, lse, dout, dlse, p))


_na_pallas.defvjp(_na_pallas_fwd, _na_pallas_bwd)


def default_block_sizes(query, value, p: NAParams) -> BlockSizes:
    """:meth:`BlockSizes.get_default` for a call's shapes."""
    return BlockSizes.get_default(query.shape[1:1 + p.rank], p.kernel_size, p.dilation,
                                  max(query.shape[-1], value.shape[-1]), query.dtype)


def na_fused(query: jax.Array, key: jax.Array, value: jax.Array, p: NAParams,
             rpb: jax.Array | None = None, *, block_sizes: BlockSizes | None = None,
             interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Fused neighborhood attention with Pallas kernels (differentiable, RPB included).

    Args:
      query, key: ``[B, *spatial, heads, head_dim]`` (rank 1-3), float32/bfloat16/float16,
        ``head_dim <= 256``.
      value: ``[B, *spatial, heads, head_dim_v]``, ``head_dim_v <= 256``.
      p: normalized parameters (:func:`params.make_params`).
      rpb: optional ``[heads, 2K-1, ...]`` relative positional bias.
      block_sizes: tiles (a static argument); default :meth:`BlockSizes.get_default`. The
        dispatcher (``backend="pallas"``/``"auto"``) passes the autotuned choice when
        :mod:`autotune` has one for the shape.
      interpret: ``True`` runs the kernel bodies in Pallas interpret mode, ``False`` compiles
        them with Triton. ``None`` (default) decides per lowering platform: compiled kernels
        where the program is lowered for CUDA (on a GPU, and in ``jax.export(...,
        platforms=["cuda"])`` on a CPU host), interpret mode anywhere else.

    Returns:
      ``(out [B, *spatial, heads, head_dim_v] in value.dtype, lse [B, *spatial, heads] float32)``.
      Gradients flow to query, key, value and rpb (and through lse).
    """
    if block_sizes is None:
        block_sizes = default_block_sizes(query, value, p)
    if block_sizes.rank != p.rank:
        raise ValueError(f"block_sizes={block_sizes} has rank {block_sizes.rank}, the input has "
                         f"{p.rank} spatial axes")
    return _na_pallas(query, key, value, rpb, p, block_sizes, interpret)


def kernel_outputs(query, key, value, p: NAParams, rpb=None, dout=None, dlse=None, *,
                   block_sizes: BlockSizes | None = None, interpret: bool = True,
                   poison: bool = True) -> dict[str, jax.Array]:
    """Forward and backward results for tests, computed directly (no custom_vjp), plus the raw
    tiled, padded output of every kernel under ``raw_*``. With ``poison`` each kernel output
    buffer starts as NaN, so any element a kernel does not write stays NaN in ``raw_*``."""
    blocks = block_sizes or default_block_sizes(query, value, p)
    out, lse, (out_t, lse_t) = _forward(query, key, value, rpb, p, blocks, interpret, poison)
    if dout is None:
        dout = jnp.ones_like(out)
    dq, dk, dv, drpb, (dqt, dkt, dvt, drpb_t) = _backward(
        query, key, value, rpb, out, lse, dout, dlse, p, blocks, interpret, poison)
    res = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, raw_out=out_t, raw_lse=lse_t, raw_dq=dqt,
               raw_dk=dkt, raw_dv=dvt)
    if rpb is not None:
        res.update(drpb=drpb, raw_drpb=drpb_t)
    return res


def na_reference(query, key, value, p: NAParams, rpb=None):
    """Pure-jnp reference of :func:`na_fused` (the project's gather backend; autodiff grads)."""
    return reference.na_fused(query, key, value, p, rpb)


# ------------------------------------------------------------------------------- dispatch


def unsupported(query, value, p: NAParams, rpb) -> str | None:
    """Why these kernels cannot take a call (``None``: they can). Everything else is covered by
    the GPU compile gate (:mod:`gpu_gate`): every rank, feature, dtype and head_dim up to 256."""
    why = missing_features(query, value, p, "pallas")
    if why:
        return why
    if query.dtype not in SUPPORTED_DTYPES:
        return f"query.dtype={query.dtype}: the pallas backend supports float32, bfloat16, float16"
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return (f"head_dim={query.shape[-1]}/{value.shape[-1]}: the pallas backend supports "
                f"head_dim <= {MAX_HEAD_DIM}")
    if query.dtype == jnp.float32 and _feat(max(query.shape[-1], value.shape[-1])) > 128:
        return (f"head_dim={query.shape[-1]}/{value.shape[-1]} in float32: the dK/dV kernel "
                "spills registers above 128 (see DEFAULT_TILES); use bfloat16/float16 or the "
                "xla backend")
    # CUDA caps the 2nd and 3rd grid dimensions (batch * groups, heads) at 65535.
    if query.shape[0] * math.prod(p.dilation) > _MAX_GRID or query.shape[-2] > _MAX_GRID:
        return (f"batch * prod(dilation)={query.shape[0] * math.prod(p.dilation)} and "
                f"heads={query.shape[-2]} must each be <= {_MAX_GRID} (CUDA grid limit)")
    if rpb is not None and rpb.dtype not in SUPPORTED_DTYPES:
        return f"rpb.dtype={rpb.dtype}: the pallas backend supports float32, bfloat16, float16"
    return None
