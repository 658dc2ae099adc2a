"""Compile time and peak memory of the trainer's train step, without and with ``remat``.

Builds the sharded train step of a training config exactly as ``nat-jax train`` does
(:func:`nat_jax.train.trainer.build_steps`: AdamW, augmentation on device, bf16 compute) for
the local devices, lowers and compiles it, and reads XLA's buffer assignment
(``compiled.memory_analysis()``): arguments (parameters, optimizer state, batch), outputs, and
the temporaries the step needs on top (activations kept for the backward pass, workspace).
Peak = arguments + outputs + temporaries - donated aliases. ``remat=True`` rematerializes each
NAT layer in the backward pass (``nnx.remat``): only layer inputs stay live between the
forward and the backward pass. Nothing is executed; the compile time is wall clock on this
host.

Targets: the local devices (``--target local``), or 8 abstract H100s (``--target h100x8``):
XLA's own GPU compiler run deviceless through :mod:`nat_jax.train.deviceless`, so the memory
is what each H100 of a real run would need (XLA's CPU scheduler does not place the recomputed
layers where they save memory, so CPU figures say little about remat).

``--scope model`` compiles only the model's forward + backward (the loss gradient, no optimizer,
augmentation or collectives) for one abstract H100, which isolates what remat does to the
activations kept for the backward pass.

Usage::

    python benchmarks/remat.py --target h100x8             # dinat_base, 32 per GPU, 224, bf16
    python benchmarks/remat.py --scope model --config nat_mini --batch 64 --na-backend pallas
    python benchmarks/remat.py --scope model --devices 8 ...     # the same, batch-sharded
    python benchmarks/remat.py --target local --config nat_mini --batch 8 --out /tmp/remat.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from nat_jax.timing import environment, write_json
from nat_jax.train import configs, sharding, trainer


def measure(config_name: str, batch: int, image_size: int, dtype: str, remat: bool,
            na_backend: str, ordered_backward: bool = True, scan_layers: bool = False) -> dict:
    c = configs.get_config(config_name)
    c.update(global_batch_size=batch, image_size=image_size, compute_dtype=dtype, remat=remat,
             na_backend=na_backend, ordered_backward=ordered_backward, scan_layers=scan_layers)
    mesh = sharding.make_mesh(1)
    start = time.perf_counter()
    steps = trainer.build_steps(c, mesh, c.num_classes, total_steps=1000, warmup_steps=10)
    lowered = steps.step_fn.trace(steps.state, steps.batch, steps.rest).lower()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    return dict(config=config_name, model=c.model, batch=batch, image_size=image_size,
                dtype=dtype, na_backend=na_backend, remat=remat,
                ordered_backward=ordered_backward, scan_layers=scan_layers,
                trace_and_lower_seconds=round(lower_s, 1), compile_seconds=round(compile_s, 1),
                argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                peak_bytes=peak)


def measure_deviceless(target: str, config_name: str, batch: int, image_size: int, dtype: str,
                       remat: bool, na_backend: str, compiler_options: dict | None = None,
                       ordered_backward: bool = True, scan_layers: bool = False) -> dict:
    """:func:`measure` for a deviceless target; ``batch`` is per device."""
    from nat_jax.train import deviceless

    report = deviceless.compile_program(
        target, config_name, per_device_batch=batch, program="train",
        overrides={"remat": remat, "na_backend": na_backend, "compute_dtype": dtype,
                   "image_size": image_size, "ordered_backward": ordered_backward,
                   "scan_layers": scan_layers},
        compiler_options=compiler_options)
    return dict(config=config_name, model=report["model"], target=target,
                batch_per_device=batch, image_size=image_size, dtype=dtype,
                na_backend=na_backend, remat=remat, ordered_backward=ordered_backward,
                scan_layers=scan_layers, compile_seconds=report["compile_seconds"],
                argument_bytes=report["argument_bytes"], output_bytes=report["output_bytes"],
                temp_bytes=report["temp_bytes"], alias_bytes=report["alias_bytes"],
                peak_bytes=report["peak_bytes"], memory_per_device=report["memory_per_device"],
                fits=report["fits"])


def _model_grad_task(config_name: str, batch: int, image_size: int, dtype: str, remat: bool,
                     na_backend: str, devices: int = 1, ordered_backward: bool = True,
                     scan_layers: bool = False) -> dict:
    """Worker task (CUDA plugin active): compile the loss gradient of the model alone for one
    abstract H100, or for 8 with the batch (``batch`` per device) sharded over them."""
    import flax.nnx as nnx
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from nat_jax import configs as model_configs, zoo
    from nat_jax.kernels import gpu_gate

    from nat_jax.train import deviceless

    if devices == 1:
        mesh = Mesh(np.asarray([gpu_gate.abstract_gpu(gpu_gate.ARCHS["sm_90"])]), ("data",))
    else:
        mesh = Mesh(np.asarray(deviceless.abstract_devices(deviceless.TARGETS["h100x8"])),
                    ("data",))
    replicated = NamedSharding(mesh, P())
    c = configs.get_config(config_name)
    model = nnx.eval_shape(lambda: zoo.build_model(
        model_configs.get(c.model), rngs=nnx.Rngs(0), na_backend=na_backend, remat=remat,
        dtype=dtype, ordered_backward=ordered_backward, scan_layers=scan_layers))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    place = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)
    x = jax.ShapeDtypeStruct((batch * mesh.size, image_size, image_size, 3), jnp.float32,
                             sharding=NamedSharding(mesh, P("data")))

    def loss(params, rest, x):
        out = nnx.merge(graphdef, params, rest)(x).logits
        return jnp.sum(out.astype(jnp.float32) ** 2)

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True)).trace(
            place(params), place(rest), x).lower()
        compiled = lowered.compile({"xla_gpu_enable_triton_gemm": False})
    mem = compiled.memory_analysis()
    return dict(config=config_name, model=c.model,
                target=f"{mesh.size} x h100 (model fwd+bwd)", batch=batch,
                image_size=image_size, dtype=dtype, na_backend=na_backend, remat=remat,
                ordered_backward=ordered_backward, scan_layers=scan_layers,
                compile_seconds=round(time.perf_counter() - start, 1),
                argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                peak_bytes=mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="h100x8", help="'local' or a deviceless target")
    parser.add_argument("--config", default="dinat_base", help="training config name")
    parser.add_argument("--batch", type=int, default=32,
                        help="global batch (local) or batch per device (deviceless)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--na-backend", default="xla")
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="XLA compiler option for the deviceless compiles (repeatable)")
    parser.add_argument("--devices", type=int, choices=(1, 8), default=1,
                        help="--scope model: one H100, or 8 with the batch sharded")
    parser.add_argument("--scope", choices=("step", "model"), default="step",
                        help="the trainer's whole step, or the model's forward + backward only "
                             "(one abstract H100)")
    parser.add_argument("--no-ordered-backward", dest="ordered_backward", action="store_false",
                        help="build without BuildOptions.ordered_backward (the trainer's "
                             "default is on), to measure what it changes")
    parser.add_argument("--scan-layers", action="store_true",
                        help="build with BuildOptions.scan_layers (each stage's layers as one "
                             "scan), to measure its compile time and memory")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                        "remat_<platform>.json)")
    args = parser.parse_args(argv)
    from nat_jax.train import deviceless

    try:
        options = deviceless.parse_xla_options(args.xla_option)
    except ValueError as err:
        parser.error(str(err))
    rows = []
    for remat in (False, True):
        if args.scope == "model":
            row = deviceless.run_isolated("h100x8", _model_grad_task, args.config, args.batch,
                                          args.image_size, args.dtype, remat, args.na_backend,
                                          args.devices, args.ordered_backward,
                                          args.scan_layers)
        elif args.target == "local":
            row = measure(args.config, args.batch, args.image_size, args.dtype, remat,
                          args.na_backend, args.ordered_backward, args.scan_layers)
        else:
            row = measure_deviceless(args.target, args.config, args.batch, args.image_size,
                                     args.dtype, remat, args.na_backend, options,
                                     args.ordered_backward, args.scan_layers)
            row["compiler_options"] = options
        rows.append(row)
        print(f"{row['config']} on {row.get('target', args.target)}, batch {args.batch}, "
              f"remat={remat}: compile "
              f"{row['compile_seconds']} s, peak {row['peak_bytes'] / 2**30:.2f} GiB "
              f"(temporaries {row['temp_bytes'] / 2**30:.2f} GiB)", flush=True)
    before, after = rows
    summary = dict(peak_ratio=round(after["peak_bytes"] / before["peak_bytes"], 3),
                   temp_ratio=round(after["temp_bytes"] / before["temp_bytes"], 3),
                   compile_ratio=round(after["compile_seconds"] / before["compile_seconds"], 3))
    print(summary)
    where = jax.default_backend() if args.target == "local" else args.target
    where = f"{where}_model{'' if args.devices == 1 else '_sharded'}" if args.scope == "model" \
        else where
    where += "_scan" if args.scan_layers else ""
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"remat_{where}.json")
    write_json(out, {**environment(command=" ".join(
        [os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))),
        "rows": rows, "summary": summary})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
