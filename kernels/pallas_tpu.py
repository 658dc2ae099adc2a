"""Block-sparse neighborhood attention for TPU in Pallas (Mosaic): forward, dQ (+dRPB), dK/dV.

One kernel family for 1-D, 2-D and 3-D NA (backend ``"pallas_tpu"`` of :mod:`ops`). Lowered for
a TPU the kernels are compiled by Mosaic; for any other platform the very same kernel bodies run
in Pallas's interpreter (decided per lowering platform with ``lax.platform_dependent``). The
test suite checks them on CPU in Pallas's TPU interpret mode (``pltpu.InterpretParams``:
simulated VMEM and DMAs, NaN-filled buffers) against a float64 oracle, and the TPU gate
(:mod:`tpu_gate`) compiles them with Mosaic for v5e and v4.

Layout (XLA ops around the kernels, the GPU kernels' in :mod:`pallas`): dilation groups are
regrouped to be contiguous and folded into the batch, and each group's tokens are permuted
*tile-major*, so a multi-dimensional tile (e.g. 16x32 rows of a 2-D group) is one contiguous
block of ``prod(tile)`` rows a BlockSpec can fetch. Heads whose head_dim is small share the
lanes of one block (:func:`_layout`: NAT's head_dim 32 puts four heads in 128 lanes) instead of
each padding a vreg to 128 lanes; the mask and bias entries of a tile pair are then computed
once for all of them. ``head_dim`` itself is not padded.

Block sparsity, the way JAX's splash attention does it: the grid is ``(batch * groups, head
groups, own tiles, steps)`` and step ``j`` of a query tile fetches the ``j``-th key tile of
that tile's neighborhood box (:func:`windows.tile_box`: from the window start of its first
query to the window end of its last, per axis). Splash attention reads its block schedule from
tables in SMEM; here it is *computed* per block from the window rules on the scalar core, by the
BlockSpec index maps and the kernel body alike (:func:`_kv_step`), so nothing is materialized
and nothing grows with the map:

* the static step count is the largest box (:func:`windows.tile_box_extent`); a tile whose box
  is smaller repeats its last key tile for the remaining steps, which Pallas does not fetch
  again, and skips their work ("empty" blocks);
* a (query tile, key tile) pair entirely inside every query's window
  (:func:`windows.tile_inside_windows`) skips the per-element mask ("full" blocks); the others
  get the exact mask, :func:`windows.in_window` on iota coordinates ("partial" blocks).

Kernels (online softmax in float32, natural-log domain like splash attention), each with its own
tiles (:class:`BlockSizes`):

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
on lanes); float32 and bfloat16 inputs (float32 logits, softmax and accumulation); head_dim up
to 256; RPB with odd kernels, stride 1 and no causal axis (as everywhere in nat-jax). XLA cannot
partition a Mosaic call: under a context mesh the dispatcher runs the kernels per shard
(:mod:`sharding`).

Not yet run on a TPU: numerics come from the interpreter, compilation from Mosaic for abstract
v5e/v4 chips; speed is unmeasured.
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

from nat_jax.kernels import windows, xla
from nat_jax.kernels.params import NAParams, missing_features
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
      q_dq, kv_dq: the same for the dQ (+ dRPB) kernel, which loops over key tiles per query
        tile (a large query tile cuts its key/value re-reads).
      q_dkv, kv_dkv: the same for the dK/dV kernel, which loops over query tiles per key tile
        (the other way round).

    Each tile holds a multiple of 128 rows in total (``prod(tile) % 128 == 0``): a tile's
    logits are lane-dense and its ``lse`` block fills whole vregs. Entries need not be powers
    of two. Hashable, so it can be a static ``jax.jit`` argument.
    """

    q: tuple[int, ...]
    kv: tuple[int, ...]
    q_dq: tuple[int, ...]
    kv_dq: tuple[int, ...]
    q_dkv: tuple[int, ...]
    kv_dkv: tuple[int, ...]

    def __post_init__(self):
        rank = len(self.q) if isinstance(self.q, tuple) else 0
        for name in ("q", "kv", "q_dq", "kv_dq", "q_dkv", "kv_dkv"):
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
                    dilation: Sequence[int], head_dim: int, dtype=jnp.float32,
                    stride: Sequence[int] | None = None,
                    is_causal: Sequence[bool] | None = None) -> BlockSizes:
        """Per kernel, the candidate tiles (128 to 512 rows on the side it keeps, 128 or 256 on
        the side it visits, spread over the axes by the GPU kernels' rule) whose launch is
        fastest by :func:`_costs` at v5e's FLOP/byte balance: NA on TPU is bound by the
        re-reads of visited tiles, which large own tiles amortize, against the padding and
        the masked work of large tiles on small maps."""
        rank = len(shape)
        return _default_blocks(tuple(shape), tuple(kernel_size), tuple(dilation),
                               tuple(stride or (1,) * rank),
                               tuple(is_causal or (False,) * rank), int(head_dim),
                               jnp.dtype(dtype).itemsize)


