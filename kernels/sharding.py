"""Neighborhood attention on sharded inputs: kernels XLA cannot partition run under shard_map.

XLA partitions the ``xla`` and ``reference`` backends like any other jnp code. A Pallas kernel is
an opaque custom call to XLA's SPMD partitioner: left alone, it would be replicated, with every
device all-gathering the whole batch first. So when a mesh is set (``jax.set_mesh(mesh)``, as
the trainer does while tracing its steps) such a backend runs under ``jax.shard_map``: the
batch axis is split over the mesh axes that divide it (in mesh order, e.g. the trainer's
``("data", "fsdp")``), heads over the remaining axes that divide the head count, and each
device launches the kernel on its own slice. Neighborhood attention is independent per batch
element and head, so this is exact; the gradient of a replicated ``rpb`` is summed over the
batch shards by ``shard_map``'s transpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P


def mesh_platform() -> str | None:
    """Platform of the context mesh's devices (``jax.set_mesh``; e.g. ``"tpu"`` for abstract
    TPU devices compiled for on a CPU host), or None without a mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return None if device is None else device.platform


def partition_axes(mesh, batch: int, heads: int, exclude: tuple[str, ...] = ()
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Mesh axes that split the batch and the heads: each axis (in mesh order, size > 1, not
    in ``exclude``) goes to the batch while the product still divides ``batch``, else to the
    heads if it divides ``heads``; axes that divide neither leave the kernel replicated over
    them."""
    batch_axes, head_axes = [], []
    b, h = 1, 1
    for name in mesh.axis_names:
        size = mesh.shape[name]
        if size == 1 or name in exclude:
            continue
        if batch % (b * size) == 0:
            batch_axes.append(name)
            b *= size
        elif heads % (h * size) == 0:
            head_axes.append(name)
            h *= size
    return tuple(batch_axes), tuple(head_axes)


def _local(x, batch_axes: tuple[str, ...], head_axes: tuple[str, ...], mesh, head_dim: int):
    """``x``'s per-device shape and dtype, its batch split over ``batch_axes`` (dim 0) and its
    heads over ``head_axes`` (dim ``head_dim``)."""
    shape = list(x.shape)
    if batch_axes and head_dim != 0:
        shape[0] //= int(math.prod(mesh.shape[a] for a in batch_axes))
    shape[head_dim] //= int(math.prod(mesh.shape[a] for a in head_axes))
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def local_shapes(query, value, rpb):
    """What each device's kernel sees under :func:`run_sharded` with the context mesh: the
    per-shard ``(query, value, rpb)`` shapes (``jax.ShapeDtypeStruct``; the arguments as they
    are when no mesh splits them). Limits such as the CUDA grid's apply to these, not to the
    global batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return query, value, rpb
    batch_axes, head_axes = partition_axes(mesh, query.shape[0], query.shape[-2])
    if not batch_axes and not head_axes:
        return query, value, rpb
    q, v = (_local(x, batch_axes, head_axes, mesh, x.ndim - 2) for x in (query, value))
    r = None if rpb is None else _local(rpb, (), head_axes, mesh, 0)
    return q, v, r


def _axes(names: tuple[str, ...]):
    return names if len(names) > 1 else (names[0] if names else None)


def run_sharded(fn: Callable, query: jax.Array, key: jax.Array, value: jax.Array,
                rpb: jax.Array | None):
    """``fn(query, key, value, rpb) -> (out, lse)`` per device under ``shard_map`` over the
    context mesh (batch and heads split, see :func:`partition_axes`); a plain call when no mesh
    with more than one device is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(query, key, value, rpb)
    rank = query.ndim - 3
    batch_axes, head_axes = partition_axes(mesh, query.shape[0], query.shape[-2])
    if not batch_axes and not head_axes:
        return fn(query, key, value, rpb)
    tokens = P(_axes(batch_axes), *([None] * rank), _axes(head_axes), None)
    lse = P(_axes(batch_axes), *([None] * rank), _axes(head_axes))
    bias = None if rpb is None else P(_axes(head_axes), *([None] * rank))
    # check_vma=False: a pallas_call's outputs carry no varying-axes type. The transpose of an
    # input replicated over an axis (rpb over the batch axes) still sums the per-device
    # cotangents over that axis (tested against the unsharded gradient).
    return jax.shard_map(fn, mesh=mesh, in_specs=(tokens, tokens, tokens, bias),
                         out_specs=(tokens, lse), check_vma=False)(query, key, value, rpb)
