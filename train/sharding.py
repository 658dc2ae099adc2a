"""Sharding rules, all in one place.

The mesh has three axes, ``("data", "fsdp", "context")``. The batch is split over the first two;
the ``context`` axis (size 1 unless context parallelism is on) splits the token rows of the
first stages instead: the devices of one context group hold the same examples, each a band of
rows of them (:mod:`nat_jax.kernels.context`), so every device holds ``global_batch /
(num_devices / context)`` examples. Parameters, optimizer moments and EMA copies are
replicated, except that with ``fsdp > 1`` every array of at least ``fsdp_min_size`` elements is
split over the ``fsdp`` axis along its largest dimension divisible by the axis size (ZeRO-3 /
FSDP style: XLA all-gathers it for the forward pass and reduce-scatters its gradient). The rule
depends only on an array's shape, so an optimizer moment gets the same sharding as its parameter.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nat_jax.train.errors import UserInputError

DATA_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes
CONTEXT_AXIS = "context"      # token rows of the first stages (context parallelism)


def make_mesh(fsdp: int = 1, devices=None, context: int = 1) -> Mesh:
    """A ``(data, fsdp, context)`` mesh over ``devices`` (default: all devices of all hosts).

    fsdp: size of the parameter-sharding axis; 1 = pure data parallel, -1 = all devices
      (of each context group).
    context: devices per context-parallel group (innermost, so a group's devices are
      neighbours in ``jax.devices()`` order: on one host, or one NVLink/ICI island).
    """
    devices = jax.devices() if devices is None else list(devices)
    count = len(devices)
    if context < 1 or count % context:
        raise UserInputError(f"{context=} must be a positive divisor of the device count "
                             f"{count}")
    fsdp = count // context if fsdp == -1 else fsdp
    if fsdp < 1 or (count // context) % fsdp:
        raise UserInputError(f"{fsdp=} must be -1 or a positive divisor of the device count "
                             f"{count} (divided by {context=})")
    grid = np.asarray(devices).reshape(count // (fsdp * context), fsdp, context)
    return Mesh(grid, ("data", "fsdp", CONTEXT_AXIS))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: the devices of the data and fsdp axes."""
    return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(DATA_AXES))


def host_batch_block(mesh: Mesh) -> tuple[int, int]:
    """``(i, n)``: this process's devices hold block ``i`` of ``n`` equal, contiguous row blocks
    of every batch sharded with :func:`batch_sharding` (``n`` = the process count).

    The input pipeline computes exactly that block of each global batch. Raises ValueError if
    the mesh gives a process rows that are not one contiguous block.
    """
    count = jax.process_count()
    shards = batch_shards(mesh)
    per_device = {index[0].start or 0 for index in
                  batch_sharding(mesh).addressable_devices_indices_map((shards,)).values()}
    rows = sorted(per_device)
    size = shards // count
    if len(rows) != size or rows != list(range(rows[0], rows[0] + size)) or rows[0] % size:
        raise ValueError(f"process {jax.process_index()} holds batch rows {rows} of {shards}: "
                         f"not one of {count} contiguous blocks; build the mesh from "
                         "jax.devices() in order")
    return rows[0] // size, count


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """PartitionSpec of one parameter-like array (see the module docstring for the rule)."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_tree, mesh: Mesh, min_size: int):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (train state, params, ...)."""
    fsdp_size = mesh.shape["fsdp"]

    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(shape, fsdp_size, min_size))

    return jax.tree.map(one, abstract_tree)
