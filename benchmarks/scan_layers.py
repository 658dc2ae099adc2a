"""Would ``lax.scan`` over a stage's repeated layers cut compile time? (issue: remat and compile
time.) Compiles one stage's forward + backward for one abstract H100 (XLA's GPU compiler,
deviceless), bf16, eval mode, the ``pallas`` NA backend, four ways: the layers unrolled (as
the models run today) or scanned (``jax.lax.scan`` over groups of layers with the same static
structure: DiNAT's alternating dilations make groups of two), each without and with
``jax.checkpoint`` per layer. Reports the lowering and compile time and XLA's temporaries.

The scanned variant stacks the layers' parameters into ``[groups, ...]`` arrays, which the
models do not do (their parameters keep HF's per-layer layout, and drop path has a different
static rate per layer); this measures what adopting it would buy.

Usage::

    python benchmarks/scan_layers.py                 # dinat_base stage 3 (18 layers), batch 32
    python benchmarks/scan_layers.py --preset nat_base --stage 2 --batch 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from nat_jax.timing import environment, write_json

MODES = ("unrolled", "scan", "unrolled_remat", "scan_remat")


def compile_stage(preset: str, stage: int, batch: int, mode: str, image_size: int) -> dict:
    """Worker task (CUDA plugin active): compile the stage's loss gradient in ``mode``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from nat_jax import configs
    from nat_jax.kernels import gpu_gate
    from nat_jax.modeling import BuildOptions, NatLayer

    mesh = Mesh(np.asarray([gpu_gate.abstract_gpu(gpu_gate.ARCHS["sm_90"])]), ("data",))
    replicated = NamedSharding(mesh, P())
    cfg = configs.get(preset)
    dilations = cfg.layer_dilations[stage]
    dim, heads = cfg.stage_dims[stage], cfg.num_heads[stage]
    side = image_size // 4 // 2 ** stage
    options = BuildOptions(dtype="bfloat16", na_backend="pallas")
    period = 2 if len(set(dilations)) > 1 else 1
    if any(d != dilations[i % period] for i, d in enumerate(dilations)) or \
            len(dilations) % period:
        raise ValueError(f"{preset} stage {stage}: dilations {dilations} do not repeat with "
                         f"period {period}")
    splits = [nnx.split(nnx.eval_shape(lambda d=d: NatLayer(cfg, options, dim, heads, d, 0.0,
                                                              rngs=nnx.Rngs(0))))
              for d in dilations]

    def place(tree):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)

    params = [place(nnx.to_pure_dict(state)) for _, state in splits]
    x = jax.ShapeDtypeStruct((batch, side, side, dim), jnp.bfloat16, sharding=replicated)

    def apply(i, p, x):
        graphdef, state = splits[i]
        state = nnx.State(state)
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state)(x)[0]

    if mode.endswith("_remat"):
        apply = jax.checkpoint(apply, static_argnums=(0,))
    if mode.startswith("unrolled"):
        def body_all(params, x):
            for i, p in enumerate(params):
                x = apply(i, p, x)
            return x
        args = (params, x)
    else:
        def stack(ps):
            return jax.tree.map(lambda *a: jax.ShapeDtypeStruct(
                (len(a),) + a[0].shape, a[0].dtype, sharding=replicated), *ps)

        grouped = tuple(stack(params[j::period]) for j in range(period))

        def body_all(grouped, x):
            def body(x, group):
                for j in range(period):
                    x = apply(j, group[j], x)
                return x, None
            return jax.lax.scan(body, x, grouped)[0]
        args = (grouped, x)

    def loss(p, x):
        return jnp.sum(body_all(p, x).astype(jnp.float32) ** 2)

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower()
        lower_s = time.perf_counter() - start
        compiled = lowered.compile({"xla_gpu_enable_triton_gemm": False})
    compile_s = time.perf_counter() - start - lower_s
    return dict(preset=preset, stage=stage, layers=len(dilations), dilations=list(dilations),
                grid=side, dim=dim, heads=heads, batch=batch, mode=mode,
                lower_seconds=round(lower_s, 1), compile_seconds=round(compile_s, 1),
                temp_bytes=compiled.memory_analysis().temp_size_in_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dinat_base")
    parser.add_argument("--stage", type=int, default=2, help="0-based stage index")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "scan_layers_h100.json"))
    args = parser.parse_args(argv)
    from nat_jax.train import deviceless

    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {MODES}")
        row = deviceless.run_isolated("h100x8", compile_stage, args.preset, args.stage,
                                      args.batch, mode, args.image_size, timeout=1800)
        rows.append(row)
        print(f"{mode:>15}: lower {row['lower_seconds']:5.1f} s, compile "
              f"{row['compile_seconds']:6.1f} s, temporaries {row['temp_bytes'] / 2**30:.2f} "
              "GiB", flush=True)
        write_json(args.out, dict(meta=environment(command=" ".join(sys.argv)),
                                  results=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
