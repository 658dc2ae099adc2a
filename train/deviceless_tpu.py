"""Whole programs compiled for TPU slices that are not here: the trainer's sharded train step and
the model's inference forward, on v5e-8 and v4-8, data parallel and FSDP, for the ``xla`` path
and the ``pallas_tpu`` kernels.

Each program is traced over a mesh of abstract TPU devices
(:func:`nat_jax.kernels.tpu_gate.abstract_devices`) with the trainer's own shardings and
compiled by libtpu (XLA's TPU compiler, Mosaic for the kernels) in a worker process with a
timeout per compile (:func:`nat_jax.kernels.tpu_gate.run_isolated`). A row of the report says,
per chip: the memory the program needs against the chip's HBM (fits or not), the FLOPs XLA
counts against the model's own count (:func:`nat_jax.flops.model_flops`, per device), the bytes
it moves, and the roofline time those imply at the chip's peak rate and bandwidth. Nothing runs.

The global batch is each config's recipe batch (1024 for the ImageNet configs), split over all
chips; FSDP shards parameters and optimizer state over all of them (``config.fsdp = -1``).

Command line (``make tpu-gate`` runs the minis)::

    python -m nat_jax.train.deviceless_tpu --config nat_mini,dinat_mini \\
        --json benchmarks/results/tpu_gate_models.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nat_jax.kernels import tpu_gate

PROGRAMS = ("train", "inference")
BACKENDS = ("xla", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class Job:
    """One program to compile."""

    config: str  # a training config name (nat_jax.train.configs)
    topology: str  # a key of tpu_gate.TOPOLOGIES
    program: str  # "train" (the trainer's step) or "inference" (the model's forward)
    fsdp: bool  # parameters and optimizer state sharded over all chips
    backend: str  # model_overrides.na_backend
    global_batch: int | None = None  # None: the config's recipe batch

    @property
    def name(self) -> str:
        return (f"{self.config}-{self.program}-{self.topology}-"
                f"{'fsdp' if self.fsdp else 'dp'}-{self.backend}")


def _config(job: Job):
    from nat_jax.train import configs

    config = configs.get_config(job.config)
    with config.unlocked():
        config.fsdp = -1 if job.fsdp else 1
        config.model_overrides.na_backend = job.backend
        if job.global_batch is not None:
            config.global_batch_size = job.global_batch
    return config


def train_program(config, mesh):
    """The trainer's train step (its optimizer, schedule, shardings and donation) and abstract
    arguments carrying their shardings; allocates nothing."""
    import jax
    import jax.numpy as jnp

    from nat_jax.train import sharding, trainer

    schedule = trainer.make_schedule(config, total_steps=1000, warmup_steps=10,
                                     cooldown_steps=0)
    tx = trainer.make_optimizer(config, schedule)
    model_cfg = trainer.model_config(config, config.num_classes)
    graphdef, params, rest = trainer.abstract_model(model_cfg, config.seed)
    state = trainer.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        opt_state=jax.eval_shape(tx.init, params),
        ema_params=params if config.ema_decay > 0 else None,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_sh = sharding.state_shardings(state, mesh, config.fsdp_min_size)
    rest_sh = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
    batch_sh = sharding.batch_sharding(mesh)
    step = functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                             cfg=trainer.StepConfig.from_config(config, config.num_classes))
    b, s = config.global_batch_size, config.image_size
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
             "erase": jax.ShapeDtypeStruct((b, 4), jnp.int32, sharding=batch_sh)}
    args = (_with_shardings(state, state_sh), batch, _with_shardings(rest, rest_sh))
    jit_kwargs = dict(in_shardings=(state_sh, batch_sh, rest_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    return step, args, jit_kwargs, model_cfg


def inference_program(config, mesh):
    """The model's forward (logits, eval mode) on preprocessed float32 images, parameters
    sharded as the trainer shards them."""
    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp

    from nat_jax.train import sharding, trainer

    model_cfg = trainer.model_config(config, config.num_classes)
    graphdef, params, rest = trainer.abstract_model(model_cfg, config.seed)
    params_sh = sharding.state_shardings(params, mesh, config.fsdp_min_size)
    rest_sh = jax.tree.map(lambda _: sharding.replicated(mesh), rest)
    batch_sh = sharding.batch_sharding(mesh)

    def forward(params, rest, pixels):
        return nnx.merge(graphdef, params, rest)(pixels, deterministic=True).logits

    b, s = config.global_batch_size, config.image_size
    pixels = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=batch_sh)
    args = (_with_shardings(params, params_sh), _with_shardings(rest, rest_sh), pixels)
    jit_kwargs = dict(in_shardings=(params_sh, rest_sh, batch_sh), out_shardings=batch_sh)
    return forward, args, jit_kwargs, model_cfg


def _with_shardings(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)


def compile_job(job: Job) -> dict[str, Any]:
    """Worker task: compile one job; the report row (see the module docstring)."""
    import jax

    from nat_jax.flops import model_flops
    from nat_jax.train import sharding

    config = _config(job)
    devices = tpu_gate.abstract_devices(job.topology)
    mesh = sharding.make_mesh(config.fsdp, devices=devices)
    build = train_program if job.program == "train" else inference_program
    fn, args, jit_kwargs, model_cfg = build(config, mesh)
    row = {"job": job.name, **dataclasses.asdict(job), "model": config.model,
           "global_batch": config.global_batch_size, "devices": len(devices),
           "per_device_batch": config.global_batch_size // len(devices),
           "compute_dtype": config.compute_dtype,
           "params": sum(x.size for x in jax.tree.leaves(
               args[0].params if job.program == "train" else args[0]))}
    row.update(tpu_gate.compile_report(fn, args, mesh, jit_kwargs=jit_kwargs))
    counted = model_flops(model_cfg, config.global_batch_size)
    row["model_flops"] = (counted["train_step"] if job.program == "train"
                          else counted["forward"]) / len(devices)
    row["flops_vs_model"] = row["flops"] / row["model_flops"]
    return row


def jobs(configs: Sequence[str], topologies: Sequence[str] = ("v5e-8", "v4-8"),
         programs: Sequence[str] = PROGRAMS, backends: Sequence[str] = BACKENDS,
         global_batch: int | None = None, shardings: Sequence[bool] = (False, True)
         ) -> list[Job]:
    """Every combination; ``shardings``: data parallel (False) and/or FSDP (True), FSDP only
    for the train step (inference parameters are small)."""
    out = []
    for config in configs:
        for topology in topologies:
            for program in programs:
                for fsdp in (shardings if program == "train" else (False,)):
                    for backend in backends:
                        out.append(Job(config, topology, program, fsdp, backend, global_batch))
    return out


def run(selected: Sequence[Job], timeout: float = 1800.0, progress=None) -> list[dict]:
    """Compile every job in a worker process (a timeout per compile); failures are rows with
    ``error`` set."""
    results = tpu_gate.run_isolated([(compile_job, (j,)) for j in selected], timeout, progress)
    rows = []
    for job, res in zip(selected, results):
        rows.append(res["value"] if res["ok"] else
                    {"job": job.name, **dataclasses.asdict(job), "error": res["error"]})
    return rows


def markdown(rows: Sequence[dict]) -> str:
    """The README table: one line per compiled program."""
    gib, gb = 2 ** 30, 1e9
    lines = ["| model | program | slice | sharding | NA backend | batch / chip | memory / chip "
             "(GiB, HBM) | TFLOPs / chip (XLA / model) | GB / chip | roofline ms (bound) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['config']} | {r['program']} | {r['topology']} | "
                f"{'FSDP' if r['fsdp'] else 'data parallel'} | {r['backend']} |")
        if r.get("error"):
            lines.append(f"{head} - | did not compile: {r['error'].splitlines()[0][:80]} "
                         "| | | |")
            continue
        fits = "fits" if r["fits"] else "**does not fit**"
        lines.append(
            f"{head} {r['per_device_batch']} | {r['peak_bytes'] / gib:.1f} of "
            f"{r['hbm_bytes'] / gib:.0f} ({fits}) | {r['flops'] / 1e12:.2f} / "
            f"{r['model_flops'] / 1e12:.2f} | {r['bytes_accessed'] / gb:.1f} | "
            f"{r['roofline_seconds'] * 1e3:.1f} ({r['bound']}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nat_jax.train.deviceless_tpu",
        description="Compile the trainer's train step and the inference forward for TPU slices "
                    "with libtpu on this machine; report per-chip memory, FLOPs, bytes and "
                    "roofline time for the xla path and the pallas_tpu kernels.")
    parser.add_argument("--config", default="nat_mini,dinat_mini",
                        help="comma-separated training configs")
    parser.add_argument("--topology", default="v5e-8,v4-8")
    parser.add_argument("--program", default=",".join(PROGRAMS))
    parser.add_argument("--backend", default=",".join(BACKENDS))
    parser.add_argument("--global-batch", type=int, default=None,
                        help="override the recipe batch")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--no-fsdp", action="store_true", help="data parallel train steps only")
    only.add_argument("--only-fsdp", action="store_true", help="FSDP train steps only")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --json (a job compiled again replaces "
                             "its row)")
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    shardings = (False,) if args.no_fsdp else (True,) if args.only_fsdp else (False, True)
    selected = jobs(split(args.config), split(args.topology), split(args.program),
                    split(args.backend), args.global_batch, shardings)
    start = time.perf_counter()
    rows = run(selected, args.timeout,
               progress=lambda done, total: print(f"{done}/{total} compiled", flush=True))
    print(markdown(rows))
    if args.json:
        from nat_jax.timing import write_json

        seconds = round(time.perf_counter() - start, 1)
        if args.append and args.json.exists():
            old = json.loads(args.json.read_text())
            new_jobs = {r["job"] for r in rows}
            rows = [r for r in old["rows"] if r["job"] not in new_jobs] + rows
            seconds += old.get("seconds", 0)
        write_json(args.json, {"environment": tpu_gate.environment(), "seconds": seconds,
                               "rows": rows})
    return 1 if any(r.get("error") or not r["fits"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
