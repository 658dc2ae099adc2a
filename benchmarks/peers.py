"""nat-jax beside its peers, in one process, interleaved: training and inference images/s.

Models (random weights, 224x224, float32):

* nat-jax ``nat_mini`` / ``dinat_mini``: training = the trainer's own jitted step (AdamW, label
  smoothing, mixup/cutmix and erasing on device); inference = jitted forward. NA backend
  ``--backend`` (default ``auto``: the cpu backend's kernels on a CPU; ``xla``: the portable
  path).
* timm ``swin_tiny_patch4_window7_224`` (eager PyTorch).
* HuggingFace transformers ``NatForImageClassification`` / ``DinatForImageClassification``
  (nat-mini / dinat-mini configs), eager PyTorch, with the NATTEN functions they need from
  ``nat_jax.convert.torch_natten`` (plain torch).

PyTorch training is forward + cross-entropy + backward + ``torch.optim.AdamW``. Every round runs
two steps of every model in turn and times the second (the first step after switching
frameworks is slower), so load from other jobs hits all of them alike; the figures are medians
over rounds, with the host's load average before and after.

The "matmul bound" is this machine's fp32 matmul rate (the best of 15 2048^3 ``jnp`` matmuls,
same process) divided by each model's useful FLOPs per image (PyTorch's ``FlopCounterMode`` on
the forward; training counted as 3x forward). nat-jax's NAT/DiNAT have the HF models' FLOPs (same
architecture).

Requires ``pip install --no-deps timm`` (timm imports torchvision, which does not import beside
the CPU torch wheel: ``benchmarks/torchvision_standin`` satisfies the imports; nothing of
torchvision runs).

Usage::

    python benchmarks/peers.py                      # batch 16 training, batch 8 inference
    python benchmarks/peers.py --train-batch 8 --rounds 3 --models nat_mini swin_t
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "torchvision_standin"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from nat_jax import host  # noqa: E402
from nat_jax.timing import environment, matmul_ceiling, write_json  # noqa: E402

MODELS = ("nat_mini", "dinat_mini", "swin_t", "hf_nat_mini", "hf_dinat_mini")


# ------------------------------------------------------------------------------------ nat-jax


def natjax_runners(preset: str, train_batch: int, infer_batch: int, backend: str):
    """``(train_step(), infer())`` closures for a nat-jax preset, compiled and warm."""
    from flax import nnx

    from nat_jax.train import configs, sharding, trainer

    c = configs.get_config(preset)
    c.update(global_batch_size=train_batch, compute_dtype="float32")
    c.na_backend = backend
    mesh = sharding.make_mesh(1)
    run = trainer.setup_training(c, mesh, c.num_classes, total_steps=1000, warmup_steps=10)
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (train_batch, 224, 224, 3), np.uint8),
            "label": rng.integers(0, c.num_classes, train_batch).astype(np.int32),
            "erase": np.zeros((train_batch, 4), np.int32)}
    batch = trainer.put_batch(host, mesh)
    state = [run.state]

    def train():
        state[0], metrics = run.step_fn(state[0], batch, run.rest)
        jax.block_until_ready(metrics)

    # The train step donates its state: inference gets its own copy of the parameters.
    # Dropout and drop path are module state: eval() switches them off.
    model = nnx.merge(run.graphdef, run.state.params, run.rest)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, params)

    @jax.jit
    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x).logits

    x = jnp.asarray(rng.standard_normal((infer_batch, 224, 224, 3)), jnp.float32)

    def infer():
        jax.block_until_ready(forward(params, x))

    return train, infer


# ------------------------------------------------------------------------------------ PyTorch


def torch_model(name: str) -> torch.nn.Module:
    if name == "swin_t":
        import timm
        return timm.create_model("swin_tiny_patch4_window7_224")
    from nat_jax.convert import torch_natten
    config_cls, model_cls = torch_natten.import_hf_classes(
        "nat" if name == "hf_nat_mini" else "dinat")
    return model_cls(config_cls(num_labels=1000))  # transformers defaults: the -mini models


def torch_runners(name: str, train_batch: int, infer_batch: int):
    model = torch_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(train_batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (train_batch,), generator=g)
    xi = torch.randn(infer_batch, 3, 224, 224, generator=g)

    def logits(out):
        return out.logits if hasattr(out, "logits") else out

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(logits(model(x)), y, label_smoothing=0.1)
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode():
            logits(model(xi))

    return train, infer, model


def torch_forward_flops(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="auto",
                        help="nat-jax NA backend (auto: the cpu kernels on a CPU)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "peers_cpu.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    runners, flops = {}, {}
    hf_flops = {}
    for name in args.models:
        start = time.perf_counter()
        if name in ("nat_mini", "dinat_mini"):
            runners[name] = natjax_runners(name, args.train_batch, args.infer_batch,
                                           args.backend)
        else:
            train, infer, model = torch_runners(name, args.train_batch, args.infer_batch)
            runners[name] = (train, infer)
            flops[name] = torch_forward_flops(model)
        for fn in runners[name]:  # compile / warm up
            fn()
        print(f"{name}: ready in {time.perf_counter() - start:.0f} s", flush=True)
    # nat-jax models have the HF models' architecture and FLOPs.
    for ours, theirs in (("nat_mini", "hf_nat_mini"), ("dinat_mini", "hf_dinat_mini")):
        if ours in runners:
            if theirs not in flops:
                hf_flops[theirs] = torch_forward_flops(torch_model(theirs))
            flops[ours] = flops.get(theirs, hf_flops.get(theirs))

    load_before = os.getloadavg()
    times = {name: {"train": [], "infer": []} for name in runners}
    for r in range(args.rounds):
        for name, (train, infer) in runners.items():
            for kind, fn in (("train", train), ("infer", infer)):
                # One untimed call first: the first nat-jax step after a PyTorch one ran 0.7-2 s
                # slower (more CPU time in XLA's own threads, whichever allocator settings),
                # which penalized whichever model followed Swin-T in a round.
                fn()
                t0 = time.perf_counter()
                fn()
                times[name][kind].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()
    ceiling = matmul_ceiling()

    rows = {}
    for name in runners:
        tr = float(np.median(times[name]["train"]))
        inf = float(np.median(times[name]["infer"]))
        f = flops[name]
        rows[name] = dict(
            train_images_per_second=args.train_batch / tr,
            infer_images_per_second=args.infer_batch / inf,
            forward_gflops_per_image=f / 1e9,
            train_fraction_of_bound=args.train_batch / tr * 3 * f / ceiling,
            infer_fraction_of_bound=args.infer_batch / inf * f / ceiling,
            train_step_seconds=times[name]["train"], infer_seconds=times[name]["infer"])
    ratios = {}
    if "swin_t" in rows:
        for name in rows:
            ratios[f"{name}/swin_t train"] = (rows[name]["train_images_per_second"]
                                              / rows["swin_t"]["train_images_per_second"])
            ratios[f"{name}/swin_t infer"] = (rows[name]["infer_images_per_second"]
                                              / rows["swin_t"]["infer_images_per_second"])
    for ours, theirs in (("nat_mini", "hf_nat_mini"), ("dinat_mini", "hf_dinat_mini")):
        if ours in rows and theirs in rows:
            for kind in ("train", "infer"):
                ratios[f"{ours}/{theirs} {kind}"] = (rows[ours][f"{kind}_images_per_second"]
                                                     / rows[theirs][f"{kind}_images_per_second"])
    result = environment(command=" ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
                         torch=torch.__version__, torch_threads=torch.get_num_threads(),
                         train_batch=args.train_batch, infer_batch=args.infer_batch,
                         rounds=args.rounds, na_backend=args.backend,
                         load_before=load_before, load_after=load_after,
                         matmul_ceiling_gflops=ceiling / 1e9, models=rows, ratios=ratios)
    write_json(args.out, result)
    print(f"matmul ceiling {ceiling / 1e9:.0f} GFLOP/s; load {load_before} -> {load_after}")
    print(f"{'model':15s} {'GFLOP/img':>9s} {'train img/s':>11s} {'of bound':>8s} "
          f"{'infer img/s':>11s} {'of bound':>8s}")
    for name, r in rows.items():
        print(f"{name:15s} {r['forward_gflops_per_image']:9.2f} "
              f"{r['train_images_per_second']:11.2f} {r['train_fraction_of_bound']:8.2f} "
              f"{r['infer_images_per_second']:11.2f} {r['infer_fraction_of_bound']:8.2f}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    host.relaunch_with_huge_pages()  # timings with malloc's huge pages (nat_jax.host)
    sys.exit(main())