# Candidate rows of the tile a kernel keeps (own) and of the tiles it visits.
_OWN_ROWS = (128, 256, 512)
_VISITED_ROWS = (128, 256)
# v5e's peak bf16 FLOP/s and HBM bytes/s: the balance the default tiles are chosen for.
_PEAK_FLOPS, _HBM_BYTES_PER_SECOND = 197e12, 820e9


@functools.lru_cache(maxsize=256)
def _default_blocks(shape, kernel, dilation, stride, causal, head_dim, itemsize) -> BlockSizes:
    rows = [-(-n // d) for n, d in zip(shape, dilation)]
    p = NAParams(kernel, stride, dilation, causal, 1.0)
    lay = _Layout(1, 1, head_dim, head_dim, itemsize)

    def best(kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        options = []
        for own in _OWN_ROWS:
            for visited in _VISITED_ROWS:
                own_tile, visited_tile = _grow_tile(rows, own), _grow_tile(rows, visited)
                q_tile, kv_tile = ((visited_tile, own_tile) if kind == "dkv"
                                   else (own_tile, visited_tile))
                cost = _costs(_make_plan(p, shape, q_tile, kv_tile, False), lay, kind, 1)
                seconds = max(cost.flops / _PEAK_FLOPS,
                              cost.bytes_accessed / _HBM_BYTES_PER_SECOND)
                options.append((seconds, own, visited, q_tile, kv_tile))
        return min(options)[3:]

    (q, kv), (q_dq, kv_dq), (q_dkv, kv_dkv) = best("fwd"), best("dq"), best("dkv")
    return BlockSizes(q, kv, q_dq, kv_dq, q_dkv, kv_dkv)


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


def _gather_bias(table, index):
    """``table[0, index]`` for a ``(1, size)`` float32 row and an int32 matrix ``index``
    (entries outside ``[0, size)`` give arbitrary finite values: only masked pairs have them).
    One lane gather per 128-entry chunk of the table and 128-lane column block of ``index``:
    Mosaic gathers within a vreg only."""
    rows, cols = index.shape
    width = min(cols, LANES)
    blocks = []
    for c0 in range(0, cols, width):
        idx = index[:, c0:c0 + width]
        out = jnp.zeros(idx.shape, jnp.float32)
        for t0 in range(0, table.shape[-1], width):
            chunk = jnp.broadcast_to(table[:, t0:t0 + width], idx.shape)
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


def _lanes_of(head: int, width: int) -> slice:
    """Head ``head``'s features in a block holding a group of heads side by side in lanes."""
    return slice(head * width, (head + 1) * width)


@dataclasses.dataclass(frozen=True)
class _Pair:
    """What every head of a (query tile, key tile) pair shares: the window mask (``None`` for a
    pair entirely inside every window) and the bias table entry of each element."""

    mask: jax.Array | None
    entry: jax.Array | None


def _pair(plan: _Plan, shape, qt, kt, q_loc, qc, k_loc, kc, glen, masked: bool) -> _Pair:
    """Query and key coordinates broadcast against each other, so the same code serves the
    ``[q, k]`` (forward, dQ) and ``[k, q]`` (dK/dV) orientations."""
    mask = jnp.broadcast_to(_window_mask(plan, qc, kc, glen), shape) if masked else None
    entry = None
    if plan.has_rpb:
        w, u, c = _rpb_terms(plan, q_loc, k_loc, qt, kt)
        entry = jnp.broadcast_to(u - w + c, shape)
    return _Pair(mask, entry)


def _logits(plan: _Plan, s, pair: _Pair, table):
    """Scaled logits (natural-log units) plus bias; pairs outside the window hold
    ``_MASK_VALUE``."""
    s = s * plan.scale
    if table is not None:
        s = s + _gather_bias(table, pair.entry)
    return s if pair.mask is None else jnp.where(pair.mask, s, _MASK_VALUE)


def _for_pair_kinds(plan: _Plan, qt, kt, glen, body):
    """``body(masked)`` for the pair's kind: ``masked=False`` when the key tile lies inside
    every query's window (no per-element mask, splash attention's "full" block), else True."""
    inside = _pair_inside(plan, qt, kt, glen)
    pl.when(inside)(lambda: body(False))
    pl.when(jnp.logical_not(inside))(lambda: body(True))


def _row_to_column(row, rows: int):
    """``(1, T)`` lane vector -> ``(T, LANES)`` with each entry broadcast along its row."""
    return jnp.broadcast_to(jnp.broadcast_to(row, (8, rows)).T[:, :1], (rows, LANES))


def _column_to_row(col):
    """``(T, LANES)`` lane-broadcast column -> ``(1, T)``."""
    return col.T[:1, :]


def _grid_point(plan: _Plan, inverse: bool = False):
    """``(step, group lengths, query tile, key tile, runs)`` of the running program (grid
    ``(batch * group, head group, own tile, step)``). The own tile is a query tile, or with
    ``inverse`` (dK/dV) a key tile; the other one is the step's visited tile."""
    step = pl.program_id(3)
    glen = _group_lengths(plan, pl.program_id(0))
    if inverse:
        kt = _unravel(pl.program_id(2), plan.nk)
        qt, run = _q_step(plan, kt, glen, step)
    else:
        qt = _unravel(pl.program_id(2), plan.nq)
        kt, run = _kv_step(plan, qt, glen, step)
    return step, glen, qt, kt, run


# --------------------------------------------------------------------------------- kernels
#
# Every kernel handles ``heads`` heads side by side in lanes (features ``[h * d, (h + 1) * d)``
# of its blocks): the mask and bias entries of a tile pair are computed once for all of them.


def _fwd_kernel(*refs, plan: _Plan, heads: int, dq: int, dv: int):
    if plan.has_rpb:
        q_ref, k_ref, v_ref, rpb_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    step, glen, qt, kt, run = _grid_point(plan)

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def accumulate(masked: bool):
        q_loc, qc = _coords(qt, plan.q_tile, (tq, 1), 0)
        k_loc, kc = _coords(kt, plan.kv_tile, (1, tk), 1)
        pair = _pair(plan, (tq, tk), qt, kt, q_loc, qc, k_loc, kc, glen, masked)
        for h in range(heads):
            fq, fv = _lanes_of(h, dq), _lanes_of(h, dv)
            v = v_ref[:, fv]
            table = None if rpb_ref is None else rpb_ref[h].astype(jnp.float32)
            s = _logits(plan, _dot_nt(q_ref[:, fq], k_ref[:, fq]), pair, table)
            m_prev, l_prev = m_ref[h], l_ref[h]  # (tq, LANES), equal along lanes
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            correction = jnp.exp(m_prev - m_next)
            # A row that has met only masked keys so far (m_next == _MASK_VALUE) accumulates
            # exp(0) = 1 terms here; its first real key rescales them by exp(-huge) = 0.
            p = jnp.exp(s - m_next[:, :1])
            l_ref[h] = l_prev * correction + jnp.sum(p, axis=1, keepdims=True)
            m_ref[h] = m_next
            acc_ref[:, fv] = acc_ref[:, fv] * correction[:, :1] + _dot_nn(p.astype(v.dtype), v)

    pl.when(run)(lambda: _for_pair_kinds(plan, qt, kt, glen, accumulate))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        # Every row (padding rows too, which borrow the last real row's window) has a key.
        for h in range(heads):
            fv = _lanes_of(h, dv)
            l = l_ref[h]
            o_ref[:, fv] = (acc_ref[:, fv] / l[:, :1]).astype(o_ref.dtype)
            lse_ref[h] = _column_to_row(m_ref[h] + jnp.log(l))


def _dq_kernel(*refs, plan: _Plan, heads: int, dq: int, dv: int):
    if plan.has_rpb:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, dq_ref, drpb_ref,
         lse_col, delta_col, acc_ref, drpb_acc) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, lse_col, delta_col,
         acc_ref) = refs
        rpb_ref = drpb_ref = drpb_acc = None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    step, glen, qt, kt, run = _grid_point(plan)

    @pl.when(step == 0)
    def _init():
        for h in range(heads):
            lse_col[h] = _row_to_column(lse_ref[h], tq)
            delta_col[h] = _row_to_column(delta_ref[h], tq)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        if drpb_acc is not None:
            drpb_acc[...] = jnp.zeros(drpb_acc.shape, jnp.float32)

    def accumulate(masked: bool):
        q_loc, qc = _coords(qt, plan.q_tile, (tq, 1), 0)
        k_loc, kc = _coords(kt, plan.kv_tile, (1, tk), 1)
        pair = _pair(plan, (tq, tk), qt, kt, q_loc, qc, k_loc, kc, glen, masked)
        drpb = None if drpb_acc is None else _DrpbPlan(plan, qt, kt, q_loc, tk)
        for h in range(heads):
            fq, fv = _lanes_of(h, dq), _lanes_of(h, dv)
            k = k_ref[:, fq]
            table = None if rpb_ref is None else rpb_ref[h].astype(jnp.float32)
            s = _logits(plan, _dot_nt(q_ref[:, fq], k), pair, table)
            # Masked pairs: exp(_MASK_VALUE - lse) == 0. Padding rows have dout == 0 and
            # delta == 0, so ds == 0 there.
            p = jnp.exp(s - lse_col[h][:, :1])
            ds = p * (_dot_nt(do_ref[:, fv], v_ref[:, fv]) - delta_col[h][:, :1])
            acc_ref[:, fq] += _dot_nn(ds.astype(k.dtype), k)
            if drpb is not None:
                drpb.accumulate(drpb_acc, h, ds)

    pl.when(run)(lambda: _for_pair_kinds(plan, qt, kt, glen, accumulate))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * plan.scale).astype(dq_ref.dtype)
        if drpb_ref is not None:
            drpb_ref[...] = drpb_acc[...]


