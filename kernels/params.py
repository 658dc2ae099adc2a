"""Argument normalization and validation for the neighborhood attention ops.

Every public op normalizes its int-or-tuple arguments here, once, into a hashable
:class:`NAParams` that backends take as a static argument. Bad arguments raise ``ValueError``
naming the argument and the rule they break.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


@dataclasses.dataclass(frozen=True, slots=True)
class NAParams:
    """Normalized, static NA arguments (one entry per spatial axis).

    ``is_periodic`` may be left out (``()``: no periodic axis); it is normalized to one entry
    per axis so equal parameters hash equally (they are static jit arguments).
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    is_periodic: tuple[bool, ...] = ()

    def __post_init__(self):
        if not self.is_periodic:
            object.__setattr__(self, "is_periodic", (False,) * len(self.kernel_size))

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def window(self) -> int:
        return int(np.prod(self.kernel_size))


def per_axis(name: str, value: Any, rank: int, kind: type) -> tuple:
    """``value`` (one ``kind`` or one per axis) as a ``rank``-tuple of ``kind``; ValueError
    naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) and kind is int:
        raise ValueError(f"{name}={value!r} must be an int or a tuple of {rank} ints")
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return (kind(value),) * rank
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be a {kind.__name__} or a tuple of {rank}") from None
    if len(out) != rank:
        raise ValueError(f"{name}={value!r} must have one entry per spatial axis ({rank})")
    for v in out:
        ok = isinstance(v, (bool, np.bool_)) if kind is bool else (
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)))
        if not ok:
            raise ValueError(f"{name}={value!r}: entries must be {kind.__name__}s")
    return tuple(kind(v) for v in out)


def check_qkv(rank: int, query, key, value=None) -> None:
    """Shapes and dtypes of ``[B, *spatial(rank), heads, head_dim]`` operands.

    Key and value may have fewer heads than the query (grouped / multi-query attention):
    ``heads`` must be a multiple of ``heads_kv``, and query head ``i`` attends with key/value
    head ``i // (heads // heads_kv)``."""
    want = rank + 3
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x is None:
            continue
        if x.ndim != want:
            raise ValueError(
                f"{name}.shape={tuple(x.shape)}: {rank}-D neighborhood attention expects rank "
                f"{want} [batch, {', '.join('XYZ'[:rank])}, heads, head_dim]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={x.dtype}: expected a floating dtype")
    if key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key.shape={tuple(key.shape)} must equal query.shape="
                         f"{tuple(query.shape)} (heads may be fewer: grouped-query attention)")
    check_heads(query.shape[-2], key.shape[-2], "key")
    if key.dtype != query.dtype:
        raise ValueError(f"key.dtype={key.dtype} must equal query.dtype={query.dtype}")
    if value is not None:
        if value.shape[:-1] != key.shape[:-1]:
            raise ValueError(f"value.shape={tuple(value.shape)} must match key.shape="
                             f"{tuple(key.shape)} in every axis but head_dim")
        if value.dtype != query.dtype:
            raise ValueError(f"value.dtype={value.dtype} must equal query.dtype={query.dtype}")


def check_heads(heads: int, heads_kv: int, name: str = "key") -> None:
    """Grouped-query attention needs query heads to be a multiple of key/value heads."""
    if heads_kv < 1 or heads % heads_kv:
        raise ValueError(f"{name} heads={heads_kv}: query heads={heads} must be a multiple of "
                         f"the {name} heads (query head i uses {name} head "
                         f"i // (heads // heads_kv))")


def make_params(spatial: tuple[int, ...], head_dim: int, kernel_size: IntOrTuple,
                stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                is_causal: BoolOrTuple = False, scale: float | None = None,
                is_periodic: BoolOrTuple = False) -> NAParams:
    """Normalize per-axis arguments and check NATTEN's rules against the spatial shape."""
    rank = len(spatial)
    kernel_size = per_axis("kernel_size", kernel_size, rank, int)
    stride = per_axis("stride", stride, rank, int)
    dilation = per_axis("dilation", dilation, rank, int)
    is_causal = per_axis("is_causal", is_causal, rank, bool)
    is_periodic = per_axis("is_periodic", is_periodic, rank, bool)
    for a, (c, w) in enumerate(zip(is_causal, is_periodic)):
        if c and w:
            raise ValueError(f"{is_causal=}, {is_periodic=}: an axis cannot be both causal and "
                             f"periodic (axis {a})")
    for a, (n, k, s, d, w) in enumerate(zip(spatial, kernel_size, stride, dilation,
                                            is_periodic)):
        if k < 2:
            raise ValueError(f"{kernel_size=}: kernel size must be >= 2 on every axis (axis {a})")
        if d < 1:
            raise ValueError(f"{dilation=}: dilation must be >= 1 on every axis (axis {a})")
        if s < 1 or s > k:
            raise ValueError(f"{stride=}: stride must satisfy 1 <= stride <= kernel_size "
                             f"(axis {a}: stride {s}, kernel {k})")
        # The shortest dilation group has n // d tokens (implied by k * d <= n; named here
        # because a longer window would wrap onto itself and hold a key twice).
        if w and k > n // d:
            raise ValueError(f"{kernel_size=}, {dilation=}, {is_periodic=}: on a periodic axis "
                             f"the kernel must not exceed the shortest dilation group, or a "
                             f"window would hold a key twice (axis {a}: {k} > {n} // {d})")
        if k * d > n:
            raise ValueError(f"{kernel_size=}, {dilation=}: kernel_size * dilation must not exceed "
                             f"the input size (axis {a}: {k} * {d} > {n})")
    if scale is None:
        scale = float(head_dim) ** -0.5
    return NAParams(kernel_size, stride, dilation, is_causal, float(scale), is_periodic)


def check_rpb(rpb, p: NAParams, heads: int) -> None:
    """RPB is defined for odd kernels, stride 1 and non-causal windows only."""
    if any(k % 2 == 0 for k in p.kernel_size):
        raise ValueError(f"rpb requires an odd kernel_size on every axis, got {p.kernel_size}")
    if any(s != 1 for s in p.stride):
        raise ValueError(f"rpb requires stride=1, got {p.stride}")
    if any(p.is_causal):
        raise ValueError(f"rpb is not defined for causal attention, got is_causal={p.is_causal}")
    want = (heads, *(2 * k - 1 for k in p.kernel_size))
    if tuple(rpb.shape) != want:
        raise ValueError(f"rpb.shape={tuple(rpb.shape)} must be [heads, 2K-1, ...] = {want}")
    if not jnp.issubdtype(rpb.dtype, jnp.floating):
        raise ValueError(f"rpb.dtype={rpb.dtype}: expected a floating dtype")


def missing_features(query, value, p: NAParams, backend: str) -> str | None:
    """The reason a backend without grouped-query attention and periodic axes gives for a call
    that needs one (``None``: the call needs neither), for its ``unsupported`` hook."""
    if query.shape[-2] != value.shape[-2]:
        return (f"heads={query.shape[-2]}, heads_kv={value.shape[-2]}: the {backend} backend "
                "has no grouped-query attention (key/value heads must equal query heads)")
    if any(p.is_periodic):
        return f"is_periodic={p.is_periodic}: the {backend} backend has no periodic axes"
    return None
