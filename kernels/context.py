"""Context parallelism: neighborhood attention with spatial axes sharded over devices.

A token grid too large for one device is split along its spatial axes over mesh axes, and
every device computes the output of its own queries. A neighborhood reaches a bounded distance,
so each device needs only a *halo* of key/value rows from the devices beside it; it receives
them with ``jax.lax.ppermute`` (a collective-permute: point to point, no all-gather) inside
``jax.shard_map``, runs the ordinary single-device NA of any backend on its shard plus halo, and
keeps its own queries' part. The backward pass is the transpose of the same program: the
gradient of a halo row is sent back to the device that owns it.

Exactness: the window of a query is decided by its *global* position (shifted border windows,
dilation groups, stride blocks, causal ends, periodic wrap), not by the shard. Each device runs
NA on a local key range chosen so that the local window rules give every one of its queries
exactly its global window (same keys, same slot order, hence the same RPB entries), and the
plan is *verified* when it is built (at trace time, in numpy, against
:func:`windows.neighbor_indices` of the whole axis) rather than assumed:

* interior shards take ``halo_left`` rows before and ``halo_right`` after their own rows, the
  largest reach of any of their windows, so no local window is clamped;
* the first and last shards take their whole local range from one side (the global border is
  the local border, so border windows shift inwards exactly as globally);
* with stride > 1 the local range must start on a stride block (shard length a multiple of
  ``stride * dilation``); periodic axes exchange around the ring and run locally as ordinary
  axes (every window centred, none wraps).

Where a halo is longer than a neighbour's shard (large kernels or dilations), rows come from
devices several hops away (one ``ppermute`` per hop, forwarding nothing twice); where the
local range would be the whole axis, or no verified halo plan exists (e.g. stride blocks that
cannot align with the shards, or a periodic axis whose dilation does not divide its length),
the axis is all-gathered instead, which is always exact. :func:`plan_axis` says which.

Cost: each device computes NA for its local range (``shard + halo`` rows per sharded axis;
the halo queries' outputs are dropped), and receives ``halo`` rows of key and value per
sharded axis (:attr:`AxisPlan.received_rows`).
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
from jax.sharding import PartitionSpec as P

from nat_jax.kernels import windows
from nat_jax.kernels.params import NAParams

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis of ``length`` tokens, split into ``shards`` equal blocks, is
    extended to each shard's local key range.

    Attributes:
      length, shards: the global axis and the number of devices it is split over.
      window: rows of the local range every shard computes on (``shard`` + halo).
      starts: per shard, where its own rows begin inside its local range (the rows received
        from the devices before it); ``window - shard - starts[i]`` rows come from after it.
      gather: the axis is all-gathered (the local range is the whole axis) instead.
      periodic: the local NA keeps the axis periodic (only when gathered; with halos the ring
        is unrolled into the local range).
    """

    length: int
    shards: int
    window: int
    starts: tuple[int, ...]
    gather: bool
    periodic: bool

    @property
    def shard(self) -> int:
        return self.length // self.shards

    @property
    def before(self) -> tuple[int, ...]:
        return self.starts

    @property
    def after(self) -> tuple[int, ...]:
        return tuple(self.window - self.shard - s for s in self.starts)

    @property
    def received_rows(self) -> int:
        """Most rows any one device receives along this axis (per key and per value)."""
        return max(b + a for b, a in zip(self.before, self.after))


