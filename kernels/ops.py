"""Public neighborhood attention ops: ``na1d/na2d/na3d`` and the unfused ``qk`` / ``av`` pieces.

All ops share one generic implementation; the rank-specific functions only fix the number of
spatial axes. Arguments follow NATTEN (heads-last layout, per-axis kernel/stride/dilation/causal).
The fused ops take NATTEN's positional order (``kernel_size, stride, dilation, is_causal, ...``);
the unfused ``na*_qk`` / ``na*_av`` take everything after ``kernel_size`` by keyword only, so no
positional call can mean stride in one and dilation in the other.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence

import jax

from nat_jax.kernels import (autotune, context, cpu, merge, pallas, pallas_tpu, reference,
                             sharding, xla)
from nat_jax.kernels.params import (BoolOrTuple, IntOrTuple, NAParams, check_heads, check_qkv,
                                    check_rpb, make_params)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A fused NA implementation the ops can dispatch to.

    Attributes:
      fn: ``fn(query, key, value, p, rpb, config) -> (out, lse)``.
      platforms: lowering platforms (``"cuda"``, ``"tpu"``, ...) on which ``backend="auto"``
        prefers it over ``"xla"``, in registration order.
      unsupported: ``unsupported(query, value, p, rpb) -> str | None``: why it cannot take a
        call (``None``: it can). ``auto`` then falls back to ``"xla"``; naming the backend
        explicitly raises ``ValueError`` with the reason.
      config: ``config(query, value, p, rpb) -> hashable`` static configuration resolved
        outside the jitted call (e.g. autotuned block sizes), so a jit cache entry can never
        hold a stale choice.
      partitionable: whether XLA partitions it (well) under sharding; kernels it cannot
        partition (custom calls), or partitions badly, run under ``shard_map`` when a mesh is
        set (:mod:`sharding`). Grouped-query calls stay with the partitioner (a head split
        would have to keep each query-head group with its key/value head).
      qk: ``qk(query, key, p, rpb) -> logits`` (the unfused first half), or None: the backend
        has none, and ``na*_qk(..., backend=name)`` uses the ``"xla"`` one (warning once).
      av: ``av(weights, value, p) -> output`` (the unfused second half), or None (likewise).
    """

    fn: Callable[..., tuple[jax.Array, jax.Array]]
    platforms: tuple[str, ...] = ()
    unsupported: Callable[..., str | None] | None = None
    config: Callable[..., Hashable] | None = None
    partitionable: bool = True
    qk: Callable[..., jax.Array] | None = None
    av: Callable[..., jax.Array] | None = None


def _reference(query, key, value, p, rpb, config):
    return reference.na_fused(query, key, value, p, rpb)


def _xla(query, key, value, p, rpb, config):
    return xla.na_fused(query, key, value, p, rpb)


def _cpu(query, key, value, p, rpb, config):
    return cpu.na_fused(query, key, value, p, rpb)


def _pallas(query, key, value, p, rpb, config):
    return pallas.na_fused(query, key, value, p, rpb, block_sizes=config)


def _pallas_blocks(query, value, p, rpb):
    return (autotune.cached_block_sizes(query, value, p, rpb is not None)
            or pallas.default_block_sizes(query, value, p))


def _pallas_tpu(query, key, value, p, rpb, config):
    return pallas_tpu.na_fused(query, key, value, p, rpb, block_sizes=config)


def _pallas_tpu_blocks(query, value, p, rpb):
    return pallas_tpu.default_block_sizes(query, value, p)