class _DrpbPlan:
    """dRPB of one tile pair, shared by its heads: adds ``sum over pairs with table entry p of
    ds`` to ``drpb_acc[head, 0, p]``.

    ``E = ds @ onehot(u)`` sums each query's ``ds`` over keys of equal ``u``; the entry of
    ``E[q, m]`` is ``m - w(q) + c``, so lane-gathering ``E[q, p + w(q) - c]`` and summing over
    queries gives the entries ``p`` of one 128-lane chunk. Masked pairs have ``ds == 0``."""

    def __init__(self, plan: _Plan, qt, kt, q_loc, tk: int):
        k_loc, _ = _coords(kt, plan.kv_tile, (tk, 1), 0)
        self.w, u, self.c = _rpb_terms(plan, q_loc, k_loc, qt, kt)  # w (tq, 1), u (tk, 1)
        u_size = sum((t - 1) * s for t, s in zip(plan.kv_tile, _rpb_strides(plan))) + 1
        self.onehots = [(m0, (u == m0 + lax.broadcasted_iota(jnp.int32, (tk, LANES), 1))
                         .astype(jnp.float32)) for m0 in range(0, u_size, LANES)]

    def accumulate(self, drpb_acc, head: int, ds):
        tq = ds.shape[0]
        lanes = lax.broadcasted_iota(jnp.int32, (tq, LANES), 1)
        sums = [(m0, _dot_nn(ds, onehot)) for m0, onehot in self.onehots]  # (tq, LANES) each
        for e0 in range(0, drpb_acc.shape[-1], LANES):
            part = jnp.zeros((tq, LANES), jnp.float32)
            for m0, e in sums:
                idx = lanes + (e0 - m0) + self.w - self.c
                hit = (idx >= 0) & (idx < LANES)
                part = part + jnp.where(
                    hit, jnp.take_along_axis(e, jnp.clip(idx, 0, LANES - 1), axis=1), 0.0)
            drpb_acc[head, :, e0:e0 + LANES] += jnp.sum(part, axis=0, keepdims=True)


