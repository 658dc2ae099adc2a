"""Context parallelism on CPU devices: per-device memory, time and halo bytes of a sharded NA.

Each case runs ``jax.grad`` of ``sum(na(q, k, v) * cotangent)`` (forward + backward, fixed
random cotangent, the ``xla`` backend) with the first spatial axis split over 1, 2, 4 and 8
devices (``spatial_axes=("sp", None, ...)`` on a 1-D mesh; 1 = the plain op, no mesh, as the
baseline). For every (case, shards) it records:

* per-device memory: XLA's buffer assignment of the compiled (partitioned) program,
  ``compiled.memory_analysis()``: arguments (q, k, v, cotangent), outputs (dq, dk, dv) and
  temporaries, per device;
* wall time: median of ``--repeats`` warm runs. The devices are virtual
  (``--xla_force_host_platform_device_count``): all of them share this host's cores, so the
  times are *not* a scaling measurement (8 shards do 8 shards' work on the same cores, plus the
  halo rows); they are recorded with the load average;
* bytes exchanged per step (one forward + backward), read from the compiled HLO: every
  ``collective-permute`` (and any ``all-gather``, which a halo plan avoids): the sum of their
  operand sizes (the program's permutes, whoever takes part in them), and, from their
  ``source_target_pairs``, the bytes each device receives (the largest, and the total over all
  devices);
* the model (``context.plan_axis``): a device receives ``received_rows`` rows of key and of value
  (x the other dims x dtype bytes) in the forward pass, and the backward pass sends the halo
  rows' gradients back to their owners, the same amount again (``2 x 2 x received_rows x row
  bytes``); the plan's exact per-device count (backward: the gradients of the rows a device
  *sent*); and the total over devices, every shard's halo the same way
  (:func:`model_exchanges`).

Usage::

    python benchmarks/context_parallel.py                     # 2-D 256x256 K7 (+ d4), 3-D
    python benchmarks/context_parallel.py --cases 2d --shards 1,8 --repeats 1
    python benchmarks/context_parallel.py --no-time          # memory and bytes only (compile)
"""

from __future__ import annotations

import os

# Virtual CPU devices must be requested before jax is imported (as the tests do).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from nat_jax.kernels import context, neighborhood_attention  # noqa: E402
from nat_jax.kernels import xla as xla_backend  # noqa: E402
from nat_jax import host  # noqa: E402
from nat_jax.timing import environment, median_seconds, write_json  # noqa: E402

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Case:
    """One NA problem; its first spatial axis is the one split over devices."""

    name: str
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"

    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.spatial, self.heads, self.head_dim)


def default_cases(size_2d: int, spatial_3d: tuple[int, ...], heads: int, head_dim: int
                  ) -> dict[str, Case]:
    """The issue's cases: a 2-D grid with NAT's K=7 and a DiNAT-like dilation 4, and a
    video-like 3-D grid sharded along its first (time) axis."""
    n = size_2d
    kw = dict(heads=heads, head_dim=head_dim)
    return {
        "2d": Case(f"2-D {n}x{n} K7", (n, n), (7, 7), (1, 1), **kw),
        "2d-dilated": Case(f"2-D {n}x{n} K7 d4", (n, n), (7, 7), (4, 4), **kw),
        "3d": Case("3-D {}x{}x{} K3x7x7".format(*spatial_3d), spatial_3d, (3, 7, 7), (1, 1, 1),
                   **kw),
    }


# ------------------------------------------------------------------ collectives in the HLO

# An instruction line of the optimized HLO: ``%name = <result type> <opcode>(operands), attrs``.
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_PAIRS = re.compile(r"source_target_pairs=\{(.*?)\}\}")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "all-to-all",
                "reduce-scatter", "collective-broadcast")


def _array_bytes(dtype: str, dims: str) -> int:
    """Bytes of one HLO array type such as ``f32[1,12,256,4,32]`` (``pred`` is one byte)."""
    bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype) or 8)
    return math.prod(int(d) for d in dims.split(",") if d) * bits // 8


