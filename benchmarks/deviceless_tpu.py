"""NAT/DiNAT on TPU slices that are not here: the trainer's train step and the inference forward
compiled for v5e-8 and v4-8 (data parallel and FSDP) on the ``xla`` path and the ``pallas_tpu``
kernels, at each config's recipe batch (1024 images, split over the chips).

Every row is :func:`nat_jax.train.deviceless.compile_program` (libtpu in a worker process, a
timeout per compile): per-chip memory against the chip's HBM (fits or not), XLA's FLOPs per step
against the model's own count, bytes per step, and the roofline time they imply. Nothing runs,
so the times are what the chip's peak rate and bandwidth allow, not measurements.

Results go to ``benchmarks/results/tpu_gate_models.json`` (``--append`` keeps earlier rows; a
job compiled again replaces its row); the README table is printed as markdown. A whole-model
compile takes 7 to 20 minutes on the shared 2-core machine.

Usage::

    python benchmarks/deviceless_tpu.py                                  # the minis, everything
    python benchmarks/deviceless_tpu.py --config dinat_mini --target v4-8 --program train \\
        --sharding dp --append
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nat_jax.kernels import tpu_gate
from nat_jax.timing import write_json
from nat_jax.train import configs, deviceless

RESULTS = Path(__file__).parent / "results" / "tpu_gate_models.json"
BACKENDS = ("xla", "pallas_tpu")


@dataclasses.dataclass(frozen=True)
class Job:
    config: str
    target: str
    program: str  # "train" or "inference"
    fsdp: bool
    backend: str

    @property
    def name(self) -> str:
        return (f"{self.config}-{self.program}-{self.target}-"
                f"{'fsdp' if self.fsdp else 'dp'}-{self.backend}")


def jobs(config_names: Sequence[str], targets: Sequence[str], programs: Sequence[str],
         shardings: Sequence[str], backends: Sequence[str]) -> list[Job]:
    """Every combination; FSDP only for train steps (inference keeps parameters as training
    shards them, and the minis' fit either way)."""
    return [Job(c, t, p, s == "fsdp", b) for c in config_names for t in targets
            for p in programs for s in shardings if p == "train" or s == "dp"
            for b in backends]


def compile_job(job: Job, timeout: float) -> dict:
    """One row: the report of :func:`deviceless.compile_program`, or the error."""
    target = deviceless.TARGETS[job.target]
    recipe = configs.get_config(job.config).global_batch_size
    row = {"job": job.name, **dataclasses.asdict(job)}
    try:
        row.update(deviceless.compile_program(
            job.target, job.config, per_device_batch=recipe // target.devices,
            program=job.program, timeout=timeout,
            overrides={"fsdp": -1 if job.fsdp else 1, "na_backend": job.backend}))
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
        # The report's "fsdp" is the config's (1: data parallel, -1: over all chips).
        head = (f"| {r['config']} | {r['program']} | {r['target']} | "
                f"{'data parallel' if r['fsdp'] in (False, 1) else 'FSDP'} | {r['backend']} |")
        if r.get("error"):
            lines.append(f"{head} - | did not compile: {r['error'].splitlines()[0][:80]} "
                         "| | | |")
            continue
        fits = "fits" if r["fits"] else "**does not fit**"
        lines.append(
            f"{head} {r['per_device_batch']} | {r['peak_bytes'] / gib:.1f} of "
            f"{r['memory_per_device'] / gib:.0f} ({fits}) | {r['flops'] / 1e12:.2f} / "
            f"{r['model_flops'] / 1e12:.2f} | {r['bytes_accessed'] / gb:.1f} | "
            f"{r['roofline_seconds'] * 1e3:.1f} ({r['bound']}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="nat_mini,dinat_mini",
                        help="comma-separated training configs")
    parser.add_argument("--target", default=",".join(tpu_gate.TOPOLOGIES))
    parser.add_argument("--program", default=",".join(deviceless.PROGRAMS))
    parser.add_argument("--sharding", default="dp,fsdp", help="dp and/or fsdp")
    parser.add_argument("--backend", default=",".join(BACKENDS))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --json")
    args = parser.parse_args(argv)

    def split(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    selected = jobs(split(args.config), split(args.target), split(args.program),
                    split(args.sharding), split(args.backend))
    start = time.perf_counter()
    rows = []
    for i, job in enumerate(selected, 1):
        rows.append(compile_job(job, args.timeout))
        print(f"{i}/{len(selected)} {job.name}: "
              f"{'error' if rows[-1].get('error') else 'compiled'}", flush=True)
    seconds = round(time.perf_counter() - start, 1)
    if args.append and args.json.exists():
        old = json.loads(args.json.read_text())
        names = {r["job"] for r in rows}
        rows = [r for r in old["rows"] if r["job"] not in names] + rows
        seconds += old.get("compile_seconds_total", 0)
    env = tpu_gate.environment()
    write_json(args.json, {"environment": env, "compile_seconds_total": seconds, "rows": rows})
    print(markdown(rows))
    return 1 if any(r.get("error") or not r["fits"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
