"""Inference throughput (images/s) of every NAT/DiNAT preset at 224, per dtype and NA backend.

Each (preset, backend, dtype, batch) is jit-compiled once and timed warm (median of
``--repeats`` runs). Weights are random (throughput does not depend on them). Results go to
``benchmarks/results/models_<platform>.json`` with the device name, jax version and the host's
load average at the start (CPU numbers on a shared machine are noisy), plus a rich table.

Usage::

    python benchmarks/models.py                                   # all presets, batch 1 and 64
    python benchmarks/models.py --presets nat_mini dinat_mini --batch 1 8   # a short CPU run
    python benchmarks/models.py --backends xla --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

import nat_jax
from nat_jax import configs, kernels
from nat_jax import host
from nat_jax.timing import environment, median_seconds, write_json


def _params(config):
    """Random float32 parameters for ``config``, initialized in one compiled program."""
    def init():
        return nnx.state(nat_jax.build_model(config, rngs=nnx.Rngs(0)), nnx.Param)
    return jax.jit(init)()


def bench_one(config, params, batch: int, repeats: int, size: int, **options) -> dict:
    """Throughput of ``config`` built with ``options`` (dtype, na_backend) with ``params`` at
    ``batch`` images of ``size`` x ``size``."""
    graphdef, _, rest = nat_jax.abstract_model(config, **options)

    @jax.jit
    def forward(p, x):
        return nnx.merge(graphdef, p, rest)(x).logits

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)),
                    options["dtype"])
    start = time.perf_counter()
    jax.block_until_ready(forward(params, x))
    compile_s = time.perf_counter() - start
    seconds = median_seconds(forward, params, x, repeats=repeats)
    return dict(images_per_s=batch / seconds, ms_per_batch=1e3 * seconds, compile_s=compile_s)


def main(argv: list[str] | None = None) -> int:
    platform_name = jax.default_backend()
    default_backends = ["xla", "reference"] if platform_name == "cpu" else ["pallas", "xla"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=configs.list_presets(),
                        choices=configs.list_presets())
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=default_backends,
                        help=f"NA backends (available: {', '.join(kernels.available_backends())})")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224,
                        help="input side (the 384 presets are also run at this size)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                        "models_<platform>.json)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    meta = environment(
        command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
        image_size=args.image_size, repeats=args.repeats)
    console = Console(width=max(Console().width, 110))
    rows = []
    for name in args.presets:
        config = configs.get(name)
        params = _params(config)
        for backend in args.backends:
            for dtype in args.dtypes:
                for batch in args.batch:
                    row = dict(preset=name, backend=backend, dtype=dtype, batch=batch,
                               params_m=round(nat_jax.count_params(params) / 1e6, 1))
                    try:
                        row.update(bench_one(config, params, batch, args.repeats,
                                             args.image_size, dtype=dtype, na_backend=backend))
                    except Exception as e:  # noqa: BLE001 - record e.g. OOM and go on
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    console.log(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                          f"{k}={v}" for k, v in row.items()))

    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"models_{platform_name}.json")
    write_json(out, dict(meta=meta, results=rows))

    table = Table(title=f"NAT/DiNAT inference on {device.device_kind} ({platform_name}), "
                        f"jax {jax.__version__}, {args.image_size}x{args.image_size}")
    for col in ("preset", "params", "backend", "dtype", "batch", "images/s", "ms/batch",
                "compile s"):
        table.add_column(col, justify="left" if col in ("preset", "backend", "dtype")
                         else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["preset"], f"{r['params_m']}M", r["backend"], r["dtype"],
                          str(r["batch"]), r["error"][:40], "", "")
            continue
        table.add_row(r["preset"], f"{r['params_m']}M", r["backend"], r["dtype"],
                      str(r["batch"]), f"{r['images_per_s']:.1f}", f"{r['ms_per_batch']:.1f}",
                      f"{r['compile_s']:.1f}")
    console.print(table)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
