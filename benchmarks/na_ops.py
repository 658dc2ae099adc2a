"""Benchmark the neighborhood-attention backends: forward and forward+backward.

Shapes: NAT/DiNAT stages at 224 (56x56 ... 7x7, head_dim 32, K=7, DiNAT dilations), a token
scaling series (56x56 -> 224x224), large-kernel cases, and the NA-library cases beyond NAT
(``--only library``): a 1-D long sequence (32K tokens, window 2048, head_dim 128, with and
without stride 256), a FLUX-like 2-D case (64x64 tokens, window 31x31, 512 extra global tokens)
and a video-like 3-D case (8x32x32, window 3x11x11). ``--backends xla,natten`` adds natten
0.21.7's flex backend (PyTorch, forward only on CPU, no RPB). Every backend is timed in the same run
(jit-compiled, warm, median of ``--repeats`` runs); effective TFLOP/s uses NATTEN's FLOP
convention (forward ``4*B*heads*N*prod(K)*head_dim``, backward counted as 2.5x forward).

Usage::

    python benchmarks/na_ops.py                      # CPU-sized suite, writes JSON + table
    python benchmarks/na_ops.py --suite gpu          # GPU-sized suite (batch 128, large kernel)
    python benchmarks/na_ops.py --only stages --backends xla
    python benchmarks/na_ops.py --op unfused --only stages   # na2d_av(softmax(na2d_qk)): the
                                                             # attention-weights path
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from nat_jax import kernels
from nat_jax import host
from nat_jax.timing import environment, median_seconds, write_json


@dataclasses.dataclass(frozen=True)
class Shape:
    group: str
    name: str
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel: int | tuple[int, ...]
    dilation: int = 1
    rpb: bool = True
    dtype: str = "float32"
    backward: bool = True
    stride: int = 1
    extra: int = 0  # additional (global) tokens every query attends to


def cpu_suite() -> list[Shape]:
    stages = [
        Shape("stages", "NAT s1 56x56 h2", 2, (56, 56), 2, 32, 7),
        Shape("stages", "DiNAT s1 56x56 h2 d8", 2, (56, 56), 2, 32, 7, 8),
        Shape("stages", "NAT s2 28x28 h4", 2, (28, 28), 4, 32, 7),
        Shape("stages", "DiNAT s2 28x28 h4 d4", 2, (28, 28), 4, 32, 7, 4),
        Shape("stages", "NAT s3 14x14 h8", 2, (14, 14), 8, 32, 7),
        Shape("stages", "DiNAT s3 14x14 h8 d2", 2, (14, 14), 8, 32, 7, 2),
        Shape("stages", "NAT s4 7x7 h16", 2, (7, 7), 16, 32, 7),
    ]
    scaling = [Shape("scaling", f"{n}x{n} h2 K7", 1, (n, n), 2, 32, 7) for n in (56, 112, 224)]
    large = [
        Shape("large", "2-D 64x64 K31 h4 d64", 1, (64, 64), 4, 64, 31, rpb=False),
        Shape("large", "1-D 4096 K255 h4 d64", 1, (4096,), 4, 64, 255, rpb=False),
    ]
    library = [
        Shape("library", "1-D 32K K2048 h1 d128", 1, (32768,), 1, 128, 2048, rpb=False),
        Shape("library", "1-D 32K K2048 s256 h1 d128", 1, (32768,), 1, 128, 2048, rpb=False,
              stride=256),
        Shape("library", "2-D 64x64 K31 +512 h2 d128", 1, (64, 64), 2, 128, 31, rpb=False,
              extra=512),
        Shape("library", "3-D 8x32x32 K3x11x11 h2 d64", 1, (8, 32, 32), 2, 64, (3, 11, 11),
              rpb=False),
    ]
    return stages + scaling + large + library


def gpu_suite() -> list[Shape]:
    out = []
    for dil_name, dils in (("NAT", (1, 1, 1, 1)), ("DiNAT", (8, 4, 2, 1))):
        for (n, h), d in zip(((56, 2), (28, 4), (14, 8), (7, 16)), dils):
            out.append(Shape("stages", f"{dil_name} {n}x{n} h{h} d{d}", 128, (n, n), h, 32, 7, d,
                             dtype="bfloat16"))
    out += [Shape("scaling", f"{n}x{n} h2 K7", 8, (n, n), 2, 32, 7, dtype="bfloat16")
            for n in (56, 112, 224)]
    out.append(Shape("large", "2-D 256x256 K80 h24 d128 fp16", 1, (256, 256), 24, 128, 80,
                     rpb=False, dtype="float16", backward=False))
    return out


def _temp_mib(fn, *args) -> float | None:
    """XLA's temporary memory for ``fn`` (compile-time figure; None where not reported)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes / 2 ** 20