# Every backend, explicitly (no registration on import). "auto" walks them in this order.
_BACKENDS: dict[str, Backend] = {
    "reference": Backend(_reference, qk=reference.na_qk, av=reference.na_av),
    # Not left to XLA's partitioner, which keeps the tiled layout's batch sharding poorly (a
    # stage-1 NAT layer's fwd+bwd, 64 images per H100: 5.3 GiB of temporaries per device over 8
    # batch-sharded devices vs 1.7 GiB on one); per device under shard_map it needs 1.7 GiB.
    "xla": Backend(_xla, qk=xla.na_qk, av=xla.na_av, partitionable=False),
    # Native kernels (XLA FFI custom calls, built on first use): exact windows, no tiles. On a
    # 2-core CPU, 112x112 K=7 fwd+bwd 7.5x the gather reference where the xla path is 3.7x.
    "cpu": Backend(_cpu, platforms=("cpu",), unsupported=cpu.unsupported, partitionable=False),
    "pallas": Backend(_pallas, platforms=("cuda",), unsupported=pallas.unsupported,
                      config=_pallas_blocks, partitionable=False),
    "pallas_tpu": Backend(_pallas_tpu, platforms=("tpu",), unsupported=pallas_tpu.unsupported,
                          config=_pallas_tpu_blocks, partitionable=False),
}


def register_backend(name: str, backend: Backend) -> None:
    """Add (or replace) a fused NA implementation under ``name``."""
    if name == "auto":
        raise ValueError("'auto' is reserved for the dispatcher")
    _BACKENDS[name] = backend


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``backend=`` (besides ``"auto"``)."""
    return tuple(_BACKENDS)


def _seen_by(b: Backend, query, value, rpb):
    """The arguments as the backend's kernels see them: per device for a backend that runs
    under ``shard_map`` (see ``_run``), else as they are."""
    return (query, value, rpb) if b.partitionable else sharding.local_shapes(query, value, rpb)


def _unsupported(name: str, query, value, p: NAParams, rpb, per_device: bool = False
                 ) -> str | None:
    """Why backend ``name`` cannot take the call (None: it can); ``per_device``: the arguments
    are already the per-device ones (context parallelism)."""
    b = _BACKENDS[name]
    if b.unsupported is None:
        return None
    q, v, r = (query, value, rpb) if per_device else _seen_by(b, query, value, rpb)
    return b.unsupported(q, v, p, r)


def _declared_platforms_state():
    """Where :func:`lowering_platforms` keeps its platforms: a JAX config state that is part of
    the trace context, so JAX's tracing caches tell a call traced inside the context from one
    traced outside (a jitted function traced once for the CPU and then exported for CUDA would
    otherwise reuse the CPU trace). JAX has no public API for such states; where the private
    one is missing, a plain context variable (without that cache safety) stands in."""
    try:
        from jax._src import config as jax_config

        return jax_config.string_or_object_state(
            "nat_jax_lowering_platforms", (),
            "Platforms nat_jax's backend='auto' also prepares calls for "
            "(nat_jax.kernels.lowering_platforms).", include_in_trace_context=True)
    except Exception:  # noqa: BLE001 (a private API that may move)
        var = contextvars.ContextVar("nat_jax_lowering_platforms", default=())

        class _State:
            @property
            def value(self):
                return var.get()

            @contextlib.contextmanager
            def __call__(self, value):
                token = var.set(value)
                try:
                    yield
                finally:
                    var.reset(token)

        return _State()


_declared_platforms = _declared_platforms_state()


def _platform_name(platform: str) -> str:
    return {"gpu": "cuda"}.get(platform, platform)


@contextlib.contextmanager
def lowering_platforms(*platforms: str) -> Iterator[None]:
    """Inside this context, ``backend="auto"`` also prepares each call for ``platforms``
    (e.g. ``"cuda"``, ``"tpu"``): the way to ``jax.export`` a model for an accelerator from a
    host that has none, with no mesh of that accelerator's devices in context::

        with nat_jax.kernels.lowering_platforms("cuda"):
            exported = jax.export.export(jax.jit(f), platforms=["cuda"])(*specs)

    Outside it, ``auto`` prepares calls for :func:`target_platforms`."""
    names = tuple(sorted(set(_declared_platforms.value)
                         | {_platform_name(p) for p in platforms}))
    with _declared_platforms(names):
        yield


def target_platforms() -> frozenset[str]:
    """Platforms a call traced now may be lowered for, as ``backend="auto"`` sees them: those
    of this process's devices (``jax.devices()``), of the context mesh's devices (e.g. abstract
    TPU or GPU devices of ``jax.experimental.topologies``), and any declared with
    :func:`lowering_platforms`.

    ``auto`` specializes a call (a ``lax.platform_dependent`` branch with the kernel backend)
    only for these: tracing the Pallas kernels of every platform in every CPU program took most
    of the time of tracing a train step (~50 of ~70 s for nat_mini on 2 cores)."""
    found = {_platform_name(d.platform) for d in jax.devices()}
    if (platform := sharding.mesh_platform()) is not None:
        found.add(_platform_name(platform))
    return frozenset(found | set(_declared_platforms.value))


def _auto_choices(query, key, value, p: NAParams, rpb, platforms: frozenset[str] | None = None,
                  per_device: bool = False) -> tuple[tuple[str, str], ...]:
    """``(platform, backend)`` pairs that ``auto`` uses instead of ``xla`` for this call, for
    ``platforms`` (default: the :func:`target_platforms`)."""
    targets = target_platforms() if platforms is None else platforms
    choices: dict[str, str] = {}
    for name, b in _BACKENDS.items():
        if _unsupported(name, query, value, p, rpb, per_device) is not None:
            continue
        for platform in b.platforms:
            if platform in targets:
                choices.setdefault(platform, name)
    return tuple(choices.items())


def resolve_backend(backend: str, query, key, value, p: NAParams, rpb,
                    platform: str | None = None) -> str:
    """The backend a call runs on when lowered for ``platform`` (default: the default
    backend's platform, ``"cuda"`` for GPUs). ``"auto"`` picks per lowering platform."""
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"{backend=} is not one of {('auto',) + available_backends()}")
        return backend
    platform = _platform_name(platform or jax.default_backend())
    return dict(_auto_choices(query, key, value, p, rpb, frozenset({platform}))).get(platform,
                                                                                      "xla")


