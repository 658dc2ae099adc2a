"""Block-size autotuning for the Pallas NA kernels.

:func:`tune` times a few :class:`~nat_jax.kernels.pallas.BlockSizes` candidates (forward plus
backward) on the GPU and caches the fastest per shape key: in memory, and optionally in a JSON
file (default ``~/.cache/nat_jax/pallas_blocks.json``). The dispatcher (``backend="pallas"`` or
``"auto"``) looks the shape up with :func:`cached_block_sizes` before it traces the kernels and
passes the choice as a static argument, so tune once eagerly, then jit as usual::

    autotune.tune(q, k, v, params, rpb)          # eager, on the GPU
    out = na2d(q, k, v, 7, backend="pallas")     # uses the tuned tiles

On CPU (no GPU to time on) :func:`tune` returns the defaults without timing anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nat_jax.kernels import pallas
from nat_jax.kernels.cache import cache_root
from nat_jax.kernels.params import NAParams

_CACHE: dict[str, pallas.BlockSizes] = {}
DEFAULT_CACHE_FILE = cache_root() / "pallas_blocks.json"


def shape_key(query, value, p: NAParams, has_rpb: bool = False) -> str:
    """Cache key: device kind, shapes, dtype and every NA parameter that changes the kernels."""
    device = jax.devices()[0].device_kind if jax.devices() else "none"
    return "|".join(str(x) for x in (
        device, tuple(query.shape), value.shape[-1], jnp.dtype(query.dtype).name, p.kernel_size,
        p.stride, p.dilation, p.is_causal, has_rpb))


def cached_block_sizes(query, value, p: NAParams, has_rpb: bool | None = None
                       ) -> pallas.BlockSizes | None:
    """The tuned block sizes for this call, if :func:`tune` (or the cache file) has one."""
    keys = [shape_key(query, value, p, has_rpb)] if has_rpb is not None else [
        shape_key(query, value, p, True), shape_key(query, value, p, False)]
    for key in keys:
        if key in _CACHE:
            return _CACHE[key]
    return None


# Forward (query rows, key rows) alternatives to the default, per dtype family; each one is in
# the GPU compile gate's sweep (spill-free on sm_80 and sm_90).
_ALTERNATIVES = {
    "16bit": ((128, 64), (64, 32), (64, 16), (128, 16), (32, 32)),
    "float32": ((32, 16), (16, 16), (64, 32)),
}


def candidates(query, value, p: NAParams) -> list[pallas.BlockSizes]:
    """The default plus a few alternatives (larger / smaller query and key tiles; the backward
    tiles and warps stay at the default). Large tiles are left out where the GPU gate found
    them spilling registers or at the 255-register limit (in 16-bit, 128x128 at all and more
    than 64x32 above head_dim 128; in float32, more than 32x32 above head_dim 32)."""
    spatial = query.shape[1:1 + p.rank]
    rows = [-(-n // d) for n, d in zip(spatial, p.dilation)]
    head_dim = max(query.shape[-1], value.shape[-1])
    default = pallas.BlockSizes.get_default(spatial, p.kernel_size, p.dilation, head_dim,
                                            query.dtype)
    family = "float32" if query.dtype == jnp.float32 else "16bit"
    if family == "16bit":
        budget = None if head_dim <= 128 else 64 * 32
    else:
        budget = None if head_dim <= 32 else 32 * 32
    grow = pallas._grow_tile  # noqa: SLF001 (the same tile shaping as the defaults)
    out = [default]
    for q_rows, kv_rows in _ALTERNATIVES[family]:
        if budget is not None and q_rows * kv_rows > budget:
            continue
        out.append(dataclasses.replace(default, q=grow(rows, q_rows), kv=grow(rows, kv_rows)))
    return list(dict.fromkeys(out))


def _measure(blocks: pallas.BlockSizes, query, key, value, p: NAParams, rpb,
             backward: bool, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of one candidate: forward, or forward + every gradient."""
    def run(q, k, v, r):
        if not backward:
            return pallas.na_fused(q, k, v, p, r, block_sizes=blocks)[0]

        def loss(q, k, v, r):
            return pallas.na_fused(q, k, v, p, r, block_sizes=blocks)[0].astype(
                jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2) if r is None else (0, 1, 2, 3))(q, k, v, r)

    fn = jax.jit(run)
    jax.block_until_ready(fn(query, key, value, rpb))  # compile + warm up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(query, key, value, rpb))
        best = min(best, time.perf_counter() - t0)
    return best


def tune(query, key, value, p: NAParams, rpb=None, *, cache_file: str | Path | None = None,
         backward: bool = True, verbose: bool = False) -> pallas.BlockSizes:
    """Pick the fastest candidate tiles for this call on the GPU and cache the choice.

    Args:
      query, key, value, p, rpb: as for :func:`pallas.na_fused` (concrete arrays).
      cache_file: JSON file to read/extend (``None``: in memory only; pass
        :data:`DEFAULT_CACHE_FILE` for the per-user cache).
      backward: time forward + backward (training) instead of forward only.

    Returns:
      The chosen :class:`BlockSizes` (the defaults on CPU, without timing).
    """
    key_str = shape_key(query, value, p, rpb is not None)
    if key_str in _CACHE:
        return _CACHE[key_str]
    if cache_file is not None:
        stored = load(cache_file)
        if key_str in stored:
            _CACHE[key_str] = stored[key_str]
            return stored[key_str]
    cands = candidates(query, value, p)
    if jax.default_backend() != "gpu":
        return cands[0]  # no GPU: nothing meaningful to time
    timings = []
    for blocks in cands:
        try:
            t = _measure(blocks, query, key, value, p, rpb, backward)
        except Exception as err:  # a candidate that fails to compile (e.g. out of SMEM) loses
            if verbose:
                print(f"autotune: {blocks} failed: {type(err).__name__}: {err}")
            continue
        timings.append((t, blocks))
        if verbose:
            print(f"autotune: {blocks}: {t * 1e3:.3f} ms")
    best = min(timings, key=lambda x: x[0])[1] if timings else cands[0]
    _CACHE[key_str] = best
    if cache_file is not None:
        save(cache_file, {key_str: best})
    return best


def load(cache_file: str | Path) -> dict[str, pallas.BlockSizes]:
    """Read a JSON cache (``{}`` if missing or unreadable)."""
    try:
        raw = json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = pallas.BlockSizes(**{f: tuple(x) if isinstance(x, list) else x
                                          for f, x in v.items()})
        except (TypeError, ValueError):
            continue  # stale entry from an older BlockSizes layout
    return out


def save(cache_file: str | Path, entries: dict[str, pallas.BlockSizes]) -> None:
    """Merge ``entries`` into the JSON cache file (created with its parent directory)."""
    path = Path(cache_file)
    merged = {k: _as_dict(v) for k, v in load(path).items()}
    merged.update({k: _as_dict(v) for k, v in entries.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    tmp.replace(path)


def _as_dict(b: pallas.BlockSizes) -> dict:
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}


def clear() -> None:
    """Forget every in-memory choice."""
    _CACHE.clear()
