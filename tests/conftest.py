"""Shared test setup.

* 8 virtual CPU devices (sharding tests; must be set before jax is imported).
* Two tiers. ``make test`` (and CI) runs the default tier: every feature, the quick grids and
  the fast gates, plus a deterministic sample of the ``slow`` tests
  (``NAT_JAX_SLOW_FRACTION``, default 0.1; sampled by test id, so a failure replays).
  ``make test-all`` (``NAT_JAX_TIER=all``) runs everything: full sweeps, long compile gates,
  every preset end to end.
* ``rng``: a numpy Generator seeded from the test id, so inputs are fresh per test and any
  failure replays exactly.
"""

import hashlib
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _stable_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def pytest_collection_modifyitems(config, items):
    if os.environ.get("NAT_JAX_TIER", "default").lower() == "all":
        return
    fraction = float(os.environ.get("NAT_JAX_SLOW_FRACTION", "0.1"))
    keep, drop = [], []
    for item in items:
        if "slow" in item.keywords and _stable_fraction(item.nodeid) >= fraction:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def rng(request) -> np.random.Generator:
    seed = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed)