def _kernel(s: Shape) -> tuple[int, ...]:
    return s.kernel if isinstance(s.kernel, tuple) else (s.kernel,) * len(s.spatial)


def bench_natten(s: Shape, repeats: int) -> dict:
    """natten 0.21.7's flex backend (PyTorch on CPU), forward only."""
    import natten
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, s.dtype)
    q, k, v = (torch.randn(s.batch, *s.spatial, s.heads, s.head_dim, dtype=dtype)
               for _ in range(3))
    extra = {}
    if s.extra:
        ek, ev = (torch.randn(s.batch, s.extra, s.heads, s.head_dim, dtype=dtype)
                  for _ in range(2))
        extra = dict(additional_keys=ek, additional_values=ev)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(s.spatial)]

    def run():
        with torch.no_grad():
            return fn(q, k, v, kernel_size=_kernel(s), stride=s.stride, dilation=s.dilation,
                      backend="flex-fna", **extra)

    t = median_seconds(run, repeats=repeats)  # torch runs synchronously on CPU
    flops = kernels.na_flops(s.batch, s.heads, s.spatial, _kernel(s), s.head_dim,
                             additional_tokens=s.extra)
    return dict(dataclasses.asdict(s), backend="natten-flex", op="fused", flops_fwd=flops,
                fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12, fwd_temp_mib=None)


