"""Interleaved A/B timing of NA implementations in one process: the gather reference, the xla
path of this checkout, the cpu backend's native kernels (where they build), the xla path of
another git revision (loaded from ``git show``), and tile-size variants. Every variant is timed
round-robin (per round, an untimed call and a timed one each) so that load from other jobs hits
all of them alike; medians and ratios go to JSON with the load average.

Usage::

    python benchmarks/na_ab.py --rev main                       # old vs new xla vs reference
    python benchmarks/na_ab.py --tiles 1x8 2x8 4x4 7x7 8x8      # tile variants of this checkout
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from nat_jax import kernels
from nat_jax.kernels import cpu, xla
from nat_jax import host
from nat_jax.timing import environment, write_json

from na_ops import Shape  # noqa: E402  (benchmarks/ is the script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CASES = {
    "112": Shape("ab", "112x112 h2 K7", 1, (112, 112), 2, 32, 7),
    "56": Shape("ab", "56x56 h2 K7 b2", 2, (56, 56), 2, 32, 7),
    "56d8": Shape("ab", "56x56 h2 K7 d8 b2", 2, (56, 56), 2, 32, 7, 8),
    "28": Shape("ab", "28x28 h4 K7 b2", 2, (28, 28), 4, 32, 7),
    "14": Shape("ab", "14x14 h8 K7 b2", 2, (14, 14), 8, 32, 7),
    "7": Shape("ab", "7x7 h16 K7 b2", 2, (7, 7), 16, 32, 7),
    "train1": Shape("ab", "56x56 h2 K7 b16", 16, (56, 56), 2, 32, 7),
    # nat_mini's four stages at inference batch 8 (depths 3, 4, 6, 5: ``--cases nat_mini``
    # also prints the whole model's NA time per variant).
    "s1b8": Shape("ab", "nat_mini s1 56x56 h2 b8", 8, (56, 56), 2, 32, 7),
    "s2b8": Shape("ab", "nat_mini s2 28x28 h4 b8", 8, (28, 28), 4, 32, 7),
    "s3b8": Shape("ab", "nat_mini s3 14x14 h8 b8", 8, (14, 14), 8, 32, 7),
    "s4b8": Shape("ab", "nat_mini s4 7x7 h16 b8", 8, (7, 7), 16, 32, 7),
}
# Layers per stage of nat_mini, for the whole-model sums of ``--cases nat_mini``.
NAT_MINI_STAGES = {"s1b8": 3, "s2b8": 4, "s3b8": 6, "s4b8": 5}


def load_revision_xla(rev: str):
    """``na_fused`` of ``kernels/xla.py`` at git revision ``rev`` (with that revision's
    ``windows.py``), as a fresh module."""
    mods = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("windows", "xla"):
            src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:kernels/{name}.py"],
                                 check=True, capture_output=True, text=True).stdout
            src = src.replace("from nat_jax.kernels import windows", "import _ab_windows as windows")
            path = os.path.join(d, f"_ab_{name}.py")
            with open(path, "w") as f:
                f.write(src)
            spec = importlib.util.spec_from_file_location(f"_ab_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[f"_ab_{name}"] = mod
            spec.loader.exec_module(mod)
            mods[name] = mod
    return mods["xla"].na_fused


def make_fns(c: Shape, impl):
    p = kernels.make_params(c.spatial, c.head_dim, c.kernel, dilation=c.dilation)
    keys = jax.random.split(jax.random.key(0), 5)
    shape = (c.batch, *c.spatial, c.heads, c.head_dim)
    q, k, v, do = (jax.random.normal(x, shape) for x in keys[:4])
    rpb = (jax.random.normal(keys[4], (c.heads, *(2 * c.kernel - 1,) * len(c.spatial)))
           if c.rpb else None)

    def fwd(q, k, v, rpb):
        return impl(q, k, v, p, rpb)[0]

    def fwd_bwd(q, k, v, rpb, do):
        _, vjp = jax.vjp(fwd, q, k, v, rpb)
        return vjp(do)

    return (jax.jit(fwd), jax.jit(fwd_bwd)), (q, k, v, rpb, do)


def interleaved(fns: dict, args: dict, rounds: int, nargs: int | None = None) -> dict:
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # compile + warm
        jax.block_until_ready(fn(*args[name][:nargs]))
    for _ in range(rounds):
        for name, fn in fns.items():
            # An untimed call first: a variant's first call after another's ran up to 15%
            # slower (the forward of identical code after the reference's), which favoured
            # whichever variant came later in the round.
            jax.block_until_ready(fn(*args[name][:nargs]))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name][:nargs]))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["112", "56"],
                        choices=sorted(CASES) + ["nat_mini"])
    parser.add_argument("--rev", default=None, help="git revision whose xla path to compare")
    parser.add_argument("--tiles", nargs="*", default=[],
                        help="tile variants of this checkout's xla path, e.g. 1x8 8x8")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-cpu", action="store_true", help="leave out the cpu backend")
    parser.add_argument("--autodiff", action="store_true",
                        help="also time autodiff of this checkout's xla forward (vs its "
                             "custom_vjp)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if "nat_mini" in args.cases:
        args.cases = [c for c in args.cases if c != "nat_mini"] + list(NAT_MINI_STAGES)

    impls = {}
    if not args.no_reference:
        impls["reference"] = kernels.reference.na_fused
    if args.rev:
        impls[f"xla@{args.rev}"] = load_revision_xla(args.rev)
    impls["xla"] = xla.na_fused
    if not args.no_cpu and cpu.build_error() is None:
        impls["cpu"] = cpu.na_fused
    if args.autodiff:
        impls["xla autodiff"] = lambda q, k, v, p, r: xla._forward(q, k, v, r, p, None, False)[0]
    for t in args.tiles:
        tiles = tuple(int(x) for x in t.split("x"))
        impls[f"xla tiles {t}"] = (lambda tiles: lambda q, k, v, p, r: xla.na_fused(
            q, k, v, p, r, tile_sizes=tiles))(tiles)

    rows = []
    for key in args.cases:
        c = CASES[key]
        fwd, bwd, arg = {}, {}, {}
        for name, impl in impls.items():
            if len(c.spatial) != 2 and "tiles" in name:
                continue
            (f, b), a = make_fns(c, impl)
            fwd[name], bwd[name], arg[name] = f, b, a
        load0 = os.getloadavg()
        tf = interleaved(fwd, arg, args.rounds, 4)
        tb = interleaved(bwd, arg, args.rounds)
        base = "reference" if "reference" in tf else next(iter(tf))
        for name in tf:
            row = dict(case=c.name, impl=name, fwd_ms=tf[name] * 1e3, fwd_bwd_ms=tb[name] * 1e3,
                       fwd_speedup_vs_reference=tf[base] / tf[name],
                       fwd_bwd_speedup_vs_reference=tb[base] / tb[name],
                       load_average=[load0, os.getloadavg()])
            rows.append(row)
            print(f"{c.name:22s} {name:22s} fwd {row['fwd_ms']:8.2f} ms "
                  f"({row['fwd_speedup_vs_reference']:5.2f}x)  fwd+bwd {row['fwd_bwd_ms']:8.2f} ms "
                  f"({row['fwd_bwd_speedup_vs_reference']:5.2f}x vs {base})  load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    models = {}
    if all(key in args.cases for key in NAT_MINI_STAGES):
        # One whole model's NA: every stage's time times its layers.
        for name in impls:
            per = {key: next(r for r in rows if r["case"] == CASES[key].name
                             and r["impl"] == name) for key in NAT_MINI_STAGES}
            models[name] = {kind: sum(per[k][kind] * n for k, n in NAT_MINI_STAGES.items())
                            for kind in ("fwd_ms", "fwd_bwd_ms")}
            print(f"nat_mini, all 18 layers, batch 8: {name:10s} fwd {models[name]['fwd_ms']:8.1f}"
                  f" ms  fwd+bwd {models[name]['fwd_bwd_ms']:8.1f} ms")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "na_ab_cpu.json")
    write_json(out, dict(meta=environment(command=" ".join(["python", "benchmarks/na_ab.py",
                                                            *sys.argv[1:]])), results=rows,
                         nat_mini_batch8=models))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
