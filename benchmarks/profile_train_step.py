"""Where the train step's time goes: a per-HLO-op profile of the real, jitted train step.

Runs the trainer's own train step (``trainer.setup_training``: AdamW, mixup/cutmix and erasing
on device) on a synthetic batch under ``jax.profiler``, reads back XLA's per-op events (on CPU
every thunk is one event named after its HLO instruction) and sums them by category, using each
instruction's metadata in the compiled HLO (source file and the JAX name stack):

* ``NA forward`` / ``NA backward``: ops from ``kernels/`` (backward = under ``transpose`` or the
  xla path's ``na_bwd`` scope),
* ``matmul fwd`` / ``matmul bwd``: other dots and convolutions (qkv, projections, MLP, patch
  embedding, head),
* ``norm / GELU / softmax / elementwise`` (fwd and bwd), ``optimizer`` (optax),
  ``data`` (normalize, erasing, mixup on device), ``other`` (copies, transposes, loss).

Also measures this machine's matmul ceiling in the same process (the best of 15 large fp32
matmuls, :func:`nat_jax.timing.matmul_ceiling`) and reports the step's images/s against the
bound ``ceiling / (3 * forward FLOPs per image)`` (forward FLOPs from XLA's cost analysis of
the model's inference forward).

Usage::

    python benchmarks/profile_train_step.py --preset nat_mini --batch 16 --dtype float32
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

from nat_jax import host
from nat_jax.timing import environment, matmul_ceiling, write_json
from nat_jax.train import configs, sharding, trainer

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+).*?\s([a-z][\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
    """The module's FileNames / FunctionNames / FileLocations / StackFrames tables."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if current is not None and m:
            current[int(m.group(1))] = m.group(2)
        elif current is not None and line.strip():
            current = None
    return tables


def _frame_files(tables, frame: int) -> str:
    """Source files and functions along a stack frame's chain, joined into one string."""
    files, seen = [], set()
    locs, frames = tables.get("FileLocations", {}), tables.get("StackFrames", {})
    while frame and frame not in seen and frame in frames:
        seen.add(frame)
        loc_id = int(re.search(r"file_location_id=(\d+)", frames[frame]).group(1))
        loc = locs.get(loc_id, "")
        f = re.search(r"file_name_id=(\d+)", loc)
        fn = re.search(r"function_name_id=(\d+)", loc)
        if f:
            files.append(tables["FileNames"].get(int(f.group(1)), ""))
        if fn:
            files.append(tables["FunctionNames"].get(int(fn.group(1)), ""))
        frame = int(re.search(r"parent_frame_id=(\d+)", frames[frame]).group(1))
    return " ".join(files)


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str, str]]:
    """``name -> (opcode, op_name, source files/functions, result shape)`` for every
    instruction of a compiled module."""
    tables = _tables(hlo_text)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name = _OP_NAME.search(m.group(4))
        frame = _FRAME.search(m.group(4))
        out[m.group(1)] = (m.group(3), name.group(1) if name else "",
                           _frame_files(tables, int(frame.group(1))) if frame else "",
                           m.group(2))
    return out


def _fused_opcodes(hlo_text: str) -> dict[str, set[str]]:
    """``fusion instruction name -> opcodes inside its fused computation`` (to spot dots)."""
    comps, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = comps.setdefault(head.group(1), set())
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.add(m.group(3))
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m and m.group(3) == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", m.group(4))
            if called:
                out[m.group(1)] = comps.get(called.group(1), set())
    return out


def categorize(opcode: str, op_name: str, source: str, inner: set[str]) -> str:
    bwd = "transpose(" in op_name or "na_backward" in op_name
    if "/kernels/" in source or "jit(_fused)" in op_name:
        return "NA backward" if bwd else "NA forward"
    if "optax" in source:
        return "optimizer"
    if "augment.py" in source:
        return "data (on-device augmentation)"
    if opcode in ("dot", "convolution") or inner & {"dot", "convolution"}:
        return "matmul bwd" if bwd else "matmul fwd"
    if re.search(r"norm|rsqrt|erf|gelu|tanh|softmax|logistic", op_name + " " + source):
        return "norm/GELU bwd" if bwd else "norm/GELU fwd"
    return "other (copies, layout, loss, elementwise)"


