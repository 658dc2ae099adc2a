"""Block-sparse neighborhood attention for TPU in Pallas (Mosaic): forward, dQ (+dRPB), dK/dV.

One kernel family for 1-D, 2-D and 3-D NA (backend name ``"pallas_tpu"``). On a TPU the
kernels are compiled by Mosaic; elsewhere the very same kernel bodies run in Pallas's TPU
interpret mode (``pltpu.InterpretParams``), which is how the test suite checks them on CPU.

Layout (XLA ops around the kernels, shared with the GPU kernels in :mod:`pallas`): dilation
groups are regrouped to be contiguous and folded into the batch, and each group's tokens are
permuted *tile-major*, so a multi-dimensional tile (e.g. 8x16 rows of a 2-D group) is one
contiguous block of ``prod(tile)`` rows: a BlockSpec can fetch it. ``head_dim`` is not padded
(a block spans the whole feature axis).

Block sparsity, the way JAX's splash attention does it: the grid is
``(batch * groups, heads, query tiles, steps)`` and step ``j`` of a query tile fetches the
``j``-th key tile of that tile's neighborhood box (:func:`windows.tile_box`: from the window
start of its first query to the window end of its last, per axis). Splash attention reads the
block schedule from precomputed tables in SMEM; here it is *computed* per block from the
window rules, on the scalar core, by the BlockSpec index maps and the kernel body alike
(:func:`_kv_step`), so nothing is materialized and nothing scales with the map:

* the static step count is the largest box (:func:`windows.tile_box_extent`); a tile whose box
  is smaller repeats its last key tile for the remaining steps, which Pallas does not fetch
  again, and skips their compute ("empty" blocks);
* a (query tile, key tile) pair entirely inside every query's window
  (:func:`windows.tile_inside_windows`) skips the per-element mask ("full" blocks); the others
  get the exact mask, :func:`windows.in_window` on iota coordinates ("partial" blocks).

Kernels (online softmax in float32, natural-log domain like splash attention):

* forward: per query tile, accumulate over its key tiles; writes the output and the logsumexp
  (``lse``, one float32 per query, stored lane-major ``[.., 1, rows]``);
* dQ: per query tile, the same key tiles; with RPB it also reduces dRPB for the tile (below);
* dK/dV: per key tile, the query tiles whose boxes touch it (:func:`windows.inverse_tile_box`,
  exact), computed transposed (``k @ q^T``) so lse and ``delta`` are read as rows and every
  matmul is NN or NT (no transposes of data).

Relative positional bias without gathers from HBM: with the table flattened mixed-radix over
``2K-1`` per axis, the entry of a (query, key) pair is ``u(key) - w(query) + c`` where ``u`` and
``w`` are linear in the in-tile coordinates and ``c`` depends only on the tile pair
(:func:`_rpb_terms`). The forward looks the bias up with a lane gather (``take_along_axis``
within 128-lane vregs, the gather Mosaic supports) from 128-entry chunks of the table. dRPB of a
tile pair is ``sum_q E[q, p + w(q) - c]`` with ``E = ds @ onehot(u)``: one MXU matmul and a
lane gather per chunk, no atomics and no scatter; each (query tile, batch * group, head) writes
its own partial sums, reduced by XLA, so **every gradient is deterministic**.

Constraints: every tile holds a multiple of 128 rows (``lse``/``delta`` blocks put a tile's rows
on lanes); float32 and bfloat16 inputs (float32 logits, softmax and accumulation); RPB with odd
kernels, stride 1 and no causal axis (as everywhere in nat-jax). Sharded inputs: XLA cannot
partition a Mosaic call, so the public op runs the kernels per shard of the batch and head axes
(:func:`_sharded`).

Not yet run on a TPU: Mosaic compiles every kernel for v5e and v4 in the test suite
(``tests/test_tpu_gate.py``); speed is unmeasured.
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
from jax.experimental.pallas import tpu as pltpu

from nat_jax.kernels import reference, windows
from nat_jax.kernels.params import NAParams
# Backend-neutral tiling geometry and layout shared with the GPU kernels.
from nat_jax.kernels.pallas import (_from_tiles, _group_lengths, _grow_tile, _make_plan,
                                    _pair_inside, _Plan, _ravel, _to_tiles, _unravel,
                                    _window_mask)

LANES = 128  # TPU vreg lanes: tiles, lse blocks and RPB chunks are multiples of this
# Finite "minus infinity" for masked logits (as splash attention's DEFAULT_MASK_VALUE): exp of
# its difference to any real logit is 0 and it never produces inf - inf = NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile shapes (group rows per spatial axis) of the TPU NA kernels.

    Attributes:
      q, kv: query and key/value tile of the forward kernel.
      q_bwd, kv_bwd: query and key/value tile of the dQ and dK/dV kernels.

    Each tile holds a multiple of 128 rows in total (``prod(tile) % 128 == 0``): a tile's
    logits are lane-dense and its ``lse`` block fills whole vregs. Entries need not be powers
    of two. Hashable, so it can be a static ``jax.jit`` argument.
    """

    q: tuple[int, ...]
    kv: tuple[int, ...]
    q_bwd: tuple[int, ...]
    kv_bwd: tuple[int, ...]

    def __post_init__(self):
        rank = len(self.q) if isinstance(self.q, tuple) else 0
        for name in ("q", "kv", "q_bwd", "kv_bwd"):
            tile = getattr(self, name)
            if not isinstance(tile, tuple) or len(tile) != rank or rank not in (1, 2, 3):
                raise ValueError(f"{name}={tile!r} must be a tuple with one entry per spatial "
                                 f"axis (1 to 3, rank {rank} from q)")
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile):
                raise ValueError(f"{name}={tile!r}: tile entries must be positive ints")
            if math.prod(tile) % LANES:
                raise ValueError(f"{name}={tile!r}: a tile must hold a multiple of {LANES} rows "
                                 f"(holds {math.prod(tile)})")

    @property
    def rank(self) -> int:
        return len(self.q)

    @classmethod
    def get_default(cls, shape: Sequence[int], kernel_size: Sequence[int],
                    dilation: Sequence[int], head_dim: int, dtype=jnp.float32) -> BlockSizes:
        """128-row tiles everywhere, spread over the axes by the GPU kernels' rule (double the
        axis with the most rows left uncovered). ``kernel_size``, ``head_dim`` and ``dtype``
        are part of the signature so a tuned table can refine the choice."""
        del kernel_size, head_dim, dtype
        rows = [-(-n // d) for n, d in zip(shape, dilation)]
        tile = _grow_tile(rows, LANES)
        return cls(q=tile, kv=tile, q_bwd=tile, kv_bwd=tile)


# --------------------------------------------------------------------- block schedule


def _kv_step(plan: _Plan, qt: Sequence, glen: Sequence, step):
    """Key tile (per axis) visited at ``step`` by query tile ``qt``, and whether the step does
    work. Steps enumerate the tile's box row-major; past its end the last tile repeats (so
    Pallas skips the fetch) and the step is empty. Scalar int32 math: evaluated by the index
    maps and the kernel body alike."""
    lo, width = [], []
    for a in range(plan.rank):
        start, stop = windows.tile_box(qt[a], plan.q_tile[a], plan.kv_tile[a], glen[a],
                                       plan.kernel[a], plan.stride[a], plan.causal[a], xp=jnp)
        lo.append(start)
        width.append(stop - start)
    count = functools.reduce(lambda x, y: x * y, width)
    offset = _unravel(jnp.minimum(step, count - 1), width)
    return [s + o for s, o in zip(lo, offset)], step < count


def _q_step(plan: _Plan, kt: Sequence, glen: Sequence, step):
    """Query tile (per axis) visited at ``step`` by key tile ``kt`` (the inverse box), and
    whether the step does work. A key tile of pure padding has an empty box: every step is
    empty and points at a valid tile."""
    lo, width = [], []
    for a in range(plan.rank):
        start, stop = windows.inverse_tile_box(kt[a], plan.kv_tile[a], plan.q_tile[a], glen[a],
                                               plan.rows[a], plan.kernel[a], plan.stride[a],
                                               plan.causal[a], xp=jnp)
        lo.append(start)
        width.append(jnp.maximum(stop - start, 0))
    count = functools.reduce(lambda x, y: x * y, width)
    offset = _unravel(jnp.maximum(jnp.minimum(step, count - 1), 0),
                      [jnp.maximum(w, 1) for w in width])
    qt = [jnp.clip(s + o, 0, n - 1) for s, o, n in zip(lo, offset, plan.nq)]
    return qt, step < count


def _kv_steps(plan: _Plan) -> int:
    return math.prod(plan.box)


def _q_steps(plan: _Plan) -> int:
    return math.prod(plan.inverse_box)


def _pairs(plan: _Plan, inverse: bool = False) -> int:
    """Non-empty (query tile, key tile) pairs of one (batch, head), summed over the dilation
    groups: the work the kernels do (for cost estimates). Tiles form a product over axes and
    box widths are per axis, so the count factors per axis. ``inverse``: as the dK/dV kernel
    enumerates them (per key tile)."""
    total = 0
    for group in np.ndindex(*plan.dilation):
        count = 1
        for a in range(plan.rank):
            glen = windows.group_length(plan.lengths[a], plan.dilation[a], group[a])
            axis = (plan.kernel[a], plan.stride[a], plan.causal[a])
            if inverse:
                lo, hi = windows.inverse_tile_box(np.arange(plan.nk[a]), plan.kv_tile[a],
                                                  plan.q_tile[a], glen, plan.rows[a], *axis)
            else:
                lo, hi = windows.tile_box(np.arange(plan.nq[a]), plan.q_tile[a],
                                          plan.kv_tile[a], glen, *axis)
            count *= int(np.maximum(hi - lo, 0).sum())
        total += count
    return total


# ------------------------------------------------------------------- in-kernel helpers


def _coords(tile_index: Sequence, tile: Sequence[int], shape: tuple[int, int], dim: int):
    """Local (in-tile) and group coordinates per axis of a tile's rows, int32 arrays of
    ``shape`` varying along ``dim`` (a column ``(T, 1)`` or a row ``(1, T)``)."""
    local = _unravel(lax.broadcasted_iota(jnp.int32, shape, dim), tile)
    return local, [t * s + loc for t, s, loc in zip(tile_index, tile, local)]


def _rpb_strides(plan: _Plan) -> list[int]:
    """Mixed-radix strides of the flattened ``[2K-1, ...]`` bias table."""
    sizes = [2 * k - 1 for k in plan.kernel]
    return [math.prod(sizes[a + 1:]) for a in range(plan.rank)]


def _rpb_terms(plan: _Plan, q_local, k_local, qt, kt):
    """``(w, u, c)`` with table entry ``u(key) - w(query) + c`` for every pair of query tile
    ``qt`` and key tile ``kt``: ``sum_a (key_a - query_a + K_a - 1) * stride_a`` split into
    in-tile parts (``w`` on the query coordinates' shape, ``u`` on the keys') and a scalar."""
    strides = _rpb_strides(plan)
    w = sum(loc * s for loc, s in zip(q_local, strides))
    u = sum(loc * s for loc, s in zip(k_local, strides))
    c = sum((kt[a] * plan.kv_tile[a] - qt[a] * plan.q_tile[a] + plan.kernel[a] - 1) * strides[a]
            for a in range(plan.rank))
    return w, u, c


def _table_size(plan: _Plan) -> int:
    """Bias entries padded to whole 128-lane chunks."""
    return -(-plan.rpb_size // LANES) * LANES


def _gather_bias(rpb_ref, index):
    """``table[index]`` for an int32 matrix ``index`` (entries outside ``[0, size)`` give
    arbitrary finite values: only masked pairs have them). One lane gather per 128-entry chunk
    of the table and 128-lane column block of ``index``."""
    rows, cols = index.shape
    width = min(cols, LANES)
    size = rpb_ref.shape[-1]
    blocks = []
    for c0 in range(0, cols, width):
        idx = index[:, c0:c0 + width]
        out = jnp.zeros(idx.shape, jnp.float32)
        for t0 in range(0, size, width):
            chunk = jnp.broadcast_to(rpb_ref[:, t0:t0 + width].astype(jnp.float32), idx.shape)
            local = idx - t0
            hit = (local >= 0) & (local < width)
            out = jnp.where(hit, jnp.take_along_axis(chunk, jnp.clip(local, 0, width - 1),
                                                     axis=1), out)
        blocks.append(out)
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation (full precision for float32 operands)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _logits(plan: _Plan, s, rpb_ref, qt, kt, q_loc, qc, k_loc, kc, glen):
    """Scaled logits ``s`` (natural-log units) plus bias, with pairs outside the window set to
    ``_MASK_VALUE``. Query and key coordinates broadcast against each other, so the same code
    serves the ``[q, k]`` (forward, dQ) and ``[k, q]`` (dK/dV) orientations."""
    s = s * plan.scale
    if rpb_ref is not None:
        w, u, c = _rpb_terms(plan, q_loc, k_loc, qt, kt)
        s = s + _gather_bias(rpb_ref, jnp.broadcast_to(u - w + c, s.shape))

    def masked(s):
        return jnp.where(_window_mask(plan, qc, kc, glen), s, _MASK_VALUE)

    return lax.cond(_pair_inside(plan, qt, kt, glen), lambda s: s, masked, s)


def _row_to_column(row, rows: int):
    """``(1, T)`` lane vector -> ``(T, LANES)`` with each entry broadcast along its row."""
    return jnp.broadcast_to(jnp.broadcast_to(row, (8, rows)).T[:, :1], (rows, LANES))


def _column_to_row(col):
    """``(T, LANES)`` lane-broadcast column -> ``(1, T)``."""
    return col.T[:1, :]


# --------------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, plan: _Plan):
    if plan.has_rpb:
        q_ref, k_ref, v_ref, rpb_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    step = pl.program_id(3)
    glen = _group_lengths(plan, pl.program_id(0))
    qt = _unravel(pl.program_id(2), plan.nq)
    kt, run = _kv_step(plan, qt, glen, step)

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(run)
    def _accumulate():
        q_loc, qc = _coords(qt, plan.q_tile, (tq, 1), 0)
        k_loc, kc = _coords(kt, plan.kv_tile, (1, tk), 1)
        v = v_ref[...]
        s = _logits(plan, _dot_nt(q_ref[...], k_ref[...]), rpb_ref, qt, kt, q_loc, qc, k_loc,
                    kc, glen)
        m_prev, l_prev = m_ref[...], l_ref[...]  # (tq, LANES), equal along lanes
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(m_prev - m_next)
        # A row that has met only masked keys so far (m_next == _MASK_VALUE) accumulates
        # exp(0) = 1 terms here; its first real key rescales them by exp(-huge) = 0.
        p = jnp.exp(s - m_next[:, :1])
        l_ref[...] = l_prev * correction + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = acc_ref[...] * correction[:, :1] + _dot_nn(p.astype(v.dtype), v)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        # Every row (padding rows too, which borrow the last real row's window) has a key.
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = _column_to_row(m_ref[...] + jnp.log(l))


def _dq_kernel(*refs, plan: _Plan):
    if plan.has_rpb:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, dq_ref, drpb_ref,
         lse_col, delta_col, acc_ref, drpb_acc) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, lse_col, delta_col,
         acc_ref) = refs
        rpb_ref = drpb_ref = drpb_acc = None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    step = pl.program_id(3)
    glen = _group_lengths(plan, pl.program_id(0))
    qt = _unravel(pl.program_id(2), plan.nq)
    kt, run = _kv_step(plan, qt, glen, step)

    @pl.when(step == 0)
    def _init():
        lse_col[...] = _row_to_column(lse_ref[...], tq)
        delta_col[...] = _row_to_column(delta_ref[...], tq)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if drpb_acc is not None:
            drpb_acc[...] = jnp.zeros(drpb_acc.shape, jnp.float32)

    @pl.when(run)
    def _accumulate():
        q_loc, qc = _coords(qt, plan.q_tile, (tq, 1), 0)
        k_loc, kc = _coords(kt, plan.kv_tile, (1, tk), 1)
        k = k_ref[...]
        s = _logits(plan, _dot_nt(q_ref[...], k), rpb_ref, qt, kt, q_loc, qc, k_loc, kc, glen)
        # Masked pairs: exp(_MASK_VALUE - lse) == 0; padding rows have lse = +inf.
        p = jnp.exp(s - lse_col[:, :1])
        ds = p * (_dot_nt(do_ref[...], v_ref[...]) - delta_col[:, :1])
        acc_ref[...] += _dot_nn(ds.astype(k.dtype), k)
        if drpb_acc is not None:
            _accumulate_drpb(plan, drpb_acc, ds, qt, kt, q_loc)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * plan.scale).astype(dq_ref.dtype)
        if drpb_ref is not None:
            drpb_ref[...] = drpb_acc[...]