def _prepare(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
             is_periodic):
    check_qkv(rank, query, key, value)
    p = make_params(tuple(query.shape[1:1 + rank]), query.shape[-1], kernel_size, stride,
                    dilation, is_causal, scale, is_periodic)
    if rpb is not None:
        check_rpb(rpb, p, query.shape[-2])
    return p


def _run(name: str, config, query, key, value, rpb, p: NAParams):
    b = _BACKENDS[name]
    if b.partitionable or key.shape[-2] != query.shape[-2]:
        return b.fn(query, key, value, p, rpb, config)
    return sharding.run_sharded(lambda q, k, v, r: b.fn(q, k, v, p, r, config), query, key,
                                value, rpb)


def _per_platform(backend: str | tuple, config, call: Callable) -> Callable:
    """``fn(query, key, value, rpb)`` running ``call(name, config)``'s function: ``backend`` is a
    name, or for ``auto`` a tuple of ``(platform, name)`` choices whose ``config`` is the
    matching tuple (``xla`` elsewhere); the platform is decided when lowering."""
    if isinstance(backend, str):
        return call(backend, config)
    branches = {platform: call(name, cfg) for (platform, name), cfg in zip(backend, config)}
    default = call("xla", None)
    return lambda q, k, v, r: jax.lax.platform_dependent(q, k, v, r, default=default,
                                                         **branches)


def _choose(backend: str, query, key, value, p: NAParams, rpb, per_device: bool = False
            ) -> tuple[str | tuple, Hashable]:
    """``(backend, config)`` for :func:`_per_platform`: ``auto``'s per-platform choices (or
    ``"xla"``), else the named backend, checked (``ValueError`` with its reason)."""
    if backend == "auto":
        choices = _auto_choices(query, key, value, p, rpb, per_device=per_device)
        if not choices:
            return "xla", None
        return choices, tuple(_config(name, query, value, p, rpb, per_device)
                              for _, name in choices)
    name = resolve_backend(backend, query, key, value, p, rpb)
    why = _unsupported(name, query, value, p, rpb, per_device)
    if why:
        raise ValueError(f"{backend=}: {why}")
    return name, _config(name, query, value, p, rpb, per_device)


