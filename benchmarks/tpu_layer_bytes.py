"""Bytes one NA layer moves on a TPU chip, by XLA's count: the xla path against dense window
attention (issue: TPU without a TPU, item 2).

Compiles ``grad(sum(NA(q, k, v, rpb) ** 2))`` (forward + backward, bf16, RPB, head_dim 32) for
one chip of a TPU topology with libtpu, deviceless, and reads XLA's cost and memory analysis.
The xla path is compiled as :mod:`deviceless_tpu`'s ``--taken-path`` rows are
(:func:`nat_jax.kernels.xla.counted_whole`: no containment conditional, no chunk loop), so its
count is whole; the baseline is the same
layer with dense attention inside non-overlapping ``K x K`` windows
(:func:`deviceless_tpu.window_attention`), which needs the same FLOPs. ``--tiles`` compares
query tile shapes of the xla path (default: :func:`nat_jax.kernels.windows.xla_tile_sizes`).

Usage::

    python benchmarks/tpu_layer_bytes.py                       # NAT-Mini's stages, 128 / chip
    python benchmarks/tpu_layer_bytes.py --layers 56:2:1 --tiles 7x7,8x8,14x14
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from nat_jax.timing import environment, write_json

# side:heads:dilation of NAT-Mini's and DiNAT-Mini's layers at 224 px (K=7).
DEFAULT_LAYERS = "56:2:1,28:4:1,14:8:1,56:2:8,28:4:4"


def compile_layer(target: str, batch: int, side: int, heads: int, dilation: int,
                  tiles: tuple[int, int] | None, baseline: bool) -> dict:
    """Worker task (libtpu active): one layer's forward + backward for one chip."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import deviceless_tpu
    from nat_jax.kernels import params, xla
    from nat_jax.train import deviceless

    kernel, head_dim = 7, 32
    mesh = Mesh(np.asarray(deviceless.abstract_devices(deviceless.TARGETS[target])[:1]),
                ("data",))
    on_chip = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((batch, side, side, heads, head_dim), jnp.bfloat16,
                             sharding=on_chip)
    rpb = jax.ShapeDtypeStruct((heads, 2 * kernel - 1, 2 * kernel - 1), jnp.float32,
                               sharding=on_chip)
    p = params.make_params((side, side), head_dim, kernel, dilation=dilation)
    if baseline:
        def na(q, k, v, b):
            return deviceless_tpu.window_attention(q, k, v, p, b, None)[0]
    else:
        def na(q, k, v, b):
            return xla.na_fused(q, k, v, p, b, tile_sizes=tiles)[0]

    def loss(*args):
        return jnp.sum(na(*args).astype(jnp.float32) ** 2)

    start = time.perf_counter()
    with xla.counted_whole(), jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
            x, x, x, rpb).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(target=target, batch=batch, side=side, heads=heads, dilation=dilation,
                implementation="window" if baseline else "xla",
                tiles=list(tiles) if tiles else None, bytes_accessed=cost["bytes accessed"],
                flops=cost["flops"], temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                compile_seconds=round(time.perf_counter() - start, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="v5e-8", help="TPU topology; one chip is used")
    parser.add_argument("--batch", type=int, default=128, help="images per chip")
    parser.add_argument("--layers", default=DEFAULT_LAYERS,
                        help="comma-separated side:heads:dilation (K=7, head_dim 32)")
    parser.add_argument("--tiles", default="",
                        help="comma-separated xla tile shapes, e.g. 7x7,8x8 (default: the "
                             "library's choice)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "tpu_layer_bytes.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # deviceless_tpu, in workers
    from nat_jax.train import deviceless

    tile_options = [None] + [tuple(int(v) for v in t.split("x"))
                             for t in args.tiles.split(",") if t]
    rows = []
    print("| layer | implementation | tiles | GB accessed | vs window | GFLOP | temporaries GB |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.layers.split(","):
        side, heads, dilation = (int(v) for v in spec.split(":"))
        window = None
        for baseline, tiles in [(True, None)] + [(False, t) for t in tile_options]:
            if baseline and side % 7:
                continue
            row = deviceless.run_isolated(args.target, compile_layer, args.target, args.batch,
                                          side, heads, dilation, tiles, baseline, timeout=1200)
            rows.append(row)
            window = row["bytes_accessed"] if baseline else window
            ratio = f"{row['bytes_accessed'] / window:.2f}x" if window else "-"
            print(f"| {side}x{side}, {heads} heads, dilation {dilation} | "
                  f"{row['implementation']} | {'x'.join(map(str, tiles)) if tiles else '-'} | "
                  f"{row['bytes_accessed'] / 1e9:.1f} | {ratio} | {row['flops'] / 1e9:.1f} | "
                  f"{row['temp_bytes'] / 1e9:.2f} |", flush=True)
            write_json(args.out, dict(meta=environment(command=" ".join(sys.argv)), rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
