"""Whole programs compiled for accelerators that are not here (deviceless ahead-of-time).

XLA can compile a program for devices it only knows by description:
``jax.experimental.topologies.get_topology_desc`` returns abstract devices of a target (for
CUDA from a ``GpuTargetConfigProto`` in text form: :meth:`gpu_gate.Arch.target_config`), a mesh
of them takes the trainer's own shardings, and ``jax.jit(step).trace(*abstract_args).lower().compile()``
runs XLA's whole compiler for that target: SPMD partitioning, fusion, Triton and cuBLAS GEMM
selection, buffer assignment. ``compiled.memory_analysis()`` then says how much memory each
device needs, and the optimized HLO shows where the collectives are. Nothing runs.

What this checks for a training setup before anyone rents the hardware: the program compiles,
fits in each device's memory, keeps the Pallas kernels inside manually sharded regions (no
all-gather of activations over the batch), and which kernels it launches.

TPU slices (``v5e-8``, ``v4-8``, :data:`nat_jax.kernels.tpu_gate.TOPOLOGIES`) compile the same
way with libtpu: XLA's TPU compiler and Mosaic for the ``pallas_tpu`` kernels. For them the
report adds XLA's FLOPs and bytes per step (the kernels' cost estimates included) against the
model's own FLOP count (:func:`nat_jax.flops.model_flops`) and the roofline time they imply at
the chip's peak rate and bandwidth.

The compile runs in a fresh worker process (the plugin must be registered before jax starts a
backend); :func:`compile_program` (the train step or the inference forward) is the entry point.
Command line::

    python -m nat_jax.train.deviceless --target h100x8 --config nat_tiny --per-device-batch 128
    python -m nat_jax.train.deviceless --target v5e-8 --config nat_mini --per-device-batch 128 \
        --backend pallas_tpu --program inference
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from nat_jax.kernels import gpu_gate, tpu_gate
from nat_jax.kernels.gpu_gate import ARCHS, TRITON_TARGET


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator slice to compile for."""

    name: str
    platform: str  # "cuda" or "tpu"
    devices: int
    memory_per_device: int  # bytes the program may use on one device
    topology: tuple[tuple[str, Any], ...]  # keyword arguments of get_topology_desc
    arch: str = ""  # GPUs: the gpu_gate.ARCHS entry, for the kernels' resource check
    # XLA options this target always compiles with (on top of the program's own).
    compiler_options: tuple[tuple[str, Any], ...] = ()


def _tpu_target(name: str) -> Target:
    topo = tpu_gate.TOPOLOGIES[name]
    return Target(name, "tpu", topo.devices, memory_per_device=topo.hbm_bytes,
                  topology=tuple(topo.topology_kwargs().items()))


# Without a GPU, XLA cannot autotune, and its GPU compiler (jax 0.10.2) then fails on some GEMM
# fusions of the train step: "Couldn't find output tile sizes that satisfy hlo: ... dot(...)"
# (nat_mini, xla NA backend, 32 images per H100: a bf16[6272,256] dot of the backward). It is the
# Triton GEMM path without a tuned configuration: xla_gpu_autotune_level=0 fails the same way,
# xla_gpu_enable_triton_gemm=false (cuBLAS) compiles. A GPU session autotunes and skips configs
# that do not compile, so it should not meet it; if it does (autotuning off), set the training
# config's xla_options.xla_gpu_enable_triton_gemm=False. The deviceless compile retries with it
# and names it in the report's "workaround".
UNTILED_GEMM = "Couldn't find output tile sizes"
TRITON_GEMM_OFF = {"xla_gpu_enable_triton_gemm": False}

TARGETS: dict[str, Target] = {
    "h100x8": Target(
        "h100x8", "cuda", 8, memory_per_device=ARCHS["sm_90"].memory,
        topology=(("platform", "cuda"), ("topology", "1x1x8"),
                  ("target_config", ARCHS["sm_90"].target_config())), arch="sm_90"),
    **{name: _tpu_target(name) for name in tpu_gate.TOPOLOGIES},
}