@functools.partial(jax.jit, static_argnames=("p", "backend", "config"))
def _fused(query, key, value, rpb, p: NAParams, backend: str | tuple, config):
    """The fused op with ``backend`` / ``config`` from :func:`_choose`."""
    fn = _per_platform(backend, config, lambda name, cfg: functools.partial(_run, name, cfg, p=p))
    return fn(query, key, value, rpb)


def neighborhood_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                           dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
                           scale: float | None = None, rpb: jax.Array | None = None,
                           backend: str = "auto", return_lse: bool = False,
                           is_periodic: BoolOrTuple = False,
                           additional_keys: jax.Array | None = None,
                           additional_values: jax.Array | None = None,
                           spatial_axes: Sequence[context.MeshAxes] | None = None,
                           mesh: jax.sharding.Mesh | None = None):
    """N-dimensional neighborhood attention (rank taken from ``query.ndim - 3``).

    See :func:`na2d` for the arguments. Returns the output, or ``(output, lse)`` with
    ``return_lse=True`` (``lse [B, *spatial, heads]`` float32, natural log).
    """
    rank = query.ndim - 3
    if rank not in (1, 2, 3):
        raise ValueError(f"query.ndim={query.ndim}: expected 4, 5 or 6 "
                         "([batch, *spatial(1-3), heads, head_dim])")
    return _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
               backend, return_lse, is_periodic, additional_keys, additional_values,
               spatial_axes, mesh)


def _config(name: str, query, value, p: NAParams, rpb, per_device: bool = False):
    b = _BACKENDS[name]
    if b.config is None:
        return None
    q, v, r = (query, value, rpb) if per_device else _seen_by(b, query, value, rpb)
    return b.config(q, v, p, r)


def _context_layout(query, key, p: NAParams, spatial_axes, mesh) -> context.Layout | None:
    """The context-parallel layout of a call whose spatial axes are split over devices (named
    by ``spatial_axes``, or read from the query's ``NamedSharding``); None otherwise."""
    found = context.spatial_axes_of(query, p.rank)
    if spatial_axes is None:
        if found is None:
            return None
        spatial_axes = found[0]
        mesh = mesh if mesh is not None else found[1]
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            if found is None:
                raise ValueError(f"spatial_axes={tuple(spatial_axes)!r} needs a mesh: set one "
                                 "with jax.set_mesh(mesh), pass mesh=, or pass arrays with a "
                                 "NamedSharding")
            mesh = found[1]
    layout = context.make_layout(mesh, spatial_axes, tuple(query.shape), query.shape[-2],
                                 key.shape[-2], p)
    return layout if any(plan is not None for plan in layout.plans) else None


def _local_call(name: str, config, p: NAParams, query, key, value, rpb):
    return _BACKENDS[name].fn(query, key, value, p, rpb, config)


@functools.partial(jax.jit, static_argnames=("layout", "backend", "config"))
def _fused_context(query, key, value, rpb, layout: context.Layout, backend: str | tuple, config):
    """:func:`_fused` with spatial axes split over devices (:mod:`context`): every device runs
    the backend on its local range with ``layout.local_params``."""
    fn = _per_platform(backend, config, lambda name, cfg: functools.partial(
        _local_call, name, cfg, layout.local_params))
    return context.run(fn, query, key, value, rpb, layout)