def _accumulate_drpb(plan: _Plan, drpb_acc, ds, qt, kt, q_loc):
    """Add ``sum over pairs with table entry p of ds`` to ``drpb_acc[0, p]`` for one tile pair.

    ``E = ds @ onehot(u)`` sums each query's ``ds`` over keys of equal ``u``; the entry of
    ``E[q, m]`` is ``m - w(q) + c``, so lane-gathering ``E[q, p + w(q) - c]`` and summing over
    queries gives the entries ``p`` of one 128-lane chunk. Masked pairs have ``ds == 0``."""
    tq, tk = ds.shape
    k_loc_col, _ = _coords(kt, plan.kv_tile, (tk, 1), 0)
    w, u, c = _rpb_terms(plan, q_loc, k_loc_col, qt, kt)  # w (tq, 1), u (tk, 1)
    u_size = int(sum((t - 1) * s for t, s in zip(plan.kv_tile, _rpb_strides(plan)))) + 1
    lanes = lax.broadcasted_iota(jnp.int32, (tq, LANES), 1)
    for e0 in range(0, drpb_acc.shape[-1], LANES):
        part = jnp.zeros((tq, LANES), jnp.float32)
        for m0 in range(0, u_size, LANES):
            onehot = (u == m0 + lax.broadcasted_iota(jnp.int32, (tk, LANES), 1))
            e = _dot_nn(ds, onehot.astype(jnp.float32))  # (tq, LANES): u in [m0, m0 + 128)
            idx = lanes + (e0 - m0) + w - c
            hit = (idx >= 0) & (idx < LANES)
            part = part + jnp.where(hit, jnp.take_along_axis(e, jnp.clip(idx, 0, LANES - 1),
                                                             axis=1), 0.0)
        drpb_acc[:, e0:e0 + LANES] += jnp.sum(part, axis=0, keepdims=True)