def activate(target: Target) -> None:
    """Register the plugin that knows ``target`` in this (fresh) process."""
    if target.platform == "cuda":
        from nat_jax.kernels import gpu_gate

        gpu_gate.activate_cuda_plugin()
    elif target.platform == "tpu":
        tpu_gate.activate_tpu_plugin()
    else:
        raise ValueError(f"target {target.name!r}: platform {target.platform!r} has no plugin "
                         "set up here")


def abstract_devices(target: Target) -> list:
    """The target's devices, as XLA's compiler sees them (no hardware behind them)."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(**dict(target.topology)).devices
    if len(devices) != target.devices:
        raise RuntimeError(f"target {target.name!r}: got {len(devices)} devices, expected "
                           f"{target.devices}")
    return list(devices)


_RESULT = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (all-gather(?:-start|-done)?)\(")
_PERMUTE = re.compile(r" collective-permute(?:-start)?\(")
_WHILE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? while\(", re.MULTILINE)
_CONDITIONAL = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? conditional\(", re.MULTILINE)
_DIMS = re.compile(r"\w+\[([\d,]*)\]")


def hlo_summary(hlo: str, global_batch: int) -> dict[str, Any]:
    """Facts about an optimized (partitioned) HLO module: Triton and Mosaic kernel launches,
    collective-permutes (halo exchanges), all-gathers, and the all-gathers whose result has the
    global batch as a dimension (an activation gathered over the batch: what running a kernel
    under ``shard_map`` avoids). Asynchronous collectives count once (at their start); gathered
    shapes are read at their done. ``while_loops`` and ``conditionals`` say how far XLA's cost
    analysis is from the work a step does: it counts a loop's body once and adds up both
    branches of a conditional (the NA backends' non-finite containment is one)."""
    gathers, batch_gathers = 0, []
    for line in hlo.splitlines():
        match = _RESULT.match(line)
        if match is None:
            continue
        result, op = match.groups()
        gathers += op != "all-gather-done"
        if op == "all-gather-start":
            continue  # its result type holds the operands too; the done holds the gathered
        dims = [[int(d) for d in m.group(1).split(",") if d] for m in _DIMS.finditer(result)]
        if any(global_batch in shape for shape in dims):
            batch_gathers.append(line.strip()[:200])
    return {"triton_kernels": hlo.count(f'custom_call_target="{TRITON_TARGET}"'),
            "mosaic_kernels": hlo.count(f'custom_call_target="{tpu_gate.MOSAIC_TARGET}"'),
            "collective_permutes": len(_PERMUTE.findall(hlo)),
            "while_loops": len(_WHILE.findall(hlo)), "conditionals": len(_CONDITIONAL.findall(hlo)),
            "all_gathers": gathers, "batch_all_gathers": batch_gathers}


PROGRAMS = ("train", "inference")


def _compile_program(target_name: str, config_name: str, overrides: dict[str, Any],
                     per_device_batch: int, program: str,
                     compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Worker task: build the trainer's steps for the target's mesh and compile one of them:
    the train step, or the eval step (the inference forward) on a global batch of the same
    size."""
    import jax
    import jax.numpy as jnp

    from nat_jax.flops import model_flops
    from nat_jax.train import configs, sharding, trainer

    target = TARGETS[target_name]
    config = configs.apply_overrides(configs.get_config(config_name),
                                     {k: str(v) for k, v in overrides.items()})
    config.global_batch_size = per_device_batch * target.devices
    devices = abstract_devices(target)
    mesh = sharding.make_mesh(config.fsdp, devices=devices, context=config.get("context", 1))
    steps = trainer.build_steps(config, mesh, config.num_classes, total_steps=1000,
                                warmup_steps=10)
    if program == "train":
        fn, args = steps.step_fn, (steps.state, steps.batch, steps.rest)
    elif program == "inference":
        image, label = steps.batch["image"], steps.batch["label"]
        batch = {"image": image, "label": label,
                 "mask": jax.ShapeDtypeStruct(label.shape, jnp.bool_, sharding=label.sharding)}
        fn, args = steps.eval_fn, (steps.state.params, batch, steps.rest)
    else:
        raise ValueError(f"{program=} is not one of {PROGRAMS}")
    start = time.perf_counter()
    # The mesh is the context while lowering too: Pallas's TPU lowering asks it for the chip.
    with jax.set_mesh(mesh):
        lowered = fn.trace(*args).lower()
    options = {**dict(target.compiler_options), **(compiler_options or {})}
    kernels: dict[str, Any] = {}
    workaround = None
    if target.platform == "cuda":
        # XLA's whole GPU compile, with every Pallas kernel's registers and spills from ptxas.
        compiled, rows, launches = gpu_gate.inspect_gpu_compile(lowered, ARCHS[target.arch],
                                                                 options)
        if compiled is None and any(UNTILED_GEMM in (r["error"] or "") for r in rows):
            # See UNTILED_GEMM: cuBLAS for the GEMMs, and the report says so.
            options = {**options, **TRITON_GEMM_OFF}
            workaround = ", ".join(f"{k}={v}" for k, v in TRITON_GEMM_OFF.items())
            compiled, rows, launches = gpu_gate.inspect_gpu_compile(
                lowered, ARCHS[target.arch], options)
        if compiled is None:
            raise RuntimeError(rows[0]["error"] if rows else "XLA refused the program")
        ok = [r for r in rows if not r["error"]]
        kernels = {"kernel_launches": launches, "kernels_compiled": len(ok),
                   "kernel_problems": sorted({f"{r['kernel']}: {'; '.join(gpu_gate.problems(r))}"
                                              for r in rows if gpu_gate.problems(r)}),
                   "max_registers": max((r["registers"] for r in ok), default=None),
                   "max_smem_bytes": max((r["smem_bytes"] for r in ok), default=None),
                   "min_occupancy": min((r["occupancy"] for r in ok), default=None)}
    else:
        with jax.set_mesh(mesh):
            compiled = lowered.compile(options or None)
    seconds = time.perf_counter() - start
    chip = tpu_gate.chip_info(mesh) if target.platform == "tpu" else None
    n_params = sum(int(x.size) for x in jax.tree.leaves(steps.state.params))
    counted = model_flops(steps.model_cfg, config.global_batch_size, config.image_size)
    flops = counted["train_step" if program == "train" else "forward"] / len(devices)
    report = {
        "target": target.name, "config": config_name, "model": config.model,
        "program": program, "na_backend": config.na_backend,
        "compute_dtype": trainer.compute_dtype(config, target.platform),
        "global_batch": config.global_batch_size,
        "per_device_batch": per_device_batch, "fsdp": config.fsdp, "params": n_params,
        "compile_seconds": round(seconds, 1), "model_flops": flops,
        **tpu_gate.executable_report(compiled, target.memory_per_device, chip),
        **hlo_summary(compiled.as_text(), config.global_batch_size), **kernels,
        "workaround": workaround,
    }
    report["flops_vs_model"] = report["flops"] / flops
    return report


def _worker(conn, target_name: str, fn: Callable, args: tuple) -> None:
    try:
        activate(TARGETS[target_name])
        conn.put((0, "ok", fn(*args)))
    except BaseException as err:  # report everything to the parent, one line first
        conn.put((0, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def run_isolated(target_name: str, fn: Callable, *args: Any, timeout: float = 1800.0) -> Any:
    """``fn(*args)`` in a fresh process with the target's plugin registered, killed after
    ``timeout`` seconds (a compile can hang rather than fail). Raises ``RuntimeError`` with the
    worker's error (or at once when the worker dies without one, e.g. killed for host memory),
    or ``TimeoutError``."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(results, target_name, fn, args), daemon=True)
    proc.start()
    name = getattr(fn, "__name__", fn)
    try:
        index, status, value = tpu_gate.next_result(results, proc, timeout)
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status == "timeout":
        raise TimeoutError(f"{name} on {target_name} did not finish within {timeout:.0f} s")
    if status == "error" and index is None:  # died without reporting: say so now
        raise RuntimeError(f"{name} on {target_name}: the {value} before reporting")
    if status == "error":
        raise RuntimeError(value)
    return value


def compile_program(target: str, config: str, *, per_device_batch: int,
                    program: str = "train", overrides: dict[str, Any] | None = None,
                    compiler_options: dict[str, Any] | None = None,
                    timeout: float = 1800.0) -> dict[str, Any]:
    """Compile the trainer's own sharded train step (``program="train"``) or its eval step, the
    inference forward (``"inference"``), of training config ``config`` (a name of
    :mod:`nat_jax.train.configs`) for ``target`` (a key of :data:`TARGETS`), with
    ``per_device_batch`` images per device and config ``overrides`` (``{"fsdp": 8,
    "na_backend": "pallas"}``). ``compiler_options`` are XLA options (``{"xla_gpu_autotune_level":
    0}``) on top of the target's own.

    Returns a report: per-device memory (argument, output, temp, peak) against the device's,
    XLA's FLOPs and bytes against the model's own FLOP count, on TPU the roofline time, compile
    seconds, and :func:`hlo_summary` of the partitioned program.
    """
    if target not in TARGETS:
        raise ValueError(f"{target=} is not one of {sorted(TARGETS)}")
    return run_isolated(target, _compile_program, target, config, dict(overrides or {}),
                        per_device_batch, program, dict(compiler_options or {}),
                        timeout=timeout)


def compile_train_step(target: str, config: str, *, per_device_batch: int,
                       overrides: dict[str, Any] | None = None,
                       timeout: float = 1800.0) -> dict[str, Any]:
    """:func:`compile_program` of the train step."""
    return compile_program(target, config, per_device_batch=per_device_batch, program="train",
                           overrides=overrides, timeout=timeout)


def parse_xla_options(items: list[str]) -> dict[str, Any]:
    """``--xla-option NAME=VALUE`` arguments as compiler options, each value typed as a
    training config's ``xla_options.NAME=VALUE`` override is. ValueError on a malformed one."""
    from nat_jax.train import configs

    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--xla-option {item!r}: expected NAME=VALUE")
        options[name] = configs.parse_value(value)
    return options


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nat_jax.train.deviceless",
        description="Compile the trainer's sharded train step for accelerators that are not "
                    "here and report per-device memory and collectives.")
    parser.add_argument("--target", default="h100x8", choices=sorted(TARGETS))
    parser.add_argument("--config", default="nat_tiny", help="training config name")
    parser.add_argument("--per-device-batch", type=int, default=128)
    parser.add_argument("--backend", default="pallas", help="config.na_backend")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--program", default="train", choices=PROGRAMS)
    parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA compiler option on top of the target's (repeatable), e.g. "
                             "xla_gpu_enable_triton_gemm=false")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
    args = parser.parse_args(argv)
    try:
        options = parse_xla_options(args.xla_option)
    except ValueError as err:
        parser.error(str(err))
    report = compile_program(args.target, args.config, per_device_batch=args.per_device_batch,
                             program=args.program,
                             overrides={"fsdp": args.fsdp, "na_backend": args.backend},
                             compiler_options=options, timeout=args.timeout)
    gib = 2 ** 30
    line = (f"{report['config']} {report['program']} on {report['target']}: batch "
            f"{report['global_batch']} ({report['per_device_batch']}/device), "
            f"{report['na_backend']} NA, {report['compute_dtype']}: compiled in "
            f"{report['compile_seconds']} s; peak {report['peak_bytes'] / gib:.2f} GiB of "
            f"{report['memory_per_device'] / gib:.1f} GiB per device "
            f"({'fits' if report['fits'] else 'DOES NOT FIT'}); "
            f"{report['triton_kernels'] + report['mosaic_kernels']} kernels, "
            f"{report['all_gathers']} all-gathers ({len(report['batch_all_gathers'])} over the "
            "batch)")
    if "roofline_seconds" in report:
        line += (f"; {report['flops'] / 1e12:.2f} TFLOPs (the model's count: "
                 f"{report['model_flops'] / 1e12:.2f}) and {report['bytes_accessed'] / 1e9:.1f} "
                 f"GB per device: roofline {report['roofline_seconds'] * 1e3:.1f} ms")
    print(line)
    if report.get("workaround"):
        print(f"compiled with {report['workaround']} (XLA could not tile a Triton GEMM without "
              "autotuning; see nat_jax.train.deviceless.UNTILED_GEMM)")
    for problem in report.get("kernel_problems", []):
        print(f"kernel problem: {problem}")
    return 0 if (report["fits"] and not report["batch_all_gathers"]
                 and not report.get("kernel_problems")) else 1


if __name__ == "__main__":
    sys.exit(main())
