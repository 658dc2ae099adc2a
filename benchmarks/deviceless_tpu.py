"""NAT/DiNAT on TPU slices that are not here: the trainer's train step and the inference forward
compiled for v5e-8 and v4-8 (data parallel and FSDP) on the ``xla`` path and the ``pallas_tpu``
kernels, at each config's recipe batch (1024 images, split over the chips).

Every row is :func:`nat_jax.train.deviceless.compile_program` (libtpu in a worker process, a
timeout per compile): per-chip memory against the chip's HBM (fits or not), XLA's FLOPs per step
against the model's own count, bytes per step, and the roofline time they imply. Nothing runs,
so the times are what the chip's peak rate and bandwidth allow, not measurements.

Results go to ``benchmarks/results/tpu_gate_models.json`` (``--append`` keeps earlier rows; a
job compiled again replaces its row; the file is rewritten after every job); the README table is
printed as markdown. A whole-model compile takes 7 to 20 minutes on the shared 2-core machine.

``--backend window`` is the baseline the xla path's bytes are judged against: the same model
with dense attention inside non-overlapping ``K x K`` windows (Swin-style, no shift; RPB from
the same table) instead of neighborhood attention. Every query sees ``K^2`` keys either way, so
the FLOPs needed are the same; what differs is what each implementation moves.

Usage::

    python benchmarks/deviceless_tpu.py                                  # the minis, everything
    python benchmarks/deviceless_tpu.py --config dinat_mini --target v4-8 --program train \\
        --sharding dp --append
    python benchmarks/deviceless_tpu.py --config nat_mini --target v5e-8 --program train \\
        --sharding dp --backend window --append                      # the dense-window baseline
    python benchmarks/deviceless_tpu.py --config nat_mini --target v5e-8 --program train \\
        --sharding dp --backend xla --taken-path --append            # counted whole

A step's own program has a conditional (the NA backends' non-finite containment, whose two
branches XLA's cost analysis adds up) and, past a size, the xla path's chunk loop (whose body
it counts once): each row reports ``while_loops`` and ``conditionals``. ``--taken-path`` rows
are compiled without both, so their FLOPs and bytes are the work of a step on finite inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nat_jax.kernels import tpu_gate
from nat_jax.timing import write_json
from nat_jax.train import configs, deviceless

RESULTS = Path(__file__).parent / "results" / "tpu_gate_models.json"
BACKENDS = ("xla", "pallas_tpu")
WINDOW = "window"  # the dense-window baseline (not an NA backend)


def window_attention(query, key, value, p, rpb, config):
    """Dense attention inside non-overlapping ``K``-sized windows, as an NA backend's
    ``fn(query, key, value, p, rpb, config) -> (out, lse)`` (dilation, stride and causal are
    ignored: it is a cost baseline, not neighborhood attention). Each spatial axis must be a
    multiple of its kernel size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    b, *spatial, h, d = query.shape
    kernel = p.kernel_size
    if any(n % k for n, k in zip(spatial, kernel)):
        raise ValueError(f"window baseline: spatial {tuple(spatial)} is not a multiple of the "
                         f"kernel {kernel}")
    rank = len(spatial)
    split = [x for n, k in zip(spatial, kernel) for x in (n // k, k)]
    # [B, n0, k0, n1, k1, ..., h, c] -> [B, h, windows, K, c]
    perm = [0, 2 * rank + 1] + [1 + 2 * a for a in range(rank)] \
        + [2 + 2 * a for a in range(rank)] + [2 * rank + 2]

    def windows(x):
        x = jnp.transpose(x.reshape(b, *split, h, x.shape[-1]), perm)
        return x.reshape(b, h, -1, int(np.prod(kernel)), x.shape[-1])

    qw, kw, vw = windows(query), windows(key), windows(value)
    s = jnp.einsum("bhwqd,bhwkd->bhwqk", qw, kw, preferred_element_type=jnp.float32) * p.scale
    if rpb is not None:
        rel = np.zeros((), np.int64)
        for a, k in enumerate(kernel):
            off = np.arange(k)[None, :] - np.arange(k)[:, None] + k - 1  # [query, key]
            shape = [1] * (2 * rank)
            shape[a], shape[rank + a] = k, k
            rel = rel * (2 * k - 1) + off.reshape(shape)
        rel = np.broadcast_to(rel, kernel + kernel).reshape(int(np.prod(kernel)), -1)
        s = s + rpb.astype(jnp.float32).reshape(h, -1)[:, rel][None, :, None]
    lse = jax.nn.logsumexp(s, axis=-1)
    probs = jnp.exp(s - lse[..., None]).astype(value.dtype)
    o = jnp.einsum("bhwqk,bhwkd->bhwqd", probs, vw, preferred_element_type=jnp.float32)

    def unwindows(x):
        x = x.reshape(b, h, *(n // k for n, k in zip(spatial, kernel)), *kernel, x.shape[-1])
        inv = np.argsort(perm)
        return jnp.transpose(x, inv).reshape(b, *spatial, h, x.shape[-1])

    return unwindows(o.astype(value.dtype)), unwindows(lse[..., None])[..., 0]


def _compile_with_window_attention(target: str, config: str, overrides: dict,
                                   per_device_batch: int, program: str) -> dict:
    """Worker task: register the baseline as an NA backend, then compile as any other job."""
    from nat_jax.kernels import ops

    ops.register_backend(WINDOW, ops.Backend(window_attention))
    return deviceless._compile_program(target, config, overrides,  # noqa: SLF001
                                       per_device_batch, program)


def _compile_taken_path(target: str, config: str, overrides: dict, per_device_batch: int,
                        program: str) -> dict:
    """Worker task: the program as XLA's cost analysis can count it whole
    (:func:`nat_jax.kernels.xla.counted_whole`)."""
    from nat_jax.kernels import xla

    with xla.counted_whole():
        return deviceless._compile_program(target, config, overrides,  # noqa: SLF001
                                           per_device_batch, program)


@dataclasses.dataclass(frozen=True)
class Job:
    config: str
    target: str
    program: str  # "train" or "inference"
    fsdp: bool
    backend: str
    taken_path: bool = False  # compiled to be counted (see _compile_taken_path)
    remat: bool = False  # remat=True, scan_layers=True: the setting for models that do not fit

    @property
    def name(self) -> str:
        return (f"{self.config}-{self.program}-{self.target}-"
                f"{'fsdp' if self.fsdp else 'dp'}-{self.backend}"
                f"{'-taken' if self.taken_path else ''}{'-remat-scan' if self.remat else ''}")


def jobs(config_names: Sequence[str], targets: Sequence[str], programs: Sequence[str],
         shardings: Sequence[str], backends: Sequence[str], taken_path: bool = False,
         remat: bool = False) -> list[Job]:
    """Every combination; FSDP only for train steps (inference keeps parameters as training
    shards them, and the minis' fit either way)."""
    return [Job(c, t, p, s == "fsdp", b, taken_path, remat) for c in config_names for t in targets
            for p in programs for s in shardings if p == "train" or s == "dp"
            for b in backends]


def compile_job(job: Job, timeout: float) -> dict:
    """One row: the report of :func:`deviceless.compile_program`, or the error."""
    target = deviceless.TARGETS[job.target]
    recipe = configs.get_config(job.config).global_batch_size
    row = {"job": job.name, **dataclasses.asdict(job),
           "per_device_batch": recipe // target.devices}
    overrides = {"fsdp": -1 if job.fsdp else 1, "na_backend": job.backend}
    if job.remat:
        overrides.update(remat=True, scan_layers=True)
    try:
        if job.backend == WINDOW or job.taken_path:
            task = _compile_with_window_attention if job.backend == WINDOW \
                else _compile_taken_path
            row.update(deviceless.run_isolated(
                job.target, task, job.target, job.config, overrides,
                recipe // target.devices, job.program, timeout=timeout))
        else:
            row.update(deviceless.compile_program(
                job.target, job.config, per_device_batch=recipe // target.devices,
                program=job.program, timeout=timeout, overrides=overrides))
    except (RuntimeError, TimeoutError) as err:
        row["error"] = str(err)[:4000]
    return row


def markdown(rows: Sequence[dict]) -> str:
    """The README table: one line per compiled program."""
    gib, gb = 2 ** 30, 1e9
    lines = ["| model | program | slice | sharding | NA backend | images / chip | memory / chip, "
             "GiB (HBM) | TFLOP / chip (XLA / model) | GB / chip | roofline ms (bound) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # "fsdp" is the config's in a report (1: data parallel, -1: over all chips), the job's
        # bool in a row that failed (True == 1 in Python, hence the identity test).
        fsdp = r["fsdp"] is True or (r["fsdp"] is not False and r["fsdp"] != 1)
        backend = r["backend"] + (" (taken path, counted whole)" if r.get("taken_path") else "") \
            + (", remat + scan" if r.get("remat") else "")
        head = (f"| {r['config']} | {r['program']} | {r['target']} | "
                f"{'FSDP' if fsdp else 'data parallel'} | {backend} |")
        if r.get("error"):
            oom = re.search(r"HLO temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)",
                            r["error"])
            why = (f"**does not fit**: {oom.group(1)} of temporaries, {oom.group(2)} HBM" if oom
                   else f"did not compile: {r['error'].splitlines()[0][:80]}")
            lines.append(f"{head} {r.get('per_device_batch', '-')} | {why} | | | |")
            continue
        fits = "fits" if r["fits"] else "**does not fit**"
        # A scanned stage's body is counted once: its FLOPs and bytes are lower bounds.
        lo = ">= " if r.get("remat") else ""
        lines.append(
            f"{head} {r['per_device_batch']} | {r['peak_bytes'] / gib:.1f} of "
            f"{r['memory_per_device'] / gib:.0f} ({fits}) | {lo}{r['flops'] / 1e12:.2f} / "
            f"{r['model_flops'] / 1e12:.2f} | {lo}{r['bytes_accessed'] / gb:.1f} | "
            f"{lo}{r['roofline_seconds'] * 1e3:.1f} ({r['bound']}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="nat_mini,dinat_mini",
                        help="comma-separated training configs")
    parser.add_argument("--target", default=",".join(tpu_gate.TOPOLOGIES))
    parser.add_argument("--program", default=",".join(deviceless.PROGRAMS))
    parser.add_argument("--sharding", default="dp,fsdp", help="dp and/or fsdp")
    parser.add_argument("--backend", default=",".join(BACKENDS),
                        help=f"NA backends; '{WINDOW}' = the dense-window baseline")
    parser.add_argument("--taken-path", action="store_true",
                        help="compile to be counted: without the non-finite containment "
                             "conditional and the xla path's chunk loop, which XLA's cost "
                             "analysis counts twice / once (FLOPs and bytes of the path a step "
                             "takes on finite inputs; not the memory a run needs)")
    parser.add_argument("--remat", action="store_true",
                        help="train steps with remat=True and scan_layers=True (the setting "
                             "for models whose recipe batch does not fit otherwise)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --json")
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    selected = jobs(split(args.config), split(args.target), split(args.program),
                    split(args.sharding), split(args.backend), args.taken_path, args.remat)
    start = time.perf_counter()
    old_rows, old_seconds = [], 0.0
    if args.append and args.json.exists():
        old = json.loads(args.json.read_text())
        old_rows, old_seconds = old["rows"], old.get("compile_seconds_total", 0)
    env = tpu_gate.environment()
    rows = []
    for i, job in enumerate(selected, 1):
        rows.append(compile_job(job, args.timeout))
        print(f"{i}/{len(selected)} {job.name}: "
              f"{'error' if rows[-1].get('error') else 'compiled'}", flush=True)
        names = {r["job"] for r in rows}
        seconds = round(old_seconds + time.perf_counter() - start, 1)
        rows_out = [r for r in old_rows if r["job"] not in names] + rows
        write_json(args.json, {"environment": env, "compile_seconds_total": seconds,
                               "rows": rows_out})
    rows = [r for r in old_rows if r["job"] not in {r2["job"] for r2 in rows}] + rows
    print(markdown(rows))
    return 1 if any(r.get("error") or not r["fits"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