def hlo_exchanges(hlo: str, devices: int) -> dict:
    """Bytes the collectives of an optimized SPMD HLO module move in one execution.

    ``collective-permute``: its operand has its result's shape (asynchronous ``-start`` ops
    carry ``(operand, result, contexts)``: the first array is the operand; ``-done`` ops are
    skipped so nothing counts twice); every ``(source, target)`` pair moves it to ``target``.
    ``all-gather``: each device of a group of ``g`` receives the ``g - 1`` pieces it lacks,
    ``(g - 1) / g`` of the gathered result. Other collectives are only counted (none is
    expected; a count says where one appears).

    Returns ``permutes`` (op count), ``permute_operand_bytes`` (sum over ops, whoever takes
    part), ``all_gathers``, ``all_gather_bytes`` (per device), ``other_collectives`` and, per
    device, ``received_bytes`` (a list indexed by device).
    """
    received = [0] * devices
    out = dict(permutes=0, permute_operand_bytes=0, all_gathers=0, all_gather_bytes=0,
               other_collectives={})
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m is None:
            continue
        result, opcode, rest = m.groups()
        base = opcode.removesuffix("-start")
        if base not in _COLLECTIVES or opcode.endswith("-done"):
            continue
        arrays = _ARRAY.findall(result)
        if base == "collective-permute":
            nbytes = _array_bytes(*arrays[0])
            out["permutes"] += 1
            out["permute_operand_bytes"] += nbytes
            pairs = _PAIRS.search(rest)
            for pair in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}}") if pairs else ():
                received[int(pair[1])] += nbytes
        elif base == "all-gather":
            # Synchronous: the result is the gathered array; asynchronous: (operand, result).
            gathered = _array_bytes(*arrays[-1] if opcode.endswith("-start") else arrays[0])
            listed, iota = _GROUPS_LIST.search(rest), _GROUPS_IOTA.search(rest)
            group = (len(listed.group(1).split(",")) if listed
                     else int(iota.group(1)) if iota else devices)
            each = gathered * (group - 1) // group
            out["all_gathers"] += 1
            out["all_gather_bytes"] += each
            received = [r + each for r in received]
        else:
            out["other_collectives"][base] = out["other_collectives"].get(base, 0) + 1
    out["received_bytes"] = received
    return out


# ------------------------------------------------------------------ the halo model


def model_exchanges(case: Case, shards: int) -> dict:
    """Bytes a forward + backward step exchanges according to the plan of the split axis.

    One row is every dim but the split one (global: only one axis is split) x dtype bytes, and
    every exchanged row is a row of key *and* of value (x 2).

    * ``model_bytes_per_device`` (the issue's model): ``2 x 2 x received_rows`` rows: the
      forward halo of the device receiving the most, and its gradients sent back in the
      backward pass, assumed the same size per device.
    * ``plan_bytes_per_device``: exact per device from the plan: the rows of its forward halo
      plus, in the backward pass, the gradients of the rows *it sent* (which differ from the
      rows it received beside a border shard, whose halo is twice as deep on one side).
    * ``model_bytes_total``: every shard's halo, forward and backward (``2 x 2 x sum(before +
      after)`` rows), exact under either per-device view.
    """
    if shards == 1:
        return dict(plan=None, model_bytes_per_device=0, plan_bytes_per_device=[0],
                    model_bytes_total=0)
    plan = context.plan_axis(case.spatial[0], shards, case.kernel[0], 1, case.dilation[0])
    # Bytes of one row of key and value: every dim but the split one, x dtype bytes, x 2.
    kv_row = math.prod(case.shape()) // case.spatial[0] * jnp.dtype(case.dtype).itemsize * 2
    m = plan.shard
    got = np.zeros(shards, np.int64)
    sent = np.zeros(shards, np.int64)
    for i in range(shards):
        # The local range of shard i, and the shard owning each of its rows.
        first = i * m - plan.starts[i]
        owners = (np.arange(first, first + plan.window) % plan.length) // m
        owners = owners[owners != i]
        got[i] = owners.size
        np.add.at(sent, owners, 1)
    return dict(plan=dataclasses.asdict(plan),
                model_bytes_per_device=int(2 * got.max() * kv_row),
                plan_bytes_per_device=[int(x) for x in (got + sent) * kv_row],
                model_bytes_total=int(2 * got.sum() * kv_row))