def profile_events(fn, args, steps: int) -> dict[str, float]:
    """Total microseconds per HLO op name over ``steps`` calls of ``fn(*args)``."""
    from jax.profiler import ProfileData

    out = fn(*args)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
        data = ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                if "hlo_op" in stats:
                    totals[stats["hlo_op"]] += ev.duration_ns / 1e3
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nat_mini")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=0,
                        help="also list the N most expensive ops (category, shape, source op)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    c = configs.get_config(args.preset)
    c.update(global_batch_size=args.batch, compute_dtype=args.dtype)
    mesh = sharding.make_mesh(1)
    run = trainer.setup_training(c, mesh, c.num_classes, total_steps=1000, warmup_steps=10)
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (args.batch, c.image_size, c.image_size, 3), np.uint8),
            "label": rng.integers(0, c.num_classes, args.batch).astype(np.int32),
            "erase": np.zeros((args.batch, 4), np.int32)}
    batch = trainer.put_batch(host, mesh)
    start = time.perf_counter()
    compiled = run.step_fn.lower(run.state, batch, run.rest).compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    ops, fused = hlo_ops(text), _fused_opcodes(text)

    # The state is donated: thread it through the timed calls.
    state = [run.state]

    def step():
        state[0], metrics = compiled(state[0], batch, run.rest)
        return metrics

    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:]))
    totals = profile_events(lambda: step(), (), args.steps)

    by_cat = collections.Counter()
    unknown = 0.0
    top = []
    for name, us in totals.items():
        # Control flow thunks contain their body's events: count the body ops only.
        if ops.get(name, ("",))[0] in ("while", "conditional", "call"):
            continue
        if name not in ops:
            unknown += us
            continue
        opcode, op_name, source, shape = ops[name]
        category = categorize(opcode, op_name, source, fused.get(name, set()))
        by_cat[category] += us
        top.append({"op": name, "category": category, "ms": us / args.steps / 1e3,
                    "shape": shape, "source_op": op_name})
    top = sorted(top, key=lambda t: -t["ms"])[:args.top]
    by_cat = {k: v / args.steps / 1e3 for k, v in by_cat.most_common()}  # ms per step
    busy = sum(by_cat.values())

    ceiling = matmul_ceiling()
    fwd_flops = forward_flops(c)
    bound = ceiling / (3 * fwd_flops)
    result = environment(command=" ".join(["python", "benchmarks/profile_train_step.py",
                                           *sys.argv[1:]]),
                         preset=args.preset, batch=args.batch, dtype=args.dtype,
                         step_ms=step_s * 1e3, images_per_second=args.batch / step_s,
                         compile_seconds=compile_s, op_time_ms=by_cat,
                         op_time_busy_ms=busy, unattributed_ms=unknown / args.steps / 1e3,
                         matmul_ceiling_gflops=ceiling / 1e9,
                         forward_gflops_per_image=fwd_flops / 1e9,
                         bound_images_per_second=bound,
                         fraction_of_bound=args.batch / step_s / bound, top_ops=top)
    print(f"{args.preset} batch {args.batch} {args.dtype}: step {step_s * 1e3:.0f} ms, "
          f"{args.batch / step_s:.2f} images/s = {result['fraction_of_bound']:.2f} of the "
          f"matmul bound ({bound:.2f} images/s at {ceiling / 1e9:.0f} GFLOP/s); "
          f"load {os.getloadavg()}")
    print(f"per-op time (sum of op events, ms/step; {busy:.0f} busy vs {step_s * 1e3:.0f} wall):")
    for k, v in by_cat.items():
        print(f"  {k:45s} {v:9.1f}  {v / busy:6.1%}")
    if top:
        print(f"the {len(top)} most expensive ops (ms/step):")
        for t in top:
            print(f"  {t['ms']:8.1f}  {t['category'][:22]:22s} {t['shape'][:40]:40s} "
                  f"{t['source_op'][-60:]}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"profile_train_step_{jax.devices()[0].platform}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def forward_flops(config) -> float:
    """Useful forward FLOPs per image: the model's own count (:func:`nat_jax.flops.model_flops`,
    exactly ``prod(K)`` logits per query; the tiled backends' padding and halo work is not
    useful work)."""
    from nat_jax.flops import model_flops

    model_cfg = trainer.model_config(config, config.num_classes)
    return float(model_flops(model_cfg, 1, config.image_size)["forward"])


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
