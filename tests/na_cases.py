"""Shared NA test cases: a grid modeled on NATTEN's test_fna and a seeded random sweep.

Each case is a dict with batch, heads, head_dim, shape, kernel, stride, dilation, causal.
Other backends' tests (e.g. the Pallas kernels) reuse these so every backend meets the same grid.
"""

from __future__ import annotations

import itertools

import numpy as np


def auto_on_cpu() -> str:
    """The backend ``backend="auto"`` runs on a CPU: the native cpu kernels where they build
    (a C++ compiler is present), else the xla path."""
    from nat_jax.kernels import cpu
    return "cpu" if cpu.build_error() is None else "xla"


def case(shape, kernel, stride=1, dilation=1, causal=False, batch=1, heads=2, head_dim=16,
         heads_kv=None, periodic=False):
    """``heads_kv`` (default ``heads``): key/value heads (grouped-query attention);
    ``periodic``: bool or per axis."""
    n = len(shape)
    tup = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * n  # noqa: E731
    return dict(batch=batch, heads=heads, head_dim=head_dim, shape=tuple(shape),
                kernel=tup(kernel), stride=tup(stride), dilation=tup(dilation),
                causal=tup(causal), heads_kv=heads_kv or heads, periodic=tup(periodic))


def case_id(c) -> str:
    def f(x):
        return "x".join(str(int(v)) for v in x)
    out = (f"b{c['batch']}h{c['heads']}d{c['head_dim']}-s{f(c['shape'])}-k{f(c['kernel'])}"
           f"-st{f(c['stride'])}-di{f(c['dilation'])}-c{f(c['causal'])}")
    # The newer features only show when used, so earlier ids (and their seeds) stay put.
    if c.get("heads_kv", c["heads"]) != c["heads"]:
        out += f"-kv{c['heads_kv']}"
    if any(c.get("periodic", ())):
        out += f"-p{f(c['periodic'])}"
    return out


def all_causal(c):
    """The case under every causal combination (2^rank cases)."""
    return [dict(c, causal=combo) for combo in itertools.product((False, True),
                                                                 repeat=len(c["shape"]))]


# Quick tier: small, covers every feature and their combinations.
QUICK = [
    case((10,), 3),
    case((13,), 4, stride=2, dilation=3, causal=True),
    case((16,), 16),  # kernel == size: full attention
    case((9, 11), (3, 5), dilation=(2, 1)),
    case((12, 9), (4, 3), stride=(2, 3), dilation=(1, 2), causal=(True, False)),
    case((8, 8), 8),  # full attention in 2-D
    case((10, 12), (2, 4), stride=(2, 4)),  # even kernels, blocked
    case((7, 6, 5), (3, 2, 3), stride=(1, 2, 3), dilation=(2, 1, 1), causal=(False, True, True)),
    case((6, 5, 7), 3, dilation=(1, 1, 2)),
]
QUICK += all_causal(case((11, 10), (5, 3), stride=(2, 1), dilation=(2, 3)))

# NATTEN's sample grid (reference doc), reduced heads/dims to fit a CPU budget.
NATTEN_GRID = [
    case((256,), 255, stride=82, heads=1, head_dim=32),
    case((128,), 3, stride=2, dilation=10, head_dim=32),
    case((128,), 8, stride=7, dilation=5, head_dim=32),
    case((125,), 3, head_dim=32),
    case((5, 25), (5, 16), stride=(1, 16)),
    case((84, 19), (7, 3), dilation=(5, 1)),
    case((19, 29), (8, 8), dilation=(2, 3)),
    case((67, 80), (12, 7), stride=(8, 4), dilation=(5, 11), heads=1),
    case((33, 33), (24, 16), heads=1),
    case((36, 40), (36, 40), stride=(12, 13), heads=1),
    case((32, 10, 10), (7, 3, 3), stride=(5, 1, 1), dilation=(1, 2, 3), heads=1),
    case((13, 11, 9), (3, 4, 3), stride=(2, 3, 3), dilation=(3, 2, 2), heads=1),
    case((18, 37, 12), (14, 16, 12), stride=(12, 8, 1), dilation=(1, 2, 1), heads=1, head_dim=8),
]

# Cases with relative positional bias (odd kernel, stride 1, non-causal: the NAT/DiNAT case).
RPB = [
    case((9,), 3, dilation=2),
    case((14, 14), 7),
    case((20, 17), 5, dilation=(2, 3)),
    case((12, 12), (3, 7), dilation=(4, 1)),
    case((6, 7, 5), 3, dilation=(2, 1, 1)),
]


def random_cases(seed: int, count: int, rank: int) -> list[dict]:
    """NATTEN-style random sweep: sizes 4..48 (1-D up to 128), kernel in [2, size], stride in
    [1, kernel], dilation in [1, size // kernel], random causal per axis, head_dim multiple of 8."""
    r = np.random.default_rng(seed)
    hi = {1: 128, 2: 40, 3: 14}[rank]
    out = []
    for _ in range(count):
        shape = tuple(int(r.integers(4, hi + 1)) for _ in range(rank))
        kernel = tuple(int(r.integers(2, min(n, 13) + 1)) for n in shape)
        stride = tuple(int(r.integers(1, k + 1)) for k in kernel)
        dilation = tuple(int(r.integers(1, n // k + 1)) for n, k in zip(shape, kernel))
        causal = tuple(bool(r.integers(2)) for _ in range(rank))
        out.append(case(shape, kernel, stride, dilation, causal, batch=int(r.integers(1, 3)),
                        heads=int(r.integers(1, 3)), head_dim=8 * int(r.integers(1, 5))))
    return out