def bench_one(s: Shape, backend: str, repeats: int, op: str = "fused") -> dict:
    if backend == "natten":
        return bench_natten(s, repeats)
    rank = len(s.spatial)
    kernel = _kernel(s)
    dtype = jnp.dtype(s.dtype)
    key = jax.random.key(0)
    kq, kk, kv, kr, kd, ke = jax.random.split(key, 6)
    shape = (s.batch, *s.spatial, s.heads, s.head_dim)
    q, k, v, dout = (jax.random.normal(x, shape, dtype) for x in (kq, kk, kv, kd))
    rpb = (jax.random.normal(kr, (s.heads, *(2 * kk_ - 1 for kk_ in kernel)), dtype) if s.rpb
           else None)
    extra = {}
    if s.extra:
        ek, ev = jax.random.normal(ke, (2, s.batch, s.extra, s.heads, s.head_dim), dtype)
        extra = dict(additional_keys=ek, additional_values=ev)

    def fwd(q, k, v, rpb):
        if op == "fused":
            return kernels.neighborhood_attention(q, k, v, kernel, stride=s.stride,
                                                  dilation=s.dilation, rpb=rpb,
                                                  backend=backend, **extra)
        qk, av = getattr(kernels, f"na{rank}d_qk"), getattr(kernels, f"na{rank}d_av")
        logits = qk(q, k, kernel, stride=s.stride, dilation=s.dilation, rpb=rpb,
                    backend=backend)
        return av(jax.nn.softmax(logits, -1).astype(v.dtype), v, kernel, stride=s.stride,
                  dilation=s.dilation, backend=backend)

    def fwd_bwd(q, k, v, rpb):
        out, vjp = jax.vjp(fwd, q, k, v, rpb)
        return vjp(dout)

    flops = kernels.na_flops(s.batch, s.heads, s.spatial, kernel, s.head_dim,
                             additional_tokens=s.extra)
    row = dict(dataclasses.asdict(s), backend=backend, op=op, flops_fwd=flops)
    t = median_seconds(jax.jit(fwd), q, k, v, rpb, repeats=repeats)
    row.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12,
               fwd_temp_mib=_temp_mib(fwd, q, k, v, rpb))
    if s.backward:
        t = median_seconds(jax.jit(fwd_bwd), q, k, v, rpb, repeats=repeats)
        row.update(fwd_bwd_ms=t * 1e3, fwd_bwd_tflops=3.5 * flops / t / 1e12,
                   fwd_bwd_temp_mib=_temp_mib(fwd_bwd, q, k, v, rpb))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("cpu", "gpu"),
                        default="gpu" if jax.default_backend() == "gpu" else "cpu")
    parser.add_argument("--only", default=None,
                        help="comma-separated groups: stages,scaling,large,library")
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: reference,xla and pallas on GPU; "
                             "'natten' = natten's flex backend, forward only)")
    parser.add_argument("--op", choices=("fused", "unfused"), default="fused",
                        help="fused na*d, or na*d_av(softmax(na*d_qk)) (attention weights)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                                                    "na_ops_<platform>.json)")
    args = parser.parse_args(argv)

    platform_name = jax.default_backend()
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = ["reference", "xla"]
        # Interpret-mode Pallas on CPU checks correctness, not speed.
        if platform_name == "gpu" and "pallas" in kernels.available_backends():
            backends.append("pallas")
    shapes = cpu_suite() if args.suite == "cpu" else gpu_suite()
    if args.only:
        groups = set(args.only.split(","))
        shapes = [s for s in shapes if s.group in groups]

    suffix = "" if args.op == "fused" else "_unfused"
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"na_ops{suffix}_{platform_name}.json")
    rows = []
    console = Console()
    with console.status("benchmarking") as status:
        for s in shapes:
            for backend in backends:
                # The reference gathers [tokens, K^2, d] for keys and values: skip where that
                # alone would not fit comfortably.
                gather = 2 * s.batch * np.prod(s.spatial) * np.prod(_kernel(s)) \
                    * s.heads * s.head_dim * jnp.dtype(s.dtype).itemsize
                if backend == "reference" and gather > 4e9:
                    continue
                # natten's flex backend without torch.compile materializes [B, heads, N, N]
                # scores on CPU (a 32K sequence: 4.3 GB per head, and copies of it).
                tokens = int(np.prod(s.spatial)) + s.extra
                if backend == "natten" and s.batch * s.heads * tokens ** 2 * 4 > 2e9:
                    rows.append(dict(dataclasses.asdict(s), backend="natten-flex",
                                     skipped="flex materializes the full N x N scores on CPU"))
                    continue
                status.update(f"{s.name} [{backend}]")
                rows.append(bench_one(s, backend, args.repeats, args.op))
                write_json(out, dict(meta=environment(repeats=args.repeats, suite=args.suite,
                                                      op=args.op), results=rows))

    device = jax.devices()[0]
    write_json(out, dict(meta=environment(repeats=args.repeats, suite=args.suite, op=args.op),
                         results=rows))

    table = Table(title=f"NA ops ({args.op}) on {device.device_kind} ({platform_name}), "
                        f"jax {jax.__version__}")
    for col in ("shape", "dtype", "backend", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms",
                "vs reference", "fwd temp MiB", "fwd+bwd temp MiB"):
        table.add_column(col, justify="left" if col in ("shape", "dtype", "backend") else "right")
    by_key = {(r["name"], r["backend"]): r for r in rows}
    for r in rows:
        if "skipped" in r:
            table.add_row(r["name"], r["dtype"], r["backend"], "skipped: " + r["skipped"],
                          *["-"] * 5)
            continue
        ref = by_key.get((r["name"], "reference"))
        ratio = f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x" if ref else "-"
        mib = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        table.add_row(r["name"], r["dtype"], r["backend"], f"{r['fwd_ms']:.2f}",
                      f"{r['fwd_tflops']:.4f}",
                      f"{r['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in r else "-", ratio,
                      mib(r["fwd_temp_mib"]), mib(r.get("fwd_bwd_temp_mib")))
    console.print(table)
    scaling = [r for r in rows if r["group"] == "scaling" and r["backend"] == "xla"]
    if len(scaling) > 1:
        base = scaling[0]
        for r in scaling[1:]:
            tokens = np.prod(r["spatial"]) / np.prod(base["spatial"])
            console.print(f"xla {r['name']}: {tokens:.0f}x tokens -> "
                          f"{r['fwd_ms'] / base['fwd_ms']:.1f}x fwd time, "
                          f"{r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.1f}x fwd+bwd time")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
