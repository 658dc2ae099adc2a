"""TPU compile gate: NA programs compiled by XLA's TPU compiler, and the Pallas TPU kernels by
Mosaic, for TPU topologies that are not here.

libtpu holds XLA's TPU compiler and Mosaic. It installs on a CPU-only machine (``pip install
--no-deps --target <venv>/tpu-plugin "libtpu==0.0.42.*"``, the version ``jax[tpu]`` pins; ``make
install`` does this) and, kept off ``sys.path`` except in the gate's own worker processes, it
never makes an ordinary jax start-up probe for TPUs. In a worker (:func:`activate_tpu_plugin`,
``JAX_PLATFORMS=cpu``):

1. ``jax.experimental.topologies.get_topology_desc`` describes a slice (``v5e:2x4``, ``v4:2x2x1``
   with megacore chips) as abstract devices (:data:`TOPOLOGIES`);
2. a function traced with ``jax.ShapeDtypeStruct(..., sharding=NamedSharding(mesh, spec))``
   over a mesh of them compiles with ``jax.jit(f).trace(...).lower().compile()``: SPMD
   partitioning, fusion, layout and buffer assignment for that chip, and Mosaic for every Pallas
   TPU kernel (it rejects bad block shapes, unsupported relayouts and VMEM overflow);
3. ``memory_analysis()`` gives the bytes each chip needs and ``cost_analysis()`` the FLOPs and
   bytes it moves per step (a Pallas kernel contributes its ``pl.CostEstimate``), from which
   :func:`roofline` derives the time at the chip's peak rate and bandwidth (JAX's own chip
   table, ``pltpu.get_tpu_info``).

Tracing happens with the mesh as the context mesh (``jax.set_mesh``): Pallas's TPU lowering asks
the context mesh which chip it compiles for (otherwise it asks the default device, the CPU).

A compile can hang instead of failing (a kernel far too large), so every compile runs in a worker
process with a timeout (:func:`run_isolated`). libtpu prints errors about
``TPU_ACCELERATOR_TYPE`` and ``TPU_WORKER_HOSTNAMES`` at start-up: harmless here.

What it cannot tell: numerics of the compiled code and speed. Those need a TPU.

Command line (the kernel sweep, every configuration ``auto`` may send to ``pallas_tpu``)::

    python -m nat_jax.kernels.tpu_gate --json benchmarks/results/tpu_kernel_gate.json
    python -m nat_jax.kernels.tpu_gate --sample 0.1      # a deterministic tenth of the sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nat_jax.kernels import gpu_gate
from nat_jax.kernels.gpu_gate import Case, sample

PLUGIN_DIR_ENV = "NAT_JAX_TPU_PLUGIN_DIR"
MOSAIC_TARGET = "tpu_custom_call"


# ------------------------------------------------------------------------------ the plugin


def plugin_dir() -> Path:
    """Where libtpu is installed for the gate: ``$NAT_JAX_TPU_PLUGIN_DIR``, else
    ``<venv>/tpu-plugin`` (what ``make install`` creates)."""
    return Path(os.environ.get(PLUGIN_DIR_ENV, Path(sys.prefix) / "tpu-plugin"))


def activate_tpu_plugin(path: Path | None = None) -> None:
    """Make libtpu (XLA's TPU compiler and Mosaic) importable in this process, with jax kept on
    the CPU platform. Call it in a fresh process before jax initializes a backend (the workers
    of :func:`run_isolated` do). Raises ``RuntimeError`` naming what to install."""
    path = path or plugin_dir()
    if not (path / "libtpu").is_dir():
        import jax

        raise RuntimeError(
            f"libtpu not found in {path}: `pip install --no-deps --target {path} "
            f"\"libtpu==0.0.42.*\"` (the version jax[tpu]=={jax.__version__} pins; make install "
            f"does this) or set ${PLUGIN_DIR_ENV}")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # libtpu takes /tmp/libtpu_lockfile so that one process owns a TPU; with no TPU to own,
    # concurrent gate workers (and other users' compiles on a shared machine) must not block.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


# ---------------------------------------------------------------------------- topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice, as ``get_topology_desc`` takes it."""

    name: str  # "v5e-8"
    topology_name: str  # "v5e:2x4"
    chip_config_name: str  # "default", or "megacore" (v4, v5p: two TensorCores, one device)
    chips_per_host_bounds: tuple[int, int, int]
    devices: int
    hbm_bytes: int  # per device (JAX's TPU table: 17.2e9 per TensorCore)

    def topology_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``get_topology_desc``."""
        return dict(platform="tpu", topology_name=self.topology_name,
                    chip_config_name=self.chip_config_name,
                    chips_per_host_bounds=self.chips_per_host_bounds, num_slices=1,
                    wrap=(False, False, False))

    def describe(self):
        from jax.experimental import topologies

        return topologies.get_topology_desc(**self.topology_kwargs())


TOPOLOGIES: dict[str, Topology] = {
    "v5e-8": Topology("v5e-8", "v5e:2x4", "default", (2, 4, 1), 8, hbm_bytes=17_200_000_000),
    "v4-8": Topology("v4-8", "v4:2x2x1", "megacore", (2, 2, 1), 4, hbm_bytes=34_400_000_000),
}


def abstract_devices(name: str) -> list:
    """The devices of topology ``name`` (no hardware behind them)."""
    topo = TOPOLOGIES[name]
    devices = list(topo.describe().devices)
    if len(devices) != topo.devices:
        raise RuntimeError(f"topology {name!r}: got {len(devices)} devices, expected "
                           f"{topo.devices}")
    return devices


def chip_info(mesh) -> dict[str, Any]:
    """Per-device (chip) HBM, peak bf16 FLOP/s and HBM bandwidth of the mesh's devices, from
    JAX's TPU table (its numbers are per TensorCore; a megacore device has two)."""
    import jax
    from jax.experimental.pallas import tpu as pltpu

    with jax.set_mesh(mesh):
        info = pltpu.get_tpu_info()
    cores = info.num_cores
    return {"device_kind": mesh.devices.flat[0].device_kind,
            "chip": info.chip_version.value, "tensor_cores": cores,
            "hbm_bytes": info.hbm_capacity_bytes * cores,
            "peak_flops": info.bf16_ops_per_second * cores,
            "hbm_bytes_per_second": info.mem_bw_bytes_per_second * cores}


def roofline(flops: float, bytes_accessed: float, chip: dict[str, Any]) -> dict[str, float]:
    """Time one device needs at its peak rate for ``flops`` and at its HBM bandwidth for
    ``bytes_accessed``; the larger bounds the step (``bound``: which one)."""
    compute = flops / chip["peak_flops"]
    memory = bytes_accessed / chip["hbm_bytes_per_second"]
    return {"compute_seconds": compute, "memory_seconds": memory,
            "roofline_seconds": max(compute, memory),
            "bound": "memory" if memory >= compute else "compute"}


def executable_report(compiled, memory_per_device: int, chip: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Facts about one compiled (partitioned) program, per device: memory (argument, output,
    temp, alias, peak; ``fits`` in ``memory_per_device``), XLA's cost (FLOPs, transcendentals,
    bytes accessed; a Pallas kernel contributes its ``pl.CostEstimate``), the Mosaic kernels
    it launches and, given the ``chip`` (:func:`chip_info`), the roofline time."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()  # None where the compiler has no cost model for it
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    report = {"argument_bytes": mem.argument_size_in_bytes,
              "output_bytes": mem.output_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
              "alias_bytes": mem.alias_size_in_bytes, "peak_bytes": peak,
              "memory_per_device": memory_per_device, "fits": peak <= memory_per_device,
              "flops": flops, "transcendentals": float(cost.get("transcendentals", 0.0)),
              "bytes_accessed": nbytes,
              "mosaic_kernels": compiled.as_text().count(
                  f'custom_call_target="{MOSAIC_TARGET}"')}
    if chip is not None:
        report.update(roofline(flops, nbytes, chip), device_kind=chip["device_kind"])
    return report


def compile_report(fn: Callable, args: Sequence[Any], mesh, *, jit_kwargs: dict | None = None
                   ) -> dict[str, Any]:
    """Compile ``jax.jit(fn, **jit_kwargs)`` for ``args`` (``ShapeDtypeStruct`` with shardings
    on ``mesh``) with ``mesh`` as the context mesh; :func:`executable_report` against the
    chip's HBM, plus the compile time."""
    import jax

    chip = chip_info(mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn, **(jit_kwargs or {})).trace(*args).lower().compile()
    return {"compile_seconds": round(time.perf_counter() - start, 2),
            **executable_report(compiled, chip["hbm_bytes"], chip)}


# ---------------------------------------------------------------------- isolated workers


def _worker(tasks, results, plugin: str) -> None:
    try:
        activate_tpu_plugin(Path(plugin))
    except BaseException as err:  # every task reports it
        for index, _, _ in tasks:
            results.put((index, "error", f"{type(err).__name__}: {err}"))
        return
    for index, fn, args in tasks:
        try:
            results.put((index, "ok", fn(*args)))
        except BaseException as err:  # the compiler's own message is the report
            results.put((index, "error",
                         f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"))


def next_result(results, proc, timeout: float):
    """A worker process's next ``(index, status, value)`` from its ``results`` queue, or
    ``(None, "error", why)`` as soon as it dies without answering, or ``(None, "timeout",
    why)`` when it runs past ``timeout`` seconds (also used by ``train.deviceless``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                try:  # it may have answered just before exiting
                    return results.get(timeout=1.0)
                except queue.Empty:
                    # A whole-model compile can need more host memory than there is (a v4-8
                    # DiNAT-T step at 256 images per chip took over 20 GB here).
                    why = ", killed: out of host memory?" if proc.exitcode == -9 else ""
                    return (None, "error",
                            f"worker process died (exit code {proc.exitcode}{why})")
            if time.monotonic() > deadline:
                return None, "timeout", f"timed out after {timeout:.0f} s"


def run_isolated(tasks: Sequence[tuple[Callable, tuple]], timeout: float = 600.0,
                 progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run ``fn(*args)`` for each ``(fn, args)`` in ``tasks``, in order, in a fresh worker
    process with libtpu active. Each task gets ``timeout`` seconds (a compile can hang rather
    than fail): one that overruns, or whose worker dies, is reported as such, and a new worker
    takes the remaining tasks. Returns ``{"ok": True, "value": ...}`` or ``{"ok": False,
    "error": ...}`` per task. ``fn`` must be importable by name (a module-level function), and
    a script calling this needs an ``if __name__ == "__main__":`` guard (workers are spawned)."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(enumerate(tasks))
    out: list[dict[str, Any] | None] = [None] * len(tasks)
    while pending:
        results = ctx.Queue()
        proc = ctx.Process(target=_worker, args=([(i, f, a) for i, (f, a) in pending], results,
                                                  str(plugin_dir())), daemon=True)
        proc.start()
        try:
            while pending:
                index, status, value = next_result(results, proc, timeout)
                lost = index is None
                index = pending[0][0] if lost else index
                out[index] = ({"ok": True, "value": value} if status == "ok"
                              else {"ok": False, "error": value})
                pending = [t for t in pending if t[0] != index]
                if progress:
                    progress(sum(r is not None for r in out), len(tasks))
                if lost:
                    break  # a new worker takes the rest
        finally:
            proc.kill()
            proc.join()
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------- the kernel sweep


DTYPES = ("float32", "bfloat16")
XLA_HEAD_DIMS = (32,)  # NAT/DiNAT's: where the sweep also compiles the xla path to compare


def kernel_cases() -> list[Case]:
    """Every kernel specialization ``backend="auto"`` may send to ``pallas_tpu``: the GPU gate's
    configurations (ranks 1-3, each feature family, head dims 16 to 256, value head dims unlike
    the query's) in the dtypes the TPU kernels take."""
    make_case = gpu_gate._case  # noqa: SLF001 (one sweep for both gates)
    cases = []
    for features in gpu_gate._FEATURES.values():  # noqa: SLF001
        for feature, shape, kw, rpb in features:
            for dtype in DTYPES:
                for d in gpu_gate.HEAD_DIMS:
                    cases.append(make_case(feature, shape, kw, rpb, dtype, d, d))
    for dtype in DTYPES:
        for dq, dv in gpu_gate.MIXED_HEAD_DIMS:
            cases.append(make_case("plain", (28, 28), dict(kernel_size=7), True, dtype, dq, dv))
    return cases


def case_program(case: Case, backend: str):
    """``(fn, args)``: forward (out, lse) and the whole VJP of ``case`` on ``backend``
    (``"pallas_tpu"`` compiled by Mosaic, or ``"xla"``), abstract arguments."""
    import jax
    import jax.numpy as jnp

    from nat_jax.kernels import pallas_tpu, xla
    from nat_jax.kernels.params import NAParams

    p = NAParams(case.kernel_size, case.stride, case.dilation, case.is_causal,
                 case.head_dim ** -0.5)
    dtype = jnp.dtype(case.dtype)
    # Heads merged into the feature axis, as a model's qkv projection produces them: an array
    # [..., heads, head_dim] of its own would be stored with both small axes padded to a
    # (8, 128) tile, and reading it would dominate the program's bytes.
    q = jax.ShapeDtypeStruct((case.batch, *case.shape, case.heads * case.head_dim), dtype)
    v = jax.ShapeDtypeStruct((*q.shape[:-1], case.heads * case.head_dim_v), dtype)
    bias = (jax.ShapeDtypeStruct((case.heads, *(2 * k - 1 for k in case.kernel_size)), dtype)
            if case.rpb else None)

    def na(q, k, v, bias):
        q, k, v = (x.reshape(*x.shape[:-1], case.heads, -1) for x in (q, k, v))
        if backend == "pallas_tpu":
            out, lse = pallas_tpu.na_fused(q, k, v, p, bias, interpret=False)
        else:
            out, lse = xla.na_fused(q, k, v, p, bias)
        return out.reshape(*out.shape[:-2], -1), lse

    def fwd_bwd(q, k, v, bias):
        (out, lse), vjp = jax.vjp(na, q, k, v, bias)
        return out, lse, vjp((out, lse))

    return fwd_bwd, (q, q, v, bias)


def compile_case(case: Case, topology: str, backends: Sequence[str] = ("pallas_tpu", "xla")
                 ) -> list[dict[str, Any]]:
    """Worker task: compile ``case`` on one chip of ``topology`` for each backend; one row per
    backend (``error`` set when it did not compile)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from nat_jax.kernels import xla

    # The kernels' own FLOPs and bytes (see xla.NONFINITE_CONTAINMENT); a worker process.
    xla.NONFINITE_CONTAINMENT = False
    mesh = Mesh(np.asarray(abstract_devices(topology)[:1]), ("x",))
    rows = []
    for backend in backends:
        row = {"case": case.name, "topology": topology, "backend": backend,
               "rank": len(case.shape), "feature": case.feature, "dtype": case.dtype,
               "head_dim": case.head_dim, "shape": list(case.shape),
               "kernel_size": list(case.kernel_size), "rpb": case.rpb, "containment": False,
               "error": None}
        try:
            fn, args = case_program(case, backend)
            args = [None if a is None else jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=NamedSharding(mesh, PartitionSpec())) for a in args]
            row.update(compile_report(fn, args, mesh))
        except Exception as err:  # the compiler's message is the report
            row["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        rows.append(row)
    return rows


def kernels_per_op(containment: bool = True) -> int:
    """Mosaic kernels of one NA op's forward + backward: forward, dQ, dK/dV, each twice with
    non-finite containment (the call, and its rerun on sanitized inputs in the branch taken
    only when a result is non-finite: ``xla.contain_nonfinite``)."""
    return 3 * (2 if containment else 1)


def problems(row: dict[str, Any]) -> list[str]:
    """Why a row fails the gate (empty: it passes)."""
    if row.get("error"):
        return [row["error"].splitlines()[0][:300]]
    out = []
    if not row["fits"]:
        out.append(f"needs {row['peak_bytes']} B > {row['memory_per_device']} B of HBM")
    want = kernels_per_op(row.get("containment", True)) if row["backend"] == "pallas_tpu" else 0
    if row["mosaic_kernels"] != want:
        out.append(f"{row['mosaic_kernels']} Mosaic kernels in the program, expected {want}")
    return out


def run(cases: Sequence[Case], topologies: Sequence[str] = ("v5e-8", "v4-8"),
        backends: Sequence[str] = ("pallas_tpu", "xla"), timeout: float = 600.0,
        progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Compile every case on every topology for each backend (one worker process, a timeout
    per task); the ``xla`` path, the comparison, only at the head dims of
    :data:`XLA_HEAD_DIMS`."""
    for t in topologies:
        if t not in TOPOLOGIES:
            raise ValueError(f"topology={t!r} is not one of {sorted(TOPOLOGIES)}")
    tasks = [(compile_case, (c, t, tuple(b for b in backends if b != "xla"
                                         or c.head_dim in XLA_HEAD_DIMS)))
             for c in cases for t in topologies]
    rows = []
    for (fn, (case, topo, _)), res in zip(tasks, run_isolated(tasks, timeout, progress)):
        if res["ok"]:
            rows.extend(res["value"])
        else:
            rows.append({"case": case.name, "topology": topo, "backend": "pallas_tpu",
                         "error": res["error"]})
    return rows


def environment() -> dict[str, Any]:
    """Versions that decide what the gate sees."""
    import jax
    import jaxlib

    libtpu = None
    for dist in plugin_dir().glob("libtpu-*.dist-info"):
        libtpu = dist.name.split("-")[1].removesuffix(".dist-info")
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "libtpu": libtpu,
            "python": sys.version.split()[0]}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": len(rows), "cases": len({r["case"] for r in rows}),
            "failed": sum(bool(problems(r)) for r in rows),
            "compile_errors": sum(bool(r.get("error")) for r in rows)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nat_jax.kernels.tpu_gate",
        description="Compile the Pallas TPU NA kernels (and the xla path beside them) for TPU "
                    "topologies with libtpu on this machine; fail on any compile error.")
    parser.add_argument("--sample", type=float, default=1.0,
                        help="deterministic fraction of the sweep (default: all of it)")
    parser.add_argument("--topology", default="v5e-8,v4-8",
                        help=f"comma-separated ({', '.join(TOPOLOGIES)})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per compile")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)

    from rich.progress import Progress

    cases = sample(kernel_cases(), args.sample)
    topologies = tuple(t.strip() for t in args.topology.split(",") if t.strip())
    start = time.perf_counter()
    with Progress() as bar:
        task = bar.add_task("compiling", total=len(cases) * len(topologies))
        rows = run(cases, topologies, timeout=args.timeout,
                   progress=lambda done, total: bar.update(task, completed=done))
    summary = summarize(rows)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    for r in rows:
        why = problems(r)
        if why:
            print(f"FAIL {r['case']} {r['topology']} {r.get('backend')}: {'; '.join(why)}")
    print(", ".join(f"{k}={v}" for k, v in summary.items()))
    if args.json:
        from nat_jax.timing import write_json

        write_json(args.json, {"environment": environment(), "topologies": list(topologies),
                               "sample": args.sample, "summary": summary, "kernels": rows})
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
