"""Training throughput: the jitted, sharded train step (images/s per preset) and the host input
pipeline (images/s per CPU core).

Train step: each preset's ImageNet config (bf16 compute by default, AdamW, mixup/cutmix and
erasing on device) on a synthetic uint8 batch over all local devices; compile time is excluded,
the figure is the median of ``--repeats`` timed steps. Input pipeline: synthetic JPEGs
(500x375, like ImageNet) in an image folder, decoded and augmented (RandomResizedCrop 224,
flip, RandAugment rand-m9-mstd0.5-inc1, erasing box) by grain with 0 workers (the main
process) and ``--workers`` worker processes.

Results go to ``benchmarks/results/train_step_<platform>.json`` with the device name, jax
version and the host's load average (CPU numbers on a shared machine are noisy).

Usage::

    python benchmarks/train_step.py                                    # all presets, batch 64/device
    python benchmarks/train_step.py --presets nat_mini dinat_mini --batch 8 --dtype float32
    python benchmarks/train_step.py --skip-train --workers 2           # input pipeline only
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from nat_jax import configs as model_configs
from nat_jax import host
from nat_jax.timing import environment, write_json
from nat_jax.train import configs, input_pipeline, sharding, trainer


def bench_train_step(preset: str, batch: int, image_size: int, dtype: str, fsdp: int,
                     repeats: int) -> dict:
    c = configs.get_config(preset)
    c.update(global_batch_size=batch, image_size=image_size, compute_dtype=dtype, fsdp=fsdp)
    mesh = sharding.make_mesh(fsdp)
    run = trainer.setup_training(c, mesh, c.num_classes, total_steps=1000, warmup_steps=10)
    rng = np.random.default_rng(0)
    host_batch = {"image": rng.integers(0, 256, (batch, image_size, image_size, 3), np.uint8),
                  "label": rng.integers(0, c.num_classes, batch).astype(np.int32),
                  "erase": np.zeros((batch, 4), np.int32)}
    device_batch = trainer.put_batch(host_batch, mesh)
    state = run.state
    start = time.perf_counter()
    state, metrics = run.step_fn(state, device_batch, run.rest)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = run.step_fn(state, device_batch, run.rest)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {"preset": preset, "batch": batch, "image_size": image_size, "dtype": dtype,
            "fsdp": fsdp, "devices": mesh.size, "step_seconds": step_s,
            "images_per_second": batch / step_s, "first_step_seconds": compile_s,
            "loss": float(metrics["loss"])}


def _write_jpegs(root: str, count: int) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        os.makedirs(os.path.join(root, "train", cls), exist_ok=True)
    # Smooth random images compress like photos (pure noise would be unrealistically large).
    for i in range(count):
        small = rng.integers(0, 256, (24, 32, 3), np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        with open(os.path.join(root, "train", "ab"[i % 2], f"{i}.jpg"), "wb") as f:
            f.write(buf.getvalue())


def bench_input_pipeline(workers: int, images: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        _write_jpegs(root, 256)
        c = configs.get_config("nat_mini")
        c.update(dataset="image_folder", data_dir=root, global_batch_size=batch,
                 num_workers=workers)
        it = iter(input_pipeline.train_dataset(c, input_pipeline.make_source(c, "train")))
        # Start-up is not throughput, and neither are the batches already in flight: grain's
        # iterator prefetches with 16 threads (ReadOptions), so right after the first batch ~15
        # more are nearly done, and a short window measured that buffer (4570 images/s with 0
        # workers). Drain twice that, then time at least 64 batches.
        for _ in range(1 + 32):
            next(it)
        steps = max(images // batch, 64)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        seconds = time.perf_counter() - start
    rate = steps * batch / seconds
    cores = max(workers, 1)
    return {"workers": workers, "images": steps * batch, "images_per_second": rate,
            "images_per_second_per_core": rate / cores}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+",
                        default=[p for p in configs.CONFIGS if p != "digits"])
    parser.add_argument("--batch", type=int, default=0,
                        help="global batch (default: 64 per device)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="grain worker processes for the input-pipeline figure")
    parser.add_argument("--pipeline-images", type=int, default=256)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    result = environment(command=" ".join(["python", "benchmarks/train_step.py",
                                           *sys.argv[1:]]))
    result.update(train_step=[], input_pipeline=[])
    if not args.skip_train:
        batch = args.batch or 64 * jax.device_count()
        for preset in args.presets:
            model_configs.get(configs.get_config(preset).model)  # fail early on a typo
            row = bench_train_step(preset, batch, args.image_size, args.dtype, args.fsdp,
                                   args.repeats)
            print(f"train step {preset:12s} batch {batch:4d} {args.dtype}: "
                  f"{row['images_per_second']:8.1f} images/s "
                  f"(step {row['step_seconds'] * 1e3:.0f} ms, first step "
                  f"{row['first_step_seconds']:.0f} s)", flush=True)
            result["train_step"].append(row)
    if not args.skip_pipeline:
        for workers in sorted({0, args.workers}):
            row = bench_input_pipeline(workers, args.pipeline_images, batch=32)
            print(f"input pipeline, {workers} workers: {row['images_per_second']:.1f} images/s "
                  f"({row['images_per_second_per_core']:.1f} per core)", flush=True)
            result["input_pipeline"].append(row)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train_step_{device.platform}.json")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