def _na_context(layout: context.Layout, query, key, value, rpb, backend: str):
    """Dispatch of a context-parallel call; backends are chosen (and configured) for what each
    device computes: its local range, batch and heads split."""
    q, k, v = (jax.ShapeDtypeStruct(layout.local_shape(tuple(x.shape)), x.dtype)
               for x in (query, key, value))
    r = None if rpb is None else jax.ShapeDtypeStruct(
        (rpb.shape[0] // layout.size(layout.heads), *rpb.shape[1:]), rpb.dtype)
    name, config = _choose(backend, q, k, v, layout.local_params, r, per_device=True)
    return _fused_context(query, key, value, rpb, layout, name, config)


def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend,
        return_lse, is_periodic, additional_keys=None, additional_values=None,
        spatial_axes=None, mesh=None):
    p = _prepare(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                 is_periodic)
    merge.check_additional(query, value, additional_keys, additional_values)
    layout = _context_layout(query, key, p, spatial_axes, mesh)
    if layout is not None:
        out, lse = _na_context(layout, query, key, value, rpb, backend)
    else:
        name, config = _choose(backend, query, key, value, p, rpb)
        out, lse = _fused(query, key, value, rpb, p, name, config)
    if additional_keys is not None:
        # One softmax over the neighborhood and the extra tokens: merged by logsumexp, which
        # every backend's backward pass takes a cotangent for.
        extra_out, extra_lse = merge.extra_attention(query, additional_keys, additional_values,
                                                     p.scale)
        out, lse = merge.merge_attentions([out, extra_out], [lse, extra_lse])
    return (out, lse) if return_lse else out


_DOC_ARGS = """
    Args:
      query: ``[batch, {axes}, heads, head_dim]`` (heads-last, NATTEN's layout), floating.
      key: ``[batch, {axes}, heads_kv, head_dim]``, same dtype. ``heads_kv`` may be smaller than
        ``heads`` (grouped-query / multi-query attention) if it divides it: query head ``i``
        attends with key/value head ``i // (heads // heads_kv)``. Key and value are never
        repeated in memory; their gradients are summed over each group.
      value: ``[batch, {axes}, heads_kv, head_dim_v]``, same dtype.
      kernel_size: window size, int or one per axis; ``>= 2`` and ``kernel_size * dilation <=``
        the axis length. Even sizes take ``K/2`` keys before and ``K/2 - 1`` after the query.
      stride: int or per axis, ``1 <= stride <= kernel_size``; queries in a block of ``stride``
        share the window of the block's centre ("leader") query. ``stride == kernel_size`` is
        blocked (non-overlapping window) attention.
      dilation: int or per axis, ``>= 1``; the axis splits into ``dilation`` interleaved groups
        and a query attends only within its group.
      is_causal: bool or per axis; causal windows end at the query.
      scale: multiplies ``q . k``; defaults to ``head_dim ** -0.5`` (``0.0`` is a valid value).
      rpb: optional relative positional bias ``[heads, {rpb}]`` (one table per *query* head),
        added after scaling; requires odd kernels, stride 1 and no causal axis. The bias of a
        key is ``rpb[h, K-1 + (key - query)]`` per axis, the offset counted in dilated units
        (on a periodic axis the wrapped offset, so only the centre ``K`` entries are used).
        Differentiable.
      backend: ``"auto"`` (the best supported one for the platform), ``"reference"`` (plain
        gather, ground truth), ``"xla"`` (tiled, memory-efficient, any platform) or a
        registered kernel backend such as ``"pallas"``.
      return_lse: also return the float32 logsumexp ``[batch, {axes}, heads]``.
      is_periodic: bool or per axis (default False): the axis is a ring. The window is centred
        on the query (``K // 2`` keys before, ``K // 2 - 1 + K % 2`` after, NATTEN's even-kernel
        rule) and wraps around instead of shifting inwards. With dilation it wraps within the
        query's dilation group: group coordinates modulo *that group's* length (when the
        dilation does not divide the axis, groups differ in length by one and each wraps on
        its own), and ``kernel_size`` must not exceed the shortest group (``length //
        dilation``) so no key appears twice in a window. With stride, the block's leader query's
        window is used, as on other axes. Not combinable with ``is_causal`` on the same axis.
        Backends without it (``pallas``, ``pallas_tpu``) are skipped by ``"auto"``.
      additional_keys, additional_values: optional extra (global) tokens ``[batch, extra,
        heads_kv, head_dim]`` / ``[batch, extra, heads_kv, head_dim_v]`` (both or neither; as
        NATTEN 0.21's arguments): every query attends to them *in addition to* its
        neighborhood, with one softmax over both (no RPB, causal mask or stride applies to
        them). Computed densely beside the neighborhood on any backend and combined with
        :func:`merge_attentions`; ``return_lse`` returns the combined logsumexp.
      spatial_axes: context parallelism (:mod:`nat_jax.kernels.context`): one entry per
        spatial axis, a mesh axis name (or tuple of names) the axis is split over, or None.
        Each device exchanges halos of key/value rows with its neighbours (``ppermute``; an
        all-gather of the axis where no halo plan exists) and computes its own queries with
        the exact global window rules; outputs are split the same way, batch and heads over
        the remaining mesh axes. Default: read from the query's ``NamedSharding`` when it
        splits a spatial axis (sharded arrays, or a mesh with explicit axes), else none.
      mesh: the mesh ``spatial_axes`` names; default the context mesh (``jax.set_mesh``), or
        the query's ``NamedSharding``'s mesh.

    Windows follow NATTEN exactly: they are shifted inwards at the borders (never zero-padded),
    so every non-causal query sees exactly ``prod(kernel_size)`` keys. bf16/fp16 inputs compute
    logits and softmax in float32 and return the input dtype. Works under ``jax.jit``,
    ``jax.vmap``, ``jax.grad`` and with batch/head-sharded inputs (and spatially sharded ones,
    with ``spatial_axes``).

    Returns:
      ``[batch, {axes}, heads, head_dim_v]`` in the input dtype (and lse with ``return_lse``).

    Raises:
      ValueError: naming the argument and the rule it breaks.
"""


def _make_fused(rank: int, axes: str, rpb_shape: str):
    def op(query: jax.Array, key: jax.Array, value: jax.Array, kernel_size: IntOrTuple,
           stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
           scale: float | None = None, rpb: jax.Array | None = None, backend: str = "auto",
           return_lse: bool = False, is_periodic: BoolOrTuple = False,
           additional_keys: jax.Array | None = None,
           additional_values: jax.Array | None = None,
           spatial_axes: Sequence[context.MeshAxes] | None = None,
           mesh: jax.sharding.Mesh | None = None):
        return _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb,
                   backend, return_lse, is_periodic, additional_keys, additional_values,
                   spatial_axes, mesh)

    op.__name__ = op.__qualname__ = f"na{rank}d"
    op.__doc__ = f"{rank}-D neighborhood attention.\n" + _DOC_ARGS.format(axes=axes, rpb=rpb_shape)
    return op


