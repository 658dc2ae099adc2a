"""Neighborhood attention on CPU as native XLA FFI kernels (``backend="cpu"``).

XLA:CPU runs the tiled :mod:`xla` path as batched matmuls over query tiles and their key halos:
for K=7 every query computes ~3.4x the logits its window needs, in ``[49 x 169]`` matmuls at a
third of the matmul rate, and almost half of the time goes to building and transposing halos.
On CPU the gather formulation wins instead, written as a kernel: each query reads exactly its
window's keys and values (``cpu_na.cc``), so the work is what NATTEN's FLOP count says.

* Forward: per (image, token), every head: logits, softmax, ``p @ v``; returns ``(out, lse)``.
* Backward: pass 1 per query recomputes the probabilities and gives ``dq``, the logit
  gradients of every window slot and the RPB gradient (per-chunk partial tables added in a
  fixed order: deterministic); pass 2 per key gathers ``dk`` / ``dv`` over the *inverse*
  window (the (query, slot) pairs that hold the key), so there is no scatter and no race.
* Every rank (1-3 spatial axes, reshaped to three), kernel, stride, dilation, causal and
  periodic axis, RPB and grouped-query attention go through the same per-axis window tables
  (:func:`windows.neighbor_indices`), so the kernels have no special cases. Math is fp32;
  16-bit inputs are cast (results in the input dtype, ``lse`` fp32).
* Non-finite values stay inside their windows by construction (a query never reads a key
  outside its window); a row with a non-finite maximum logit is NaN throughout, as in the
  reference.

The kernel source is compiled on first use (~3 s) with the system C++ compiler (``$CXX``,
else ``g++``; ``-O3 -march=native``) against the installed jaxlib's FFI headers, into
``cpu_kernels/`` of :func:`cache.cache_root` (``$NAT_JAX_CACHE``, default
``~/.cache/nat_jax``), keyed by the source, jaxlib version, compiler and CPU; a compile writes
to a temporary name and renames, so concurrent processes are safe. Without a compiler the
backend reports itself unsupported and ``backend="auto"`` keeps the :mod:`xla` path. Each call
runs on the CPUs the process may use (``$NAT_JAX_CPU_THREADS`` to set how many, read when a
call is traced); results do not depend on the thread count.

Programs with these custom calls run in this process but cannot be serialized by
``jax.export`` for CPU (XLA gives custom calls no compatibility guarantee); export with
``backend="xla"`` (or for an accelerator, whose programs never contain them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from nat_jax.kernels import windows
from nat_jax.kernels.cache import cache_root
from nat_jax.kernels.params import NAParams

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_na.cc")
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared",
          "-fPIC", "-pthread")
_TARGETS = {"nat_jax_na_forward": "NatJaxNaForward",
            "nat_jax_na_backward_query": "NatJaxNaBackwardQuery",
            "nat_jax_na_backward_key": "NatJaxNaBackwardKey"}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why)`` when the kernels cannot be built here."""
    if platform.system() != "Linux":
        return None, f"the cpu backend builds its kernels on Linux only ({platform.system()})"
    cxx = _compiler()
    if cxx is None:
        return None, ("the cpu backend needs a C++ compiler to build its kernels (set $CXX or "
                      "install g++)")
    include = jax.ffi.include_dir()
    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), cxx.encode(),
                                     jaxlib.__version__.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    path = os.path.join(cache_root(), "cpu_kernels", f"na-{key}.so")
    if not os.path.exists(path):
        tmp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
            os.close(fd)
            done = subprocess.run([cxx, *_FLAGS, "-isystem", include, _SOURCE, "-o", tmp],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                return None, (f"the cpu backend's kernels did not compile ({cxx}): "
                              f"{done.stderr.strip()[-2000:]}")
            os.replace(tmp, path)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"the cpu backend's kernels could not be built in {path}: {e}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"the cpu backend's kernels ({path}) did not load: {e}"
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return lib, None


def build_error() -> str | None:
    """Why the kernels cannot be built on this machine (None: they are built and registered)."""
    return _library()[1]


def unsupported(query, value, p: NAParams, rpb) -> str | None:
    """Why the cpu backend cannot take a call (None: it can)."""
    for name, x in (("query", query), ("value", value)):
        if not any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in _FLOAT_DTYPES):
            return f"{name}.dtype={x.dtype}: the cpu backend takes float32, bfloat16 or float16"
    return build_error()