def _dkv_kernel(*refs, plan: _Plan):
    if plan.has_rpb:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, dk_ref, dv_ref, dk_acc,
         dv_acc) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc,
         dv_acc), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    step = pl.program_id(3)
    glen = _group_lengths(plan, pl.program_id(0))
    kt = _unravel(pl.program_id(2), plan.nk)
    qt, run = _q_step(plan, kt, glen, step)

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(run)
    def _accumulate():
        # Transposed: rows are keys, lanes are queries.
        q_loc, qc = _coords(qt, plan.q_tile, (1, tq), 1)
        k_loc, kc = _coords(kt, plan.kv_tile, (tk, 1), 0)
        q, do = q_ref[...], do_ref[...]
        s = _logits(plan, _dot_nt(k_ref[...], q), rpb_ref, qt, kt, q_loc, qc, k_loc, kc, glen)
        p = jnp.exp(s - lse_ref[...])  # masked pairs and padding queries (lse = +inf): 0
        dv_acc[...] += _dot_nn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(v_ref[...], do) - delta_ref[...])
        dk_acc[...] += _dot_nn(ds.astype(q.dtype), q)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------- pallas_call wrappers


def _interpret_arg(interpret):
    """``pallas_call``'s ``interpret=``: ``False`` (compiled by Mosaic), ``True`` (Pallas's
    generic interpreter: plain XLA ops, usable under every transformation and inside
    ``lax.platform_dependent``) or a ``pltpu.InterpretParams`` (TPU interpret mode: simulated
    VMEM and DMAs, uninitialized memory filled with NaN, out-of-bounds reads raise)."""
    return interpret


