"""Every training config's train step compiled for 8 abstract H100s (no GPU needed).

For each ImageNet config (its recipe: AdamW, bf16 compute, mixup/cutmix, its fsdp setting) the
trainer's own sharded step is compiled by XLA's GPU compiler for an 8 x H100 80GB topology at
the recipe batch (1024 images = 128 per GPU, unless ``--per-device-batch``), with the Pallas NA
kernels (and the xla path for comparison with ``--backends pallas xla``). Reports per-GPU memory
(arguments, outputs, temporaries, peak) against 80 GB, Triton kernel launches, all-gathers and
whether any gathers activations over the batch, and compile time, to
``benchmarks/results/deviceless_h100x8.json``; prints a markdown table.

Usage::

    python benchmarks/deviceless_gpu.py                          # every config, pallas
    python benchmarks/deviceless_gpu.py --configs nat_tiny dinat_tiny --backends pallas xla
    python benchmarks/deviceless_gpu.py --configs nat_base --append   # add rows to the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nat_jax.kernels import gpu_gate
from nat_jax.timing import environment, write_json
from nat_jax.train import configs, deviceless

IMAGENET = [n for n in configs.CONFIGS if n != "digits"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=IMAGENET)
    parser.add_argument("--backends", nargs="+", default=["pallas"])
    parser.add_argument("--per-device-batch", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", default="benchmarks/results/deviceless_h100x8.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out (same config and backend replaced)")
    args = parser.parse_args(argv)

    kept = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            kept = json.load(f)["rows"]
    rows = []
    for name in args.configs:
        for backend in args.backends:
            try:
                row = deviceless.compile_program(
                    "h100x8", name, per_device_batch=args.per_device_batch, program="train",
                    overrides={"na_backend": backend}, timeout=args.timeout)
            except (RuntimeError, TimeoutError) as err:
                row = {"config": name, "na_backend": backend, "error": str(err).splitlines()[0]}
            rows.append(row)
            print(row, flush=True)
            done = {(r["config"], r["na_backend"]) for r in rows}
            merged = [r for r in kept if (r["config"], r["na_backend"]) not in done] + rows
            write_json(args.out, {**environment(compiled_for="8 abstract H100 80GB (sm_90)",
                                                cuda_plugin=gpu_gate.environment()["cuda_plugin"]),
                                  "target": "h100x8", "rows": merged})
    gib = 2 ** 30
    print("\n| config | NA backend | batch (per GPU) | fsdp | params | peak GiB per GPU | "
          "fits 80 GB | Triton launches | kernels spill-free | all-gathers (over the batch) | "
          "compile s | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['na_backend']} | - | - | - | - | failed: "
                  f"{r['error'][:80]} | - | - | - | - | |")
            continue
        print(f"| {r['config']} | {r['na_backend']} | {r['global_batch']} "
              f"({r['per_device_batch']}) | {r['fsdp']} | {r['params'] / 1e6:.1f}M | "
              f"{r['peak_bytes'] / gib:.1f} | {'yes' if r['fits'] else 'no'} | "
              f"{r['kernel_launches']} | {'yes' if not r['kernel_problems'] else 'NO'} | "
              f"{r['all_gathers']} ({len(r['batch_all_gathers'])}) | {r['compile_seconds']} | "
              f"{r['workaround'] or ''} |")
    return 0 if all("error" not in r and r["fits"] and not r["kernel_problems"]
                    and not r["batch_all_gathers"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