def _threads() -> int:
    """``$NAT_JAX_CPU_THREADS``, else the CPUs this process may run on."""
    if os.environ.get("NAT_JAX_CPU_THREADS"):
        return max(1, int(os.environ["NAT_JAX_CPU_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ tables


@functools.lru_cache(maxsize=256)
def _tables(spatial: tuple[int, ...], p: NAParams, with_rpb: bool):
    """Per-axis window tables of the three canonical axes (module docstring of ``cpu_na.cc``):
    ``(nb, rel, inv)``, each a 3-tuple of int32 numpy arrays (``rel`` zeros without RPB)."""
    nb, rel, inv = [], [], []
    for a in range(3):
        if a >= len(spatial):
            nb.append(np.zeros((1, 1), np.int32))
            rel.append(np.zeros((1, 1), np.int32))
            inv.append(np.zeros((1, 1, 2), np.int32))
            continue
        length, kernel = spatial[a], p.kernel_size[a]
        idx, valid = windows.neighbor_indices(length, kernel, p.stride[a], p.dilation[a],
                                              p.is_causal[a], p.is_periodic[a])
        table = np.where(valid, idx, -1).astype(np.int32)
        nb.append(table)
        if with_rpb:
            rel.append(np.asarray(windows.rpb_indices(length, kernel, p.dilation[a],
                                                      p.is_periodic[a]), np.int32))
        else:
            rel.append(np.zeros_like(table))
        # Inverse windows: for each key coordinate, the (query coordinate, slot) pairs holding it.
        pairs = [[] for _ in range(length)]
        for x, i in zip(*np.nonzero(table >= 0)):
            pairs[table[x, i]].append((x, i))
        width = max(1, max(len(e) for e in pairs))
        out = np.full((length, width, 2), -1, np.int32)
        for y, e in enumerate(pairs):
            if e:
                out[y, :len(e)] = e
        inv.append(out)
    for t in nb + rel + inv:
        t.setflags(write=False)
    return tuple(nb), tuple(rel), tuple(inv)


# ----------------------------------------------------------------------------------- kernels


def _call(target: str, outs, *args, **attrs):
    build = build_error()
    if build is not None:
        raise RuntimeError(build)
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(
        *args, threads=np.int64(_threads()), **attrs)


def _canonical(x: jax.Array, rank: int) -> jax.Array:
    """``[B, *spatial, h, d]`` -> ``[B, N, h, d]`` float32."""
    return x.reshape(x.shape[0], -1, *x.shape[1 + rank:]).astype(jnp.float32)


def _rpb_operand(rpb: jax.Array | None, rank: int) -> jax.Array:
    if rpb is None:
        return jnp.zeros((1, 1, 1, 1), jnp.float32)
    return rpb.astype(jnp.float32).reshape(rpb.shape + (1,) * (3 - rank))


def _forward(query, key, value, rpb, p: NAParams):
    rank = p.rank
    spatial = tuple(query.shape[1:1 + rank])
    nb, rel, _ = _tables(spatial, p, rpb is not None)
    q, k, v = (_canonical(x, rank) for x in (query, key, value))
    outs = (jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], jnp.float32),
            jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    out, lse = _call("nat_jax_na_forward", outs, q, k, v, _rpb_operand(rpb, rank), *nb, *rel,
                     scale=np.float32(p.scale), with_rpb=rpb is not None)
    out = out.reshape(query.shape[:-1] + value.shape[-1:]).astype(value.dtype)
    return out, lse.reshape(query.shape[:-1])


def _backward(p: NAParams, res, cotangents):
    query, key, value, rpb, out, lse = res
    dout, dlse = cotangents
    rank = p.rank
    spatial = tuple(query.shape[1:1 + rank])
    nb, rel, inv = _tables(spatial, p, rpb is not None)
    q, k, v, o, do = (_canonical(x, rank) for x in (query, key, value, out, dout))
    window = math.prod(p.kernel_size)
    table = (q.shape[2], math.prod(rpb.shape[1:])) if rpb is not None else (1, 1)
    dq, probs, dlogits, drpb = _call(
        "nat_jax_na_backward_query",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32),
         jax.ShapeDtypeStruct(q.shape[:-1] + (window,), jnp.float32),
         jax.ShapeDtypeStruct(q.shape[:-1] + (window,), jnp.float32),
         jax.ShapeDtypeStruct(table, jnp.float32)),
        q, k, v, _rpb_operand(rpb, rank), o, lse.reshape(q.shape[:-1]), do,
        dlse.astype(jnp.float32).reshape(q.shape[:-1]), *nb, *rel,
        scale=np.float32(p.scale), with_rpb=rpb is not None)
    dk, dv = _call("nat_jax_na_backward_key",
                   (jax.ShapeDtypeStruct(k.shape, jnp.float32),
                    jax.ShapeDtypeStruct(v.shape, jnp.float32)),
                   q, do, probs, dlogits, *nb, *inv, scale=np.float32(p.scale))
    drpb = None if rpb is None else drpb.reshape(rpb.shape).astype(rpb.dtype)
    shape = lambda x, like: x.reshape(like.shape).astype(like.dtype)  # noqa: E731
    return shape(dq, query), shape(dk, key), shape(dv, value), drpb


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _na(query, key, value, rpb, p):
    return _forward(query, key, value, rpb, p)


def _na_fwd(query, key, value, rpb, p):
    out, lse = _forward(query, key, value, rpb, p)
    return (out, lse), (query, key, value, rpb, out, lse)


_na.defvjp(_na_fwd, _backward)


def na_fused(query: jax.Array, key: jax.Array, value: jax.Array, p: NAParams,
             rpb: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Neighborhood attention by the native CPU kernels; returns ``(out, lse)`` like the
    reference backend.

    Args:
      query, key: ``[B, *spatial, heads, head_dim]`` (key may have fewer heads, a divisor of
        ``heads``: grouped-query attention); value ``[B, *spatial, heads_kv, head_dim_v]``.
      p: normalized parameters (see :func:`params.make_params`); any rank 1-3, kernel, stride,
        dilation, causal or periodic axes.
      rpb: optional ``[heads, 2K-1, ...]`` (differentiable).

    Returns:
      ``out [B, *spatial, heads, head_dim_v]`` (value dtype) and ``lse [B, *spatial, heads]``
      float32. Differentiable in query, key, value and rpb (``custom_vjp``; the cotangent of
      ``lse`` is honoured).
    """
    return _na(query, key, value, rpb, p)