def _rows_spec(rows: int, feat: int, tile_of):
    """``rows`` rows (one tile) of a ``[BG, h, N, feat]`` operand; ``tile_of(z, i, j)`` is the
    flat tile index for grid point ``(z, head, i, j)``."""
    return pl.BlockSpec((None, None, rows, feat), lambda z, h, i, j: (z, h, tile_of(z, i, j), 0))


def _lanes_spec(rows: int, tile_of):
    """One tile of a ``[BG, h, 1, N]`` per-query vector (lse, delta), rows on lanes."""
    return pl.BlockSpec((None, None, 1, rows), lambda z, h, i, j: (z, h, 0, tile_of(z, i, j)))


def _table_spec(size: int):
    return pl.BlockSpec((None, 1, size), lambda z, h, i, j: (h, 0, 0))


def _own_tile(z, i, j):
    return i


def _kv_tile_of(plan: _Plan):
    def tile_of(z, i, j):
        kt, _ = _kv_step(plan, _unravel(i, plan.nq), _group_lengths(plan, z), j)
        return _ravel(kt, plan.nk)
    return tile_of


def _q_tile_of(plan: _Plan):
    def tile_of(z, i, j):
        qt, _ = _q_step(plan, _unravel(i, plan.nk), _group_lengths(plan, z), j)
        return _ravel(qt, plan.nq)
    return tile_of