def _global_windows(length: int, kernel: int, stride: int, dilation: int, causal: bool,
                    periodic: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, valid, reach)`` of every query of the axis: its window's key indices and slot
    validity (:func:`windows.neighbor_indices`), and the window's keys in unwrapped
    coordinates (periodic windows may reach before 0 or past the end)."""
    idx, valid = windows.neighbor_indices(length, kernel, stride, dilation, causal, periodic)
    i = np.arange(length)
    g, ic = i % dilation, i // dilation
    glen = windows.group_length(length, dilation, g)
    start, _ = windows.window_bounds(ic, glen, kernel, stride, causal, periodic=periodic)
    reach = g[:, None] + (start[:, None] + np.arange(kernel)) * dilation
    return idx, valid, reach


def _verify(g_idx: np.ndarray, g_valid: np.ndarray, shards: int, window: int,
            firsts: np.ndarray, kernel: int, stride: int, dilation: int, causal: bool) -> bool:
    """Whether NA over the local range ``firsts[i] + [0, window)`` (modulo the axis length on
    a periodic axis, run there as an ordinary axis) gives every query of shard ``i`` its
    global window (``g_idx``, ``g_valid``: :func:`_global_windows`), slot by slot."""
    if kernel * dilation > window:
        return False
    length = len(g_idx)
    m = length // shards
    l_idx, l_valid = windows.neighbor_indices(window, kernel, stride, dilation, causal, False)
    for i in range(shards):
        q = i * m + np.arange(m)
        local_q = q - firsts[i]
        lv = l_valid[local_q]
        if not np.array_equal(lv, g_valid[q]):
            return False
        keys = (l_idx[local_q] + firsts[i]) % length
        if not np.array_equal(np.where(lv, keys, 0), np.where(lv, g_idx[q], 0)):
            return False
    return True


@functools.lru_cache(maxsize=256)
def plan_axis(length: int, shards: int, kernel: int, stride: int = 1, dilation: int = 1,
              causal: bool = False, periodic: bool = False) -> AxisPlan:
    """The verified exchange plan of one spatial axis split into ``shards`` equal blocks.

    Tries the smallest halos first (the largest reach of any shard's windows), widening them
    by up to ``stride * dilation`` rows per side to align stride blocks; if no candidate
    verifies, or the local range would cover the axis, the plan all-gathers the axis.

    Raises:
      ValueError: ``length`` not divisible by ``shards``.
    """
    if shards < 1 or length % shards:
        raise ValueError(f"a spatial axis of length {length} cannot be split into {shards} "
                         f"equal shards (context parallelism needs length % shards == 0)")
    gathered = AxisPlan(length, shards, length, tuple(i * (length // shards)
                                                      for i in range(shards)), True, periodic)
    if shards == 1:
        return dataclasses.replace(gathered, gather=False)
    m = length // shards
    idx, valid, reach = _global_windows(length, kernel, stride, dilation, causal, periodic)
    s0 = np.arange(shards) * m
    lo = np.array([reach[s:s + m][valid[s:s + m]].min() for s in s0])
    hi = np.array([reach[s:s + m][valid[s:s + m]].max() + 1 for s in s0])
    left0 = int(max(0, (s0 - lo).max()))
    right0 = int(max(0, (hi - s0 - m).max()))
    span = stride * dilation
    for extra in range(2 * span + 1):
        for el in range(extra + 1):
            left, right = left0 + el, right0 + extra - el
            window = left + m + right
            if window >= length:
                continue
            firsts = s0 - left
            if not periodic:
                firsts = np.clip(firsts, 0, length - window)
            if _verify(idx, valid, shards, window, firsts, kernel, stride, dilation, causal):
                return AxisPlan(length, shards, window, tuple(int(x) for x in s0 - firsts),
                                False, False)
    return gathered


def _hop_pieces(x: jax.Array, dim: int, plan: AxisPlan, axis_name, needs: Sequence[int],
                hop: int, from_before: bool) -> jax.Array | None:
    """Rows that each shard receives from the shard ``hop`` places before (``from_before``) or
    after it: receiver ``i`` needs the ``needs[i] - (hop - 1) * shard`` rows of that sender
    nearest to it (at most a whole shard). One ``ppermute`` per distinct amount, each sending
    only the rows the previous ones did not, to only the receivers that need them; receivers
    outside a permutation get zeros, which lie outside their local range."""
    m, n = plan.shard, plan.shards
    amounts = [min(m, max(0, need - (hop - 1) * m)) for need in needs]
    if not any(amounts):
        return None
    pieces, done = [], 0
    for amount in sorted(set(a for a in amounts if a)):
        perm = []
        for i, a in enumerate(amounts):
            if a >= amount:
                sender = (i - hop) % n if from_before else (i + hop) % n
                perm.append((sender, i))
        # Rows nearest the receiver: a sender's last rows for the shard after it.
        lo, hi = (m - amount, m - done) if from_before else (done, amount)
        pieces.append(lax.ppermute(lax.slice_in_dim(x, lo, hi, axis=dim), axis_name, perm))
        done = amount
    if from_before:
        pieces = pieces[::-1]
    return jnp.concatenate(pieces, axis=dim) if len(pieces) > 1 else pieces[0]


def local_range(x: jax.Array, dim: int, plan: AxisPlan, axis_name) -> jax.Array:
    """Inside ``shard_map``: this shard's rows of ``x`` along ``dim`` extended to its local
    range (``plan.window`` rows: halos from the shards around it, or the whole gathered axis)."""
    if plan.gather:
        return lax.all_gather(x, axis_name, axis=dim, tiled=True)
    if plan.window == plan.shard:
        return x
    m = plan.shard
    before, after = plan.before, plan.after
    left, right = max(before), max(after)
    parts = []
    for hop in range(-(-left // m), 0, -1):
        parts.append(_hop_pieces(x, dim, plan, axis_name, before, hop, True))
    parts.append(x)
    for hop in range(1, -(-right // m) + 1):
        parts.append(_hop_pieces(x, dim, plan, axis_name, after, hop, False))
    extended = jnp.concatenate([p for p in parts if p is not None], axis=dim)
    offset = jnp.asarray(np.array([left - b for b in before], np.int32))[
        lax.axis_index(axis_name)]
    return lax.dynamic_slice_in_dim(extended, offset, plan.window, axis=dim)


def _own_offset(plan: AxisPlan, axis_name) -> jax.Array:
    return jnp.asarray(np.array(plan.starts, np.int32))[lax.axis_index(axis_name)]


def embed_queries(q: jax.Array, dims: Sequence[int], plans: Sequence[AxisPlan],
                  names: Sequence) -> jax.Array:
    """This shard's queries placed at their rows of the local range, zeros elsewhere (halo
    queries are computed and dropped; zero queries keep them finite and, their outputs being
    dropped, they contribute nothing to any gradient)."""
    shape = list(q.shape)
    start = [jnp.int32(0)] * q.ndim
    for dim, plan, name in zip(dims, plans, names):
        shape[dim] = plan.window
        start[dim] = _own_offset(plan, name)
    return lax.dynamic_update_slice(jnp.zeros(shape, q.dtype), q, start)


def own_part(x: jax.Array, dims: Sequence[int], plans: Sequence[AxisPlan],
             names: Sequence) -> jax.Array:
    """This shard's rows of a result computed over the local range."""
    shape = list(x.shape)
    start = [jnp.int32(0)] * x.ndim
    for dim, plan, name in zip(dims, plans, names):
        shape[dim] = plan.shard
        start[dim] = _own_offset(plan, name)
    return lax.dynamic_slice(x, start, shape)


