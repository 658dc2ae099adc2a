"""Where nat-jax keeps what it builds or downloads once per machine: converted Hub checkpoints
(:mod:`nat_jax.hub`), tuned Pallas tile sizes (:mod:`autotune`) and the cpu backend's compiled
kernels (:mod:`cpu`). One rule for all of them, in the lowest layer so the kernels can use it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "NAT_JAX_CACHE"


def cache_root() -> Path:
    """``$NAT_JAX_CACHE``, else ``$XDG_CACHE_HOME/nat_jax``, else ``~/.cache/nat_jax``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nat_jax"