def _call(kernel, plan: _Plan, grid, in_specs, out_specs, out_shape, scratch, args, cost, *,
          name: str, interpret):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=_interpret_arg(interpret), name=name,
    )(*args)


def _nbytes(*arrays) -> int:
    return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays
                   if a is not None))


def _forward_call(qt, kt, vt, table, plan: _Plan, interpret):
    """Forward kernel on tiled operands -> ``(out [BG, h, Nq, Fv], lse [BG, h, 1, Nq])``."""
    bg, h, nrows, fq = qt.shape
    fv = vt.shape[-1]
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    kv_of = _kv_tile_of(plan)
    in_specs = [_rows_spec(tq, fq, _own_tile), _rows_spec(tk, fq, kv_of),
                _rows_spec(tk, fv, kv_of)]
    args = [qt, kt, vt]
    if plan.has_rpb:
        in_specs.append(_table_spec(table.shape[-1]))
        args.append(table)
    out_shape = [jax.ShapeDtypeStruct((bg, h, nrows, fv), vt.dtype),
                 jax.ShapeDtypeStruct((bg, h, 1, nrows), jnp.float32)]
    out_specs = [_rows_spec(tq, fv, _own_tile), _lanes_spec(tq, _own_tile)]
    scratch = [pltpu.VMEM((tq, LANES), jnp.float32), pltpu.VMEM((tq, LANES), jnp.float32),
               pltpu.VMEM((tq, fv), jnp.float32)]
    pairs = bg // plan.groups * h * _pairs(plan)
    cost = pl.CostEstimate(
        flops=2 * pairs * tq * tk * (fq + fv), transcendentals=pairs * tq * tk,
        bytes_accessed=_nbytes(qt, *out_shape)
        + pairs * tk * (fq + fv) * qt.dtype.itemsize)
    return _call(_fwd_kernel, plan, (bg, h, nrows // tq, _kv_steps(plan)), in_specs, out_specs,
                 out_shape, scratch, args, cost, name="na_pallas_tpu_fwd", interpret=interpret)


def _backward_calls(qt, kt, vt, dot, lset, deltat, table, plan: _Plan, interpret):
    """dQ (+ dRPB partials) and dK/dV kernels on tiled operands. Returns
    ``(dq, dk, dv, drpb_partial or None)``; the partials are ``[BG, h, nq, 1, table]``."""
    bg, h, nq_rows, fq = qt.shape
    nk_rows, fv = kt.shape[2], vt.shape[-1]
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    heads = bg // plan.groups * h
    itemsize = qt.dtype.itemsize
    table_args = [table] if plan.has_rpb else []
    table_specs = [_table_spec(table.shape[-1])] if plan.has_rpb else []

    kv_of = _kv_tile_of(plan)
    out_shape = [jax.ShapeDtypeStruct(qt.shape, qt.dtype)]
    out_specs = [_rows_spec(tq, fq, _own_tile)]
    scratch = [pltpu.VMEM((tq, LANES), jnp.float32), pltpu.VMEM((tq, LANES), jnp.float32),
               pltpu.VMEM((tq, fq), jnp.float32)]
    nqt = nq_rows // tq
    if plan.has_rpb:
        size = table.shape[-1]
        out_shape.append(jax.ShapeDtypeStruct((bg, h, nqt, 1, size), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, 1, size),
                                      lambda z, hh, i, j: (z, hh, i, 0, 0)))
        scratch.append(pltpu.VMEM((1, size), jnp.float32))
    pairs = heads * _pairs(plan)
    cost = pl.CostEstimate(
        flops=2 * pairs * tq * tk * (2 * fq + fv), transcendentals=pairs * tq * tk,
        bytes_accessed=_nbytes(qt, dot, lset, deltat, *out_shape)
        + pairs * tk * (fq + fv) * itemsize)
    dq_out = _call(
        _dq_kernel, plan, (bg, h, nqt, _kv_steps(plan)),
        [_rows_spec(tq, fq, _own_tile), _rows_spec(tk, fq, kv_of), _rows_spec(tk, fv, kv_of),
         _rows_spec(tq, fv, _own_tile), _lanes_spec(tq, _own_tile),
         _lanes_spec(tq, _own_tile)] + table_specs,
        out_specs, out_shape, scratch, [qt, kt, vt, dot, lset, deltat] + table_args, cost,
        name="na_pallas_tpu_dq", interpret=interpret)
    dq, drpb = (dq_out[0], dq_out[1]) if plan.has_rpb else (dq_out[0], None)

    q_of = _q_tile_of(plan)
    pairs = heads * _pairs(plan, inverse=True)
    cost = pl.CostEstimate(
        flops=4 * pairs * tq * tk * (fq + fv), transcendentals=pairs * tq * tk,
        bytes_accessed=2 * _nbytes(kt, vt) + pairs * tq * ((fq + fv) * itemsize + 8))
    dk, dv = _call(
        _dkv_kernel, plan, (bg, h, nk_rows // tk, _q_steps(plan)),
        [_rows_spec(tq, fq, q_of), _rows_spec(tk, fq, _own_tile), _rows_spec(tk, fv, _own_tile),
         _rows_spec(tq, fv, q_of), _lanes_spec(tq, q_of), _lanes_spec(tq, q_of)] + table_specs,
        [_rows_spec(tk, fq, _own_tile), _rows_spec(tk, fv, _own_tile)],
        [jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        [pltpu.VMEM((tk, fq), jnp.float32), pltpu.VMEM((tk, fv), jnp.float32)],
        [qt, kt, vt, dot, lset, deltat] + table_args, cost, name="na_pallas_tpu_dkv",
        interpret=interpret)
    return dq, dk, dv, drpb


# ----------------------------------------------------------------------- forward / backward


def _plans(query, p: NAParams, rpb, blocks: BlockSizes):
    lengths = query.shape[1:1 + p.rank]
    has_rpb = rpb is not None
    return (_make_plan(p, lengths, blocks.q, blocks.kv, has_rpb),
            _make_plan(p, lengths, blocks.q_bwd, blocks.kv_bwd, has_rpb))


def _table(rpb: jax.Array) -> jax.Array:
    """``[h, 2K-1, ...]`` -> ``[h, 1, P]`` float32, ``P`` a multiple of 128 (zero padded)."""
    flat = rpb.reshape(rpb.shape[0], -1).astype(jnp.float32)
    size = -(-flat.shape[1] // LANES) * LANES
    return jnp.pad(flat, [(0, 0), (0, size - flat.shape[1])])[:, None, :]


def _lanes(x: jax.Array) -> jax.Array:
    """``[BG, h, N]`` -> ``[BG, h, 1, N]``."""
    return x[:, :, None, :]


def _retile(x, plan_from: _Plan, tile_from, plan_to: _Plan, tile_to, batch: int):
    """A tiled operand re-permuted for other tiles (identity when the tiles agree)."""
    if tuple(tile_from) == tuple(tile_to):
        return x
    return _to_tiles(_from_tiles(x, plan_from, tile_from, batch), plan_to, tile_to)


def _forward(query, key, value, rpb, p: NAParams, blocks: BlockSizes, interpret):
    """Returns ``(out, lse, residuals)`` where the residuals are the tiled operands."""
    plan, _ = _plans(query, p, rpb, blocks)
    qt = _to_tiles(query, plan, plan.q_tile)
    kt = _to_tiles(key, plan, plan.kv_tile)
    vt = _to_tiles(value, plan, plan.kv_tile)
    table = _table(rpb) if rpb is not None else None
    out_t, lse_t = _forward_call(qt, kt, vt, table, plan, interpret)
    b = query.shape[0]
    out = _from_tiles(out_t, plan, plan.q_tile, b)
    lse = _from_tiles(lse_t[:, :, 0, :], plan, plan.q_tile, b)
    return out, lse, (qt, kt, vt, out_t, lse_t[:, :, 0, :])


def _backward(residuals, rpb, dout, dlse, p: NAParams, blocks: BlockSizes, interpret):
    """Gradients from the forward's tiled residuals (``dout`` gives the untiled shape)."""
    qt, kt, vt, out_t, lse_t = residuals
    b = dout.shape[0]
    fwd, plan = _plans(dout, p, rpb, blocks)
    qt = _retile(qt, fwd, fwd.q_tile, plan, plan.q_tile, b)
    kt = _retile(kt, fwd, fwd.kv_tile, plan, plan.kv_tile, b)
    vt = _retile(vt, fwd, fwd.kv_tile, plan, plan.kv_tile, b)
    out_t = _retile(out_t, fwd, fwd.q_tile, plan, plan.q_tile, b)
    lse_t = _retile(lse_t, fwd, fwd.q_tile, plan, plan.q_tile, b)
    dot = _to_tiles(dout.astype(vt.dtype), plan, plan.q_tile)
    # Padding query rows have dout == 0, hence delta == 0 and ds == 0: no contribution.
    delta = jnp.sum(out_t.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1)
    if dlse is not None:
        # d lse / d logits = p, so a cotangent on lse only shifts delta.
        delta = delta - _to_tiles(dlse.astype(jnp.float32), plan, plan.q_tile)
    table = _table(rpb) if rpb is not None else None
    dqt, dkt, dvt, drpb_t = _backward_calls(qt, kt, vt, dot, _lanes(lse_t), _lanes(delta),
                                            table, plan, interpret)
    dq = _from_tiles(dqt, plan, plan.q_tile, b)
    dk = _from_tiles(dkt, plan, plan.kv_tile, b)
    dv = _from_tiles(dvt, plan, plan.kv_tile, b)
    drpb = None
    if rpb is not None:
        # Partials of (batch * group, head, query tile) summed by an XLA reduce: no atomics.
        drpb = drpb_t.sum(axis=(0, 2, 3))[:, :plan.rpb_size].reshape(rpb.shape)
        drpb = drpb.astype(rpb.dtype)
    return dq, dk, dv, drpb, (dqt, dkt, dvt, drpb_t)


@functools.partial(jax.custom_vjp, nondiff_argnames=("p", "blocks", "interpret"))
def _na_pallas_tpu(query, key, value, rpb, p: NAParams, blocks: BlockSizes, interpret):
    out, lse, _ = _forward(query, key, value, rpb, p, blocks, interpret)
    return out, lse


def _na_pallas_tpu_fwd(query, key, value, rpb, p, blocks, interpret):
    out, lse, tiled = _forward(query, key, value, rpb, p, blocks, interpret)
    return (out, lse), (tiled, rpb)


def _na_pallas_tpu_bwd(p, blocks, interpret, res, cts):
    tiled, rpb = res
    dout, dlse = cts
    dq, dk, dv, drpb, _ = _backward(tiled, rpb, dout, dlse, p, blocks, interpret)
    return dq, dk, dv, drpb


_na_pallas_tpu.defvjp(_na_pallas_tpu_fwd, _na_pallas_tpu_bwd)


def check_block_sizes(blocks: BlockSizes, p: NAParams) -> None:
    if blocks.rank != p.rank:
        raise ValueError(f"block_sizes={blocks} has rank {blocks.rank}, the input has {p.rank} "
                         "spatial axes")


def na_fused(query: jax.Array, key: jax.Array, value: jax.Array, p: NAParams,
             rpb: jax.Array | None = None, *, block_sizes: BlockSizes | None = None,
             interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Fused neighborhood attention with the Pallas TPU kernels (differentiable, RPB included).

    Args:
      query, key: ``[B, *spatial, heads, head_dim]`` (rank 1-3), float32 or bfloat16.
      value: ``[B, *spatial, heads, head_dim_v]``, same dtype.
      p: normalized parameters (:func:`params.make_params`).
      rpb: optional ``[heads, 2K-1, ...]`` relative positional bias.
      block_sizes: tiles; default :meth:`BlockSizes.get_default`.
      interpret: run in Pallas TPU interpret mode (``True``, or a ``pltpu.InterpretParams``) or
        compiled (``False``); default: compiled when lowered for a TPU, else interpreted
        (chosen per lowering platform with ``lax.platform_dependent``).

    Returns:
      ``(out [B, *spatial, heads, head_dim_v] in value.dtype, lse [B, *spatial, heads] float32)``.
      Gradients flow to query, key, value and rpb (and through lse).
    """
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(query.shape[1:1 + p.rank], p.kernel_size,
                                             p.dilation, max(query.shape[-1], value.shape[-1]),
                                             query.dtype)
    check_block_sizes(block_sizes, p)
    if interpret is not None:
        return _na_pallas_tpu(query, key, value, rpb, p, block_sizes, interpret)
    # Compiled by Mosaic when lowered for a TPU, interpreted for any other platform: decided at
    # lowering (the default backend can be a CPU compiling for a TPU topology).
    return lax.platform_dependent(
        query, key, value, rpb,
        tpu=functools.partial(_na_pallas_tpu, p=p, blocks=block_sizes, interpret=False),
        default=functools.partial(_na_pallas_tpu, p=p, blocks=block_sizes, interpret=True))


def kernel_outputs(query, key, value, p: NAParams, rpb=None, dout=None, dlse=None, *,
                   block_sizes: BlockSizes | None = None, interpret=None
                   ) -> dict[str, jax.Array]:
    """Forward and backward results for tests, computed directly (no custom_vjp), plus the raw
    tiled, padded output of every kernel under ``raw_*``. ``interpret`` defaults to TPU
    interpret mode, where every output buffer starts as NaN, so an element a kernel does not
    write stays NaN in ``raw_*``."""
    if interpret is None:
        interpret = pltpu.InterpretParams()
    blocks = block_sizes or BlockSizes.get_default(query.shape[1:1 + p.rank], p.kernel_size,
                                                   p.dilation, query.shape[-1])
    check_block_sizes(blocks, p)
    out, lse, tiled = _forward(query, key, value, rpb, p, blocks, interpret)
    if dout is None:
        dout = jnp.ones_like(out)
    dq, dk, dv, drpb, (dqt, dkt, dvt, drpb_t) = _backward(tiled, rpb, dout, dlse, p, blocks,
                                                          interpret)
    res = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, raw_out=tiled[3], raw_lse=tiled[4],
               raw_dq=dqt, raw_dk=dkt, raw_dv=dvt)
    if rpb is not None:
        res.update(drpb=drpb, raw_drpb=drpb_t)
    return res


def na_reference(query, key, value, p: NAParams, rpb=None):
    """Pure-jnp reference of :func:`na_fused` (the project's gather backend; autodiff grads)."""
    return reference.na_fused(query, key, value, p, rpb)


# ------------------------------------------------------------------------------- dispatch


def unsupported(query, value, p: NAParams, rpb) -> str | None:
    """Why these kernels cannot take a call (``None``: they can)."""
    if query.dtype not in SUPPORTED_DTYPES:
        return (f"query.dtype={query.dtype}: the pallas_tpu backend supports float32 and "
                "bfloat16")
    if rpb is not None and rpb.dtype not in SUPPORTED_DTYPES:
        return f"rpb.dtype={rpb.dtype}: the pallas_tpu backend supports float32 and bfloat16"
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return (f"head_dim={query.shape[-1]}/{value.shape[-1]}: the pallas_tpu backend supports "
                f"head_dim <= {MAX_HEAD_DIM}")
    return None


def supports(query, key, value, p: NAParams, rpb, platform: str) -> bool:
    """Whether ``backend="auto"`` should pick these kernels: on TPU, for what
    :func:`unsupported` accepts (every configuration the TPU gate compiles for v5e and v4)."""
    return platform == "tpu" and unsupported(query, value, p, rpb) is None


def _backend_fn(query, key, value, p: NAParams, rpb=None):
    why = unsupported(query, value, p, rpb)
    if why:
        raise ValueError(why)
    return na_fused(query, key, value, p, rpb)


def _register() -> None:
    from nat_jax.kernels.ops import register_backend

    register_backend("pallas_tpu", _backend_fn, supports=supports, auto=True)


_register()