def _dkv_kernel(*refs, plan: _Plan, heads: int, dq: int, dv: int):
    if plan.has_rpb:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rpb_ref, dk_ref, dv_ref, dk_acc,
         dv_acc) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc,
         dv_acc), rpb_ref = refs, None
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    step, glen, qt, kt, run = _grid_point(plan, inverse=True)

    @pl.when(step == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def accumulate(masked: bool):
        # Transposed: rows are keys, lanes are queries.
        q_loc, qc = _coords(qt, plan.q_tile, (1, tq), 1)
        k_loc, kc = _coords(kt, plan.kv_tile, (tk, 1), 0)
        pair = _pair(plan, (tk, tq), qt, kt, q_loc, qc, k_loc, kc, glen, masked)
        for h in range(heads):
            fq, fv = _lanes_of(h, dq), _lanes_of(h, dv)
            q, do = q_ref[:, fq], do_ref[:, fv]
            table = None if rpb_ref is None else rpb_ref[h].astype(jnp.float32)
            s = _logits(plan, _dot_nt(k_ref[:, fq], q), pair, table)
            p = jnp.exp(s - lse_ref[h])  # masked pairs: 0
            dv_acc[:, fv] += _dot_nn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(v_ref[:, fv], do) - delta_ref[h])
            dk_acc[:, fq] += _dot_nn(ds.astype(q.dtype), q)

    pl.when(run)(lambda: _for_pair_kinds(plan, qt, kt, glen, accumulate))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------- pallas_call wrappers


def _rows_spec(rows: int, feat: int, tile_of):
    """``rows`` rows (one tile) of a ``[BG, head groups, N, feat]`` operand; ``tile_of(z, i,
    j)`` is the flat tile index for grid point ``(z, group, i, j)``."""
    return pl.BlockSpec((None, None, rows, feat), lambda z, g, i, j: (z, g, tile_of(z, i, j), 0))