# ------------------------------------------------------------------ layout over a mesh


def _names(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axis_names(spatial_axes: Sequence[MeshAxes]) -> tuple[str, ...]:
    """Every mesh axis a ``spatial_axes`` argument names, in order."""
    return tuple(n for entry in spatial_axes for n in _names(entry))


def _spec_entry(names: tuple[str, ...]):
    return None if not names else (names[0] if len(names) == 1 else names)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one context-parallel call: the mesh, the mesh axes of each
    spatial axis (and of batch and heads), each sharded axis's :class:`AxisPlan`, and the
    parameters of the NA every device runs on its local range."""

    mesh: object  # jax.sharding.Mesh or AbstractMesh (hashable)
    spatial: tuple[tuple[str, ...], ...]
    batch: tuple[str, ...]
    heads: tuple[str, ...]
    plans: tuple[AxisPlan | None, ...]
    local_params: NAParams

    def size(self, names: tuple[str, ...]) -> int:
        return int(math.prod(self.mesh.shape[a] for a in names))

    def tokens_spec(self, lse: bool = False) -> P:
        entries = [_spec_entry(self.batch), *(_spec_entry(s) for s in self.spatial),
                   _spec_entry(self.heads)]
        return P(*entries) if lse else P(*entries, None)

    def bias_spec(self) -> P:
        return P(_spec_entry(self.heads), *([None] * len(self.spatial)))

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of a ``[B, *spatial, heads, dim]`` operand as each device's kernel sees it
        (batch and heads split, sharded spatial axes extended to their local ranges)."""
        out = list(shape)
        out[0] //= self.size(self.batch)
        out[-2] //= self.size(self.heads)
        for a, plan in enumerate(self.plans):
            if plan is not None:
                out[1 + a] = plan.window
        return tuple(out)


def make_layout(mesh, spatial_axes: Sequence[MeshAxes], shape: tuple[int, ...], heads: int,
                heads_kv: int, p: NAParams) -> Layout:
    """Validate ``spatial_axes`` (one entry per spatial axis: a mesh axis name, a tuple of
    names, or None) against ``mesh`` and the query ``shape``, split batch and heads over the
    other mesh axes (as :func:`sharding.partition_axes`), and plan every sharded axis.

    Raises:
      ValueError: naming the entry and the rule it breaks.
    """
    from nat_jax.kernels.sharding import partition_axes

    rank = p.rank
    if len(spatial_axes) != rank:
        raise ValueError(f"spatial_axes={tuple(spatial_axes)!r} must have one entry per spatial "
                         f"axis ({rank})")
    spatial = tuple(_names(e) for e in spatial_axes)
    used: list[str] = []
    for a, names in enumerate(spatial):
        for name in names:
            if name not in mesh.axis_names:
                raise ValueError(f"spatial_axes={tuple(spatial_axes)!r}: {name!r} (axis {a}) is "
                                 f"not an axis of the mesh {tuple(mesh.axis_names)}")
            if name in used:
                raise ValueError(f"spatial_axes={tuple(spatial_axes)!r}: mesh axis {name!r} "
                                 "is used twice")
            used.append(name)
    plans = []
    for a, names in enumerate(spatial):
        shards = int(math.prod(mesh.shape[n] for n in names))
        length = shape[1 + a]
        if length % shards:
            raise ValueError(f"spatial_axes={tuple(spatial_axes)!r}: axis {a} has {length} "
                             f"tokens, not divisible by the {shards} devices of {names}")
        plans.append(None if shards == 1 else plan_axis(
            length, shards, p.kernel_size[a], p.stride[a], p.dilation[a], p.is_causal[a],
            p.is_periodic[a]))
    batch, heads_axes = partition_axes(mesh, shape[0], heads_kv, exclude=tuple(used))
    periodic = tuple(w if plan is None else plan.periodic
                     for w, plan in zip(p.is_periodic, plans))
    local = dataclasses.replace(p, is_periodic=periodic)
    return Layout(mesh, spatial, batch, heads_axes, tuple(plans), local)


def run(fn, query: jax.Array, key: jax.Array, value: jax.Array, rpb: jax.Array | None,
        layout: Layout):
    """``fn(query, key, value, rpb) -> (out, lse)`` (a single-device NA with
    ``layout.local_params``) run per device on the local ranges under ``shard_map``; returns the
    global ``(out, lse)``."""
    sharded = [(1 + a, plan, _spec_entry(names))
               for a, (plan, names) in enumerate(zip(layout.plans, layout.spatial))
               if plan is not None]
    dims = [d for d, _, _ in sharded]
    plans = [pl for _, pl, _ in sharded]
    names = [n for _, _, n in sharded]

    def local(q, k, v, r):
        for dim, plan, name in sharded:
            k = local_range(k, dim, plan, name)
            v = local_range(v, dim, plan, name)
        q = embed_queries(q, dims, plans, names)
        out, lse = fn(q, k, v, r)
        return own_part(out, dims, plans, names), own_part(lse, dims, plans, names)

    tokens, lse = layout.tokens_spec(), layout.tokens_spec(lse=True)
    bias = None if rpb is None else layout.bias_spec()
    query, key, value, rpb = explicit_reshard(layout.mesh, (query, key, value, rpb),
                                              (tokens, tokens, tokens, bias))
    # check_vma=False: a pallas_call's outputs carry no varying-axes type. An rpb replicated
    # over the batch and spatial axes still gets its per-device cotangents summed (tested).
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(tokens, tokens, tokens, bias),
                         out_specs=(tokens, lse), check_vma=False)(query, key, value, rpb)