# ------------------------------------------------------------------ one measurement


def _step(case: Case, spatial_axes: tuple | None) -> Callable:
    """``(q, k, v, cotangent) -> (dq, dk, dv)`` of ``sum(na(q, k, v) * cotangent)``."""

    def loss(q, k, v, cot):
        out = neighborhood_attention(q, k, v, case.kernel, dilation=case.dilation,
                                     backend="xla", spatial_axes=spatial_axes)
        return jnp.sum(out * cot)

    return jax.grad(loss, argnums=(0, 1, 2))


def measure(case: Case, shards: int, repeats: int, seed: int) -> dict:
    """Compile (and, with ``repeats > 0``, time) the step of ``case`` split ``shards`` ways."""
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(case.shape()).astype(case.dtype) for _ in range(4)]
    if shards == 1:
        mesh, spatial_axes = None, None
        args = [jax.device_put(x, jax.devices()[0]) for x in host]
    else:
        mesh = jax.make_mesh((shards,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:shards])
        spatial_axes = ("sp",) + (None,) * (len(case.spatial) - 1)
        # Arguments placed split as the op's outputs are: each device holds (and is charged
        # for) only its own rows, not a replicated copy of the whole grid.
        sharding = NamedSharding(mesh, P(None, "sp"))
        args = [jax.device_put(x, sharding) for x in host]
    step = jax.jit(_step(case, spatial_axes))
    if mesh is None:
        compiled = step.lower(*args).compile()
    else:
        with jax.set_mesh(mesh):
            compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    exchanges = hlo_exchanges(compiled.as_text(), shards)
    received = exchanges.pop("received_bytes")
    row = dict(case=case.name, **dataclasses.asdict(case), shards=shards,
               argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
               per_device_bytes=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
               **exchanges, received_bytes_per_device=received,
               received_bytes_max=max(received), received_bytes_total=sum(received),
               **model_exchanges(case, shards))
    if repeats > 0:
        # The executable measured above (its mesh is baked in; no retrace or recompile).
        row["fwd_bwd_ms"] = median_seconds(compiled, *args, repeats=repeats) * 1e3
        row["load_average_after"] = list(os.getloadavg())
    return row


# ------------------------------------------------------------------ report


def _ratio(measured: int, model: int) -> str:
    return "-" if not model else f"{measured / model:.2f}"