def _lanes_spec(rows: int, heads: int, tile_of):
    """One tile of a head group's ``[BG, h, 1, N]`` per-query vectors (lse, delta), rows on
    lanes."""
    return pl.BlockSpec((None, heads, 1, rows),
                        lambda z, g, i, j: (z, g, 0, tile_of(z, i, j)))


def _table_spec(heads: int, size: int):
    return pl.BlockSpec((heads, 1, size), lambda z, g, i, j: (g, 0, 0))


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


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How heads are laid out for the kernels: ``groups`` programs per (batch, dilation group),
    each with ``heads`` heads side by side in lanes (``dq``/``dv`` features each)."""

    heads: int
    groups: int
    dq: int
    dv: int
    itemsize: int

    def row_bytes(self, features: int) -> int:
        """HBM bytes of one row of ``features`` lanes (padded to whole 128-lane tiles)."""
        return -(-features // LANES) * LANES * self.itemsize


def _layout(heads: int, dq: int, dv: int, dtype) -> _Layout:
    """The largest divisor of ``heads`` whose features fit one 128-lane vreg row (at least 1):
    small head dims (NAT's 32) share lanes instead of each padding a vreg to 128 lanes."""
    width = max(dq, dv)
    per = max([h for h in range(1, heads + 1) if heads % h == 0 and h * width <= LANES],
              default=1)
    return _Layout(per, heads // per, dq, dv, jnp.dtype(dtype).itemsize)


def _call(kernel, plan: _Plan, lay: _Layout, grid, in_specs, out_specs, out_shape, scratch,
          args, cost, *, name: str, interpret):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan, heads=lay.heads, dq=lay.dq, dv=lay.dv),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret, name=name,
    )(*args)


def _costs(plan: _Plan, lay: _Layout, kind: str, batch: int) -> pl.CostEstimate:
    """FLOPs, exponentials and HBM bytes of one kernel launch (``kind``: "fwd", "dq", "dkv"),
    counting the padded rows and lanes the kernel really moves: its own tiles once, the other
    side's tiles once per visited pair (the K/V or Q/dO re-reads of block sparsity)."""
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    own_rows = math.prod(n * t for n, t in zip(plan.nk if kind == "dkv" else plan.nq,
                                               plan.kv_tile if kind == "dkv" else plan.q_tile))
    # ``own``: bytes per row of the tiles the kernel keeps; ``visited``: per visited tile.
    units = batch * plan.groups * lay.groups  # (batch * dilation group, head group) programs
    pairs = batch * lay.groups * _pairs(plan, inverse=kind == "dkv")  # _pairs sums the groups
    qk, pv = lay.row_bytes(lay.heads * lay.dq), lay.row_bytes(lay.heads * lay.dv)
    per_query = 2 * 4 * lay.heads  # lse and delta (float32)
    if kind == "fwd":
        flops, own, visited = 2 * (lay.dq + lay.dv), qk + pv + per_query // 2, tk * (qk + pv)
    elif kind == "dq":
        flops, own, visited = 2 * (2 * lay.dq + lay.dv), 2 * qk + pv + per_query, tk * (qk + pv)
    else:
        flops, own = 4 * (lay.dq + lay.dv), 2 * (qk + pv)
        visited = tq * (qk + pv + per_query)
    flops *= lay.heads * tq * tk
    return pl.CostEstimate(
        flops=int(pairs * flops), transcendentals=int(pairs * lay.heads * tq * tk),
        bytes_accessed=int(units * own_rows * own + pairs * visited))