def explicit_reshard(mesh, args, specs):
    """``args`` resharded to ``specs`` where ``mesh`` has explicit axes (``jax.make_mesh``'s
    default), whose ``shard_map`` wants its inputs typed with exactly its ``in_specs``; as they
    are on a mesh with automatic axes (XLA moves them)."""
    types = getattr(mesh, "axis_types", ())
    if not any(t == jax.sharding.AxisType.Explicit for t in types):
        return args
    def target(spec):  # an abstract mesh is the context mesh: a spec names its axes
        if isinstance(mesh, jax.sharding.AbstractMesh):
            return spec
        return jax.sharding.NamedSharding(mesh, spec)

    return tuple(x if x is None or spec is None else jax.sharding.reshard(x, target(spec))
                 for x, spec in zip(args, specs))


def spatial_axes_of(x, rank: int) -> tuple[tuple[MeshAxes, ...], object] | None:
    """``(spatial_axes, mesh)`` read from ``x``'s ``NamedSharding`` (a concrete array, or a
    tracer under a mesh with explicit axes) when it splits a spatial axis; else None."""
    sharding = None
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 (older jax, or no sharding in the type)
        pass
    spec = getattr(sharding, "spec", None)
    if spec is None or not any(_names(e) for e in tuple(spec)[1:1 + rank]):
        sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
        spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    entries = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    spatial = entries[1:1 + rank]
    if not any(_names(e) for e in spatial):
        return None
    return spatial, sharding.mesh
