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


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON through a temporary file and rename (never half-written)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