def print_table(console: Console, rows: list[dict], repeats: int) -> None:
    """The rows as one table (MiB per device unless marked total), and what its columns count."""
    table = Table(title=f"Context-parallel NA fwd+bwd (xla backend) on {jax.device_count()} "
                        f"virtual CPU devices sharing {os.cpu_count()} cores, jax "
                        f"{jax.__version__}")
    cols = ("case", "shards", "rows/dev", "MiB/dev", "temp MiB", "ms", "permutes",
            "Σ operands", "recv max", "model", "max/model", "= plan", "recv total",
            "model total", "total/model")
    for col in cols:
        table.add_column(col, justify="left" if col == "case" else "right")
    mib = lambda b: f"{b / MIB:.2f}"  # noqa: E731
    for i, r in enumerate(rows):
        m = r["spatial"][0] // r["shards"]
        halo = 0 if r["plan"] is None else r["plan"]["window"] - m
        gathers = f" +{r['all_gathers']} AG" if r["all_gathers"] else ""
        exact = r["received_bytes_per_device"] == r["plan_bytes_per_device"]
        last = i + 1 == len(rows) or rows[i + 1]["case"] != r["case"]
        table.add_row(
            r["case"], str(r["shards"]), f"{m}+{halo}", f"{r['per_device_bytes'] / MIB:.0f}",
            f"{r['temp_bytes'] / MIB:.0f}",
            f"{r['fwd_bwd_ms']:.0f}" if "fwd_bwd_ms" in r else "-",
            f"{r['permutes']}{gathers}", mib(r["permute_operand_bytes"]),
            mib(r["received_bytes_max"]), mib(r["model_bytes_per_device"]),
            _ratio(r["received_bytes_max"], r["model_bytes_per_device"]),
            "yes" if exact else "NO", mib(r["received_bytes_total"]),
            mib(r["model_bytes_total"]),
            _ratio(r["received_bytes_total"], r["model_bytes_total"]), end_section=last)
    console.print(table)
    console.print(
        "rows/dev: own + halo rows of the split axis each device computes on. MiB/dev: "
        "arguments + outputs + temporaries of the compiled program per device "
        "(memory_analysis()). Exchanges in MiB per step (forward + backward): Σ operands = every "
        "collective-permute's operand summed over the program (a device takes part in only "
        "some); recv = bytes a device receives, from each permute's source_target_pairs (the "
        "largest device, and the total over devices); model = 2 (key, value) x 2 (forward halo, "
        "its gradient sent back) x received_rows x row bytes; = plan: every device's received "
        "bytes equal the plan's exact count (its halo forward, the gradients of the rows it "
        "sent backward); model total = 2 x 2 x every shard's halo rows.")
    if repeats:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        console.print(f"ms: median of {repeats} warm fwd+bwd steps. The {jax.device_count()} "
                      f"devices are virtual and share {os.cpu_count()} cores: times are not a "
                      f"scaling measurement (load average now {load}).")
    others = {k for r in rows for k in r["other_collectives"]}
    if others:
        console.print(f"[red]other collectives in the programs: {sorted(others)}[/red]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="2d,2d-dilated,3d",
                        help="comma-separated: 2d (K7), 2d-dilated (K7 dilation 4), 3d (K3x7x7)")
    parser.add_argument("--shards", default="1,2,4,8",
                        help="comma-separated shard counts of the first spatial axis "
                             "(1 = the plain op without spatial_axes; at most the device count)")
    parser.add_argument("--size-2d", type=int, default=256, help="2-D grid side (tokens)")
    parser.add_argument("--spatial-3d", default="32,64,64", help="3-D grid (tokens per axis)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per (case, shards) after one warm-up; 0 = no timing")
    parser.add_argument("--repeats-3d", type=int, default=None,
                        help="timed runs for the 3-D case (default --repeats)")
    parser.add_argument("--no-time", action="store_true", help="compile only (= --repeats 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logits-budget", type=int, default=None,
                        help="bytes of fp32 logits per chunk in the xla backend (default: its "
                             "own, 16 MiB on CPU). The chunk's workspace is a fixed term of "
                             "every device's memory that sharding does not shrink")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "context_parallel_cpu.json"))
    args = parser.parse_args(argv)

    spatial_3d = tuple(int(x) for x in args.spatial_3d.split(","))
    cases = default_cases(args.size_2d, spatial_3d, args.heads, args.head_dim)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(cases)}")
    shard_counts = [int(x) for x in args.shards.split(",")]
    if max(shard_counts) > jax.device_count():
        parser.error(f"--shards {args.shards}: only {jax.device_count()} devices")
    repeats = 0 if args.no_time else args.repeats
    budget = xla_backend.logits_budget(args.logits_budget) if args.logits_budget is not None \
        else contextlib.nullcontext()
    repeats_3d = 0 if args.no_time else (args.repeats_3d if args.repeats_3d is not None
                                         else repeats)

    def meta() -> dict:
        return environment(command=" ".join(sys.argv), repeats=repeats, repeats_3d=repeats_3d,
                           backend="xla", logits_budget=xla_backend._logits_budget(),
                           program="jax.grad(sum(na(q,k,v) * cotangent)), q,k,v",
                           note="virtual CPU devices share the host's cores: times are not a "
                                "scaling measurement")

    rows = []
    console = Console()
    if console.width < 180:  # the table's 15 columns (rich wraps to 80 when piped)
        console = Console(width=180)
    with budget, console.status("benchmarking") as status:
        for name in names:
            case = cases[name]
            for shards in shard_counts:
                status.update(f"{case.name}, {shards} shard(s)")
                reps = repeats_3d if len(case.spatial) == 3 else repeats
                rows.append(measure(case, shards, reps, args.seed))
                write_json(args.out, dict(meta=meta(), results=rows))
    print_table(console, rows, repeats)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