def _forward_call(qt, kt, vt, table, plan: _Plan, lay: _Layout, interpret):
    """Forward kernel on tiled operands -> ``(out [BG, g, Nq, heads * dv], lse [BG, h, 1,
    Nq])``."""
    bg, groups, nrows, fq = qt.shape
    fv = vt.shape[-1]
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    kv_of = _kv_tile_of(plan)
    in_specs = [_rows_spec(tq, fq, _own_tile), _rows_spec(tk, fq, kv_of),
                _rows_spec(tk, fv, kv_of)]
    args = [qt, kt, vt]
    if plan.has_rpb:
        in_specs.append(_table_spec(lay.heads, table.shape[-1]))
        args.append(table)
    out_shape = [jax.ShapeDtypeStruct((bg, groups, nrows, fv), vt.dtype),
                 jax.ShapeDtypeStruct((bg, groups * lay.heads, 1, nrows), jnp.float32)]
    out_specs = [_rows_spec(tq, fv, _own_tile), _lanes_spec(tq, lay.heads, _own_tile)]
    scratch = [pltpu.VMEM((lay.heads, tq, LANES), jnp.float32),
               pltpu.VMEM((lay.heads, tq, LANES), jnp.float32),
               pltpu.VMEM((tq, fv), jnp.float32)]
    return _call(_fwd_kernel, plan, lay, (bg, groups, nrows // tq, _kv_steps(plan)), in_specs,
                 out_specs, out_shape, scratch, args,
                 _costs(plan, lay, "fwd", bg // plan.groups),
                 name="na_pallas_tpu_fwd", interpret=interpret)


def _dq_call(qt, kt, vt, dot, lset, deltat, table, plan: _Plan, lay: _Layout, interpret):
    """dQ kernel (with RPB also the dRPB partials ``[BG, h, nq, 1, table]``)."""
    bg, groups, nrows, fq = qt.shape
    fv = vt.shape[-1]
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    kv_of = _kv_tile_of(plan)
    in_specs = [_rows_spec(tq, fq, _own_tile), _rows_spec(tk, fq, kv_of),
                _rows_spec(tk, fv, kv_of), _rows_spec(tq, fv, _own_tile),
                _lanes_spec(tq, lay.heads, _own_tile), _lanes_spec(tq, lay.heads, _own_tile)]
    args = [qt, kt, vt, dot, lset, deltat]
    out_shape = [jax.ShapeDtypeStruct(qt.shape, qt.dtype)]
    out_specs = [_rows_spec(tq, fq, _own_tile)]
    scratch = [pltpu.VMEM((lay.heads, tq, LANES), jnp.float32),
               pltpu.VMEM((lay.heads, tq, LANES), jnp.float32),
               pltpu.VMEM((tq, fq), jnp.float32)]
    nqt = nrows // tq
    if plan.has_rpb:
        size = table.shape[-1]
        in_specs.append(_table_spec(lay.heads, size))
        args.append(table)
        out_shape.append(jax.ShapeDtypeStruct((bg, groups * lay.heads, nqt, 1, size),
                                              jnp.float32))
        out_specs.append(pl.BlockSpec((None, lay.heads, None, 1, size),
                                      lambda z, g, i, j: (z, g, i, 0, 0)))
        scratch.append(pltpu.VMEM((lay.heads, 1, size), jnp.float32))
    out = _call(_dq_kernel, plan, lay, (bg, groups, nqt, _kv_steps(plan)), in_specs, out_specs,
                out_shape, scratch, args, _costs(plan, lay, "dq", bg // plan.groups),
                name="na_pallas_tpu_dq", interpret=interpret)
    return (out[0], out[1]) if plan.has_rpb else (out[0], None)


def _dkv_call(qt, kt, vt, dot, lset, deltat, table, plan: _Plan, lay: _Layout, interpret):
    """dK/dV kernel on operands tiled for ``plan``."""
    bg, groups, _, fq = qt.shape
    nrows, fv = kt.shape[2], vt.shape[-1]
    tq, tk = math.prod(plan.q_tile), math.prod(plan.kv_tile)
    q_of = _q_tile_of(plan)
    in_specs = [_rows_spec(tq, fq, q_of), _rows_spec(tk, fq, _own_tile),
                _rows_spec(tk, fv, _own_tile), _rows_spec(tq, fv, q_of),
                _lanes_spec(tq, lay.heads, q_of), _lanes_spec(tq, lay.heads, q_of)]
    args = [qt, kt, vt, dot, lset, deltat]
    if plan.has_rpb:
        in_specs.append(_table_spec(lay.heads, table.shape[-1]))
        args.append(table)
    return _call(
        _dkv_kernel, plan, lay, (bg, groups, nrows // tk, _q_steps(plan)), in_specs,
        [_rows_spec(tk, fq, _own_tile), _rows_spec(tk, fv, _own_tile)],
        [jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        [pltpu.VMEM((tk, fq), jnp.float32), pltpu.VMEM((tk, fv), jnp.float32)], args,
        _costs(plan, lay, "dkv", bg // plan.groups), name="na_pallas_tpu_dkv",
        interpret=interpret)


# ----------------------------------------------------------------------- forward / backward


def _plans(shape, p: NAParams, has_rpb: bool, blocks: BlockSizes):
    """Forward, dQ and dK/dV plans for an input of ``shape`` ``[B, *spatial, h, d]``."""
    lengths = shape[1:1 + p.rank]
    return (_make_plan(p, lengths, blocks.q, blocks.kv, has_rpb),
            _make_plan(p, lengths, blocks.q_dq, blocks.kv_dq, has_rpb),
            _make_plan(p, lengths, blocks.q_dkv, blocks.kv_dkv, has_rpb))


def _table(rpb: jax.Array) -> jax.Array:
    """``[h, 2K-1, ...]`` -> ``[h, 1, P]`` float32, ``P`` a multiple of 128 (zero padded)."""
    flat = rpb.reshape(rpb.shape[0], -1).astype(jnp.float32)
    size = -(-flat.shape[1] // LANES) * LANES
    return jnp.pad(flat, [(0, 0), (0, size - flat.shape[1])])[:, None, :]


def _tiles(x: jax.Array, plan: _Plan, tile, lay: _Layout) -> jax.Array:
    """``[B, *spatial, h, d]`` -> ``[BG, head groups, N, heads * d]`` (heads side by side)."""
    x = x.reshape(*x.shape[:-2], lay.groups, lay.heads * x.shape[-1])
    return _to_tiles(x, plan, tile)


def _untile(y: jax.Array, plan: _Plan, tile, batch: int, lay: _Layout) -> jax.Array:
    """Inverse of :func:`_tiles`."""
    x = _from_tiles(y, plan, tile, batch)
    return x.reshape(*x.shape[:-2], lay.groups * lay.heads, -1)


def _lanes(x: jax.Array) -> jax.Array:
    """``[BG, h, N]`` -> ``[BG, h, 1, N]``."""
    return x[:, :, None, :]


def _retile(x, plan_from: _Plan, tile_from, plan_to: _Plan, tile_to, batch: int):
    """A tiled operand re-permuted for other tiles (identity when the tiles agree)."""
    if tuple(tile_from) == tuple(tile_to):
        return x
    return _to_tiles(_from_tiles(x, plan_from, tile_from, batch), plan_to, tile_to)


def _forward(query, key, value, rpb, p: NAParams, blocks: BlockSizes, interpret):
    """Returns ``(out, lse, residuals, raw)``: the residuals are the tiled operands and lse, raw
    the kernel's own (tiled, padded) outputs."""
    plan, _, _ = _plans(query.shape, p, rpb is not None, blocks)
    lay = _layout(query.shape[-2], query.shape[-1], value.shape[-1], query.dtype)
    qt = _tiles(query, plan, plan.q_tile, lay)
    kt = _tiles(key, plan, plan.kv_tile, lay)
    vt = _tiles(value, plan, plan.kv_tile, lay)
    table = _table(rpb) if rpb is not None else None
    out_t, lse_t = _forward_call(qt, kt, vt, table, plan, lay, interpret)
    b = query.shape[0]
    out = _untile(out_t, plan, plan.q_tile, b, lay)
    lse = _from_tiles(lse_t[:, :, 0, :], plan, plan.q_tile, b)
    return out, lse, (qt, kt, vt, lse_t[:, :, 0, :]), (out_t, lse_t)


def _backward(residuals, rpb, out, dout, dlse, p: NAParams, blocks: BlockSizes, interpret):
    """Gradients from the forward's tiled residuals and its output."""
    qt, kt, vt, lse_t = residuals
    b, heads = dout.shape[0], dout.shape[-2]
    fwd, plan_dq, plan_dkv = _plans(dout.shape, p, rpb is not None, blocks)
    lay = _layout(heads, qt.shape[-1] * qt.shape[1] // heads, dout.shape[-1], qt.dtype)
    # Padding query rows have dout == 0, hence delta == 0 and ds == 0: no contribution.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    if dlse is not None:
        # d lse / d logits = p, so a cotangent on lse only shifts delta.
        delta = delta - dlse.astype(jnp.float32)
    table = _table(rpb) if rpb is not None else None

    def operands(plan):
        """q, k, v, dout, lse, delta tiled for ``plan`` (the forward's tiles reused as is)."""
        return (_retile(qt, fwd, fwd.q_tile, plan, plan.q_tile, b),
                _retile(kt, fwd, fwd.kv_tile, plan, plan.kv_tile, b),
                _retile(vt, fwd, fwd.kv_tile, plan, plan.kv_tile, b),
                _tiles(dout.astype(vt.dtype), plan, plan.q_tile, lay),
                _lanes(_retile(lse_t, fwd, fwd.q_tile, plan, plan.q_tile, b)),
                _lanes(_to_tiles(delta, plan, plan.q_tile)))

    dqt, drpb_t = _dq_call(*operands(plan_dq), table, plan_dq, lay, interpret)
    dkt, dvt = _dkv_call(*operands(plan_dkv), table, plan_dkv, lay, interpret)
    dq = _untile(dqt, plan_dq, plan_dq.q_tile, b, lay)
    dk = _untile(dkt, plan_dkv, plan_dkv.kv_tile, b, lay)
    dv = _untile(dvt, plan_dkv, plan_dkv.kv_tile, b, lay)
    drpb = None
    if rpb is not None:
        # Partials of (batch * group, head, query tile) summed by an XLA reduce: no atomics.
        drpb = drpb_t.sum(axis=(0, 2, 3))[:, :plan_dq.rpb_size].reshape(rpb.shape)
        drpb = drpb.astype(rpb.dtype)
    return dq, dk, dv, drpb, (dqt, dkt, dvt, drpb_t)


@functools.partial(jax.custom_vjp, nondiff_argnames=("p", "blocks", "interpret"))
def _na_pallas_tpu(query, key, value, rpb, p: NAParams, blocks: BlockSizes, interpret):
    return _na_pallas_tpu_fwd(query, key, value, rpb, p, blocks, interpret)[0]


def _na_pallas_tpu_fwd(query, key, value, rpb, p, blocks, interpret):
    # Non-finite inputs stay inside their windows as on the other backends
    # (xla.contain_nonfinite); the residuals keep the inputs as given.
    out, lse, tiled, _ = _forward(query, key, value, rpb, p, blocks, interpret)

    def run(clean):
        return _forward(*clean((query, key, value, rpb)), p, blocks, interpret)[:2]

    out, lse = xla.contain_nonfinite((out, lse), run,
                                     lambda: xla.na_fused_contained(query, key, value, p, rpb))
    return (out, lse), (tiled, rpb, out)


def _inputs_from_residuals(tiled, rpb, dout, p: NAParams, blocks: BlockSizes):
    """``(query, key, value, lse)`` back from the forward's tiled residuals (only where a
    non-finite value needs the xla path's contained backward)."""
    qt, kt, vt, lse_t = tiled
    b, heads = dout.shape[0], dout.shape[-2]
    plan, _, _ = _plans(dout.shape, p, rpb is not None, blocks)
    lay = _layout(heads, qt.shape[-1] * qt.shape[1] // heads, dout.shape[-1], qt.dtype)
    return (_untile(qt, plan, plan.q_tile, b, lay), _untile(kt, plan, plan.kv_tile, b, lay),
            _untile(vt, plan, plan.kv_tile, b, lay), _from_tiles(lse_t, plan, plan.q_tile, b))


def _na_pallas_tpu_bwd(p, blocks, interpret, res, cts):
    tiled, rpb, out = res
    dout, dlse = cts

    def run(clean):
        return _backward(*clean((tiled, rpb, out, dout, dlse)), p, blocks, interpret)[:4]

    def exact():
        query, key, value, lse = _inputs_from_residuals(tiled, rpb, dout, p, blocks)
        return xla.na_backward_contained(query, key, value, rpb, out, lse, dout, dlse, p)

    return xla.contain_nonfinite(run(lambda x: x), run, exact)


_na_pallas_tpu.defvjp(_na_pallas_tpu_fwd, _na_pallas_tpu_bwd)


def default_block_sizes(query, value, p: NAParams) -> BlockSizes:
    """:meth:`BlockSizes.get_default` for a call's arguments."""
    return BlockSizes.get_default(query.shape[1:1 + p.rank], p.kernel_size, p.dilation,
                                  max(query.shape[-1], value.shape[-1]), query.dtype, p.stride,
                                  p.is_causal)


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
        block_sizes = default_block_sizes(query, value, p)
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
    blocks = block_sizes or default_block_sizes(query, value, p)
    check_block_sizes(blocks, p)
    out, lse, tiled, (out_t, lse_t) = _forward(query, key, value, rpb, p, blocks, interpret)
    if dout is None:
        dout = jnp.ones_like(out)
    dq, dk, dv, drpb, (dqt, dkt, dvt, drpb_t) = _backward(tiled, rpb, out, dout, dlse, p,
                                                          blocks, interpret)
    res = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, raw_out=out_t, raw_lse=lse_t,
               raw_dq=dqt, raw_dk=dkt, raw_dv=dvt)
    if rpb is not None:
        res.update(drpb=drpb, raw_drpb=drpb_t)
    return res


# ------------------------------------------------------------------------------- dispatch


def unsupported(query, value, p: NAParams, rpb) -> str | None:
    """Why these kernels cannot take a call (``None``: they can). ``backend="auto"`` picks them
    on TPU for everything else: every configuration the TPU gate compiles for v5e and v4
    (ranks 1-3, each feature, both dtypes, head dims 16 to 256)."""
    why = missing_features(query, value, p, "pallas_tpu")
    if why:
        return why
    if query.dtype not in SUPPORTED_DTYPES:
        return (f"query.dtype={query.dtype}: the pallas_tpu backend supports float32 and "
                "bfloat16")
    if rpb is not None and rpb.dtype not in SUPPORTED_DTYPES:
        return f"rpb.dtype={rpb.dtype}: the pallas_tpu backend supports float32 and bfloat16"
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return (f"head_dim={query.shape[-1]}/{value.shape[-1]}: the pallas_tpu backend supports "
                f"head_dim <= {MAX_HEAD_DIM}")
    return None