na1d = _make_fused(1, "L", "2K-1")
na2d = _make_fused(2, "X, Y", "2Kx-1, 2Ky-1")
na3d = _make_fused(3, "X, Y, Z", "2Kx-1, 2Ky-1, 2Kz-1")


# ------------------------------------------------------------------ unfused pieces

# Unfused implementations tried by backend="auto", best first (only those with qk/av count).
_UNFUSED_AUTO = ("xla", "reference")
_warned_fallback: set[tuple[str, str]] = set()


def resolve_unfused_backend(backend: str, op: str = "qk") -> str:
    """The backend whose unfused ``op`` ("qk" or "av") a call with ``backend`` runs on.

    ``"auto"`` takes the first of :data:`_UNFUSED_AUTO` that has one (``"xla"``: tiled, memory
    ``O(tokens * K^2)`` beyond the inputs). A named backend without one (the kernel backends
    ``"pallas"``, ``"pallas_tpu"``) uses ``"xla"``'s, with a warning the first time per backend
    and op, so a model asked for attention weights keeps working and says what it runs.
    """
    if backend == "auto":
        return next(name for name in _UNFUSED_AUTO
                    if name in _BACKENDS and getattr(_BACKENDS[name], op) is not None)
    if backend not in _BACKENDS:
        raise ValueError(f"{backend=} is not one of {('auto',) + available_backends()}")
    if getattr(_BACKENDS[backend], op) is not None:
        return backend
    fallback = resolve_unfused_backend("auto", op)
    if (backend, op) not in _warned_fallback:
        _warned_fallback.add((backend, op))
        warnings.warn(f"na*_{op}: backend {backend!r} has no unfused kernels; using "
                      f"{fallback!r}'s", stacklevel=3)
    return fallback


@functools.partial(jax.jit, static_argnames=("p", "backend"))
def _qk(query, key, rpb, p, backend: str):
    return _BACKENDS[backend].qk(query, key, p, rpb)


