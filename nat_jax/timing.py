"""Timing and result-recording helpers shared by the demo and the benchmarks.

Timings are wall-clock medians of warm, jit-compiled calls (compilation excluded, results
blocked on); every result file carries the environment it was measured in.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nat_jax import host


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1
                   ) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs after ``warmup`` runs (the first
    of which compiles)."""
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def environment(**extra: Any) -> dict:
    """Device, versions and host facts to store beside benchmark numbers."""
    device = jax.devices()[0]
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    return dict(
        device=device.device_kind, platform=device.platform, device_count=jax.device_count(),
        jax=jax.__version__, jaxlib=jaxlib_version, python=sys.version.split()[0],
        host=platform.machine(), cpu_count=os.cpu_count(),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        malloc_huge_pages=host.huge_pages_enabled(), **extra)


def matmul_ceiling(dtype=jnp.float32, n: int = 2048, repeats: int = 15) -> float:
    """FLOP/s of one large square ``n x n`` matmul on the default device: the best of
    ``repeats`` timed calls (the ceiling the benchmarks' "fraction of the matmul bound" divides
    by). The best, not the median: a median of 5 ranged 205-370 GFLOP/s across runs on a 2-core
    VM, which moved every fraction with it."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON through a temporary file and rename (never half-written)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
