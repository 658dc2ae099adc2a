"""Neighborhood attention on a few NAT/DiNAT-like shapes: every backend against the reference.

Prints one row per (shape, backend): the forward time (jit-compiled, median of a few runs), its
effective GFLOP/s by NATTEN's FLOP formula, and the largest difference from the reference
backend. Example: ``nat-jax demo --batch 2``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from nat_jax import kernels
from nat_jax.timing import median_seconds

CASES = [
    # name, spatial, kernel, dilation, heads, head_dim, with rpb
    ("NAT stage 2 (28x28, K=7, RPB)", (28, 28), 7, 1, 4, 32, True),
    ("DiNAT stage 1 (56x56, K=7, dil 8, RPB)", (56, 56), 7, 8, 2, 32, True),
    ("1-D (1024, K=31, causal)", (1024,), 31, 1, 4, 32, False),
    ("3-D (12x12x12, K=3, dil 2)", (12, 12, 12), 3, 2, 2, 32, False),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (default 5)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: all available)")


def run(args: argparse.Namespace) -> int:
    backends = (args.backends.split(",") if args.backends else
                [b for b in kernels.available_backends()])
    console = Console()
    table = Table(title=f"Neighborhood attention on {jax.devices()[0].platform.upper()} "
                        f"({jax.devices()[0].device_kind}), batch {args.batch}, float32")
    for col in ("case", "backend", "time (ms)", "GFLOP/s", "max |diff| vs reference"):
        table.add_column(col, justify="left" if col in ("case", "backend") else "right")
    key = jax.random.key(0)
    for name, spatial, kernel, dilation, heads, dim, with_rpb in CASES:
        rank = len(spatial)
        kq, kk, kv, kr, key = jax.random.split(key, 5)
        shape = (args.batch, *spatial, heads, dim)
        q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv))
        rpb = (jax.random.normal(kr, (heads, *(2 * kernel - 1,) * rank)) if with_rpb else None)
        causal = "causal" in name
        flops = kernels.na_flops(args.batch, heads, spatial, (kernel,) * rank, dim)
        ref = None
        for backend in ["reference"] + [b for b in backends if b != "reference"]:
            fn = jax.jit(lambda q, k, v, r, b=backend: kernels.neighborhood_attention(
                q, k, v, kernel, dilation=dilation, is_causal=causal, rpb=r, backend=b))
            seconds = median_seconds(fn, q, k, v, rpb, repeats=args.repeats)
            out = fn(q, k, v, rpb)
            if ref is None:
                ref = out
            diff = float(jnp.max(jnp.abs(out - ref)))
            table.add_row(name, backend, f"{seconds * 1e3:.2f}", f"{flops / seconds / 1e9:.1f}",
                          f"{diff:.1e}")
        table.add_section()
    console.print(table)
    return 0