@functools.partial(jax.jit, static_argnames=("p", "backend"))
def _av(weights, value, p, backend: str):
    return _BACKENDS[backend].av(weights, value, p)


def _make_qk(rank: int, axes: str):
    def qk(query: jax.Array, key: jax.Array, kernel_size: IntOrTuple, *,
           stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
           scale: float | None = None, rpb: jax.Array | None = None,
           backend: str = "auto", is_periodic: BoolOrTuple = False) -> jax.Array:
        p = _prepare(rank, query, key, None, kernel_size, stride, dilation, is_causal, scale,
                     rpb, is_periodic)
        return _qk(query, key, rpb, p, resolve_unfused_backend(backend, "qk"))

    qk.__name__ = qk.__qualname__ = f"na{rank}d_qk"
    qk.__doc__ = f"""{rank}-D neighborhood attention logits (the unfused first half).

    Args:
      query: ``[batch, {axes}, heads, head_dim]``.
      key: ``[batch, {axes}, heads_kv, head_dim]``; ``heads_kv`` divides ``heads`` (query head
        ``i`` uses key head ``i // (heads // heads_kv)``).
      kernel_size: as for :func:`na{rank}d`; every later argument is keyword-only.
      stride, dilation, is_causal, scale, rpb, is_periodic: as for :func:`na{rank}d`.
      backend: ``"auto"`` (the best with an unfused implementation: ``"xla"``, tiled), or a
        backend name; one without unfused kernels runs ``"xla"``'s (warning once).

    Returns:
      float32 logits ``[batch, {axes}, heads, prod(kernel_size)]``: ``scale * q.k (+ rpb)`` with
      the window flattened row-major (slot ``j`` = key ``start + j`` per axis; on a periodic
      axis the key at offset ``j - K // 2`` from the query, from its leader with stride,
      wrapped within its dilation group). Slots a causal window does not reach hold ``-inf``. ``na{rank}d_av(softmax(logits), v, ...)`` equals
      ``na{rank}d(q, k, v, ...)``.
    """
    return qk


def _make_av(rank: int, axes: str):
    def av(weights: jax.Array, value: jax.Array, kernel_size: IntOrTuple, *,
           stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
           backend: str = "auto", is_periodic: BoolOrTuple = False) -> jax.Array:
        if value.ndim != rank + 3:
            check_qkv(rank, value, value)
        p = make_params(tuple(value.shape[1:1 + rank]), value.shape[-1], kernel_size, stride,
                        dilation, is_causal, is_periodic=is_periodic)
        heads = weights.shape[-2] if weights.ndim == rank + 3 else value.shape[-2]
        want = (*value.shape[:-2], heads, p.window)
        if tuple(weights.shape) != want:
            raise ValueError(f"weights.shape={tuple(weights.shape)} must be {want} "
                             "([batch, *spatial, heads, prod(kernel_size)])")
        check_heads(heads, value.shape[-2], "value")
        return _av(weights, value, p, resolve_unfused_backend(backend, "av"))

    av.__name__ = av.__qualname__ = f"na{rank}d_av"
    av.__doc__ = f"""{rank}-D neighborhood attention weighted sum (the unfused second half).

    Args:
      weights: ``[batch, {axes}, heads, prod(kernel_size)]`` (e.g. softmax of ``na{rank}d_qk``).
      value: ``[batch, {axes}, heads_kv, head_dim]``; ``heads_kv`` divides ``heads`` (weights of
        head ``i`` sum value head ``i // (heads // heads_kv)``).
      kernel_size: as for :func:`na{rank}d`; every later argument is keyword-only.
      stride, dilation, is_causal, is_periodic, backend: as for :func:`na{rank}d_qk`.

    Returns:
      ``[batch, {axes}, heads, head_dim]`` in ``value.dtype``.
    """
    return av


na1d_qk, na2d_qk, na3d_qk = (_make_qk(r, a) for r, a in ((1, "L"), (2, "X, Y"), (3, "X, Y, Z")))
na1d_av, na2d_av, na3d_av = (_make_av(r, a) for r, a in ((1, "L"), (2, "X, Y"), (3, "X, Y, Z")))
