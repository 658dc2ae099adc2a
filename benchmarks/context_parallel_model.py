"""A whole backbone with context parallelism: per-device memory of NAT/DiNAT at high resolution
with the token rows of its first stages split over devices (compile only, CPU devices).

The program is one training-style step of a backbone (``zoo`` head ``backbone``, e.g. DiNAT
for segmentation at 1024x1024): forward, a loss on every feature map, and the gradients of the
parameters. Built with ``context_axis="context"``, it runs on a ``(data, context)`` mesh whose
context axis splits the rows of the first ``--stages`` stages (:mod:`nat_jax.kernels.context`);
``--context 1`` is the same program on one device. Reported per device: XLA's memory analysis
of the compiled program (arguments, outputs, temporaries), the compile time, and the
collectives the program holds.

Usage::

    python benchmarks/context_parallel_model.py                        # dinat_tiny, 1024 px
    python benchmarks/context_parallel_model.py --preset dinat_mini --context 1,8 --image-size 512
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from nat_jax import configs, zoo  # noqa: E402
from nat_jax import host  # noqa: E402
from nat_jax.timing import environment, write_json  # noqa: E402
from nat_jax.train import deviceless  # noqa: E402

GIB = 2 ** 30


def measure(preset: str, image_size: int, batch: int, context: int, stages: int,
            dtype: str, backend: str) -> dict:
    """Compile the backbone step with its rows split ``context`` ways (1: one device)."""
    cfg = configs.get(preset)
    options = dict(dtype=dtype, na_backend=backend,
                   context_axis="context" if context > 1 else None, context_stages=stages)
    graphdef, params, rest = zoo.abstract_model(cfg, head="backbone", **options)
    devices = np.asarray(jax.devices()[:context]).reshape(1, context)
    mesh = Mesh(devices, ("data", "context"))
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.to_pure_dict(params))
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32,
                                  sharding=NamedSharding(mesh, P(None, "context")))

    def step(params, images):
        def loss(params):
            model = nnx.merge(graphdef, params, rest)
            maps = model(images).feature_maps
            return sum(jnp.mean(jnp.square(m.astype(jnp.float32))) for m in maps)

        return jax.value_and_grad(loss)(params)

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).trace(params, images).lower().compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    summary = deviceless.hlo_summary(hlo, batch)
    return dict(preset=preset, image_size=image_size, batch=batch, context=context,
                context_stages=stages, dtype=dtype, backend=backend,
                compile_seconds=seconds, temp_bytes=mem.temp_size_in_bytes,
                argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                per_device_bytes=(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                  + mem.output_size_in_bytes - mem.alias_size_in_bytes),
                collective_permutes=summary["collective_permutes"],
                all_gathers=summary["all_gathers"],
                all_reduces=len(re.findall(r" all-reduce(?:-start)?\(", hlo)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dinat_tiny", help="a nat_jax.configs preset")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="images (the whole mesh's)")
    parser.add_argument("--context", default="1,8",
                        help="comma-separated context sizes (devices splitting the rows)")
    parser.add_argument("--stages", type=int, default=4,
                        help="leading stages whose rows are split")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="xla", help="NA backend (xla on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "context_parallel_model_cpu.json"))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.context.split(",")]
    if max(sizes) > jax.device_count():
        parser.error(f"--context {args.context}: only {jax.device_count()} devices")
    console = Console()
    rows = []
    with console.status("compiling") as status:
        for c in sizes:
            status.update(f"{args.preset} at {args.image_size} px, context {c}")
            rows.append(measure(args.preset, args.image_size, args.batch, c, args.stages,
                                args.dtype, args.backend))
            write_json(args.out, dict(meta=environment(command=" ".join(sys.argv)),
                                      results=rows))
    table = Table(title=f"{args.preset} backbone step at {args.image_size} px, batch "
                        f"{args.batch}, rows of the first {args.stages} stages split")
    for col in ("context", "GiB/device", "temp GiB", "vs 1", "permutes", "all-gathers",
                "compile s"):
        table.add_column(col, justify="right")
    base = rows[0]["per_device_bytes"]
    for r in rows:
        table.add_row(str(r["context"]), f"{r['per_device_bytes'] / GIB:.2f}",
                      f"{r['temp_bytes'] / GIB:.2f}", f"{r['per_device_bytes'] / base:.2f}",
                      str(r["collective_permutes"]), str(r["all_gathers"]),
                      f"{r['compile_seconds']:.0f}")
    console.print(table)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
