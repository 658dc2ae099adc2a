"""TPU compile gate: NA programs and the Pallas TPU kernels compiled for v5e-8 and v4-8 with
libtpu, on this CPU-only machine (``nat_jax.kernels.tpu_gate``).

Default tier (a small, deterministic sample): one DiNAT attention layer (qkv, dilated NA with
RPB, output projection) forward and backward, data parallel over every chip of each topology,
on the ``xla`` path and on ``pallas_tpu``; a few kernel configurations the layer does not reach
(1-D, 3-D, float32, other head dims); and the trainer's own train step of the small ``digits``
config on v4-8 with FSDP. The ``slow`` tier compiles the whole kernel sweep and nat_mini's train
step; ``make tpu-gate`` the minis' train steps and inference forwards at the recipe batch
(a whole-model TPU compile takes 7-20 minutes here).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from nat_jax.kernels import gpu_gate, tpu_gate, windows

TOPOLOGIES = ("v5e-8", "v4-8")
PER_DEVICE_BATCH = 4
# The layer: dinat_mini's first stage at 224 (56x56 tokens, 64 channels, 2 heads, K=7,
# dilation 8), bfloat16 compute.
LAYER = dict(preset="dinat_mini", size=56, dim=64, heads=2, dilation=8)


def layer_program(topology: str, backend: str, per_device_batch: int) -> dict:
    """Worker task: compile one NA layer's forward + backward (loss gradient w.r.t. the
    parameters and the input) with the batch split over every chip of ``topology``, the way
    the trainer runs the model: XLA partitions the projections, the NA op runs the Pallas
    kernels per shard (``nat_jax.kernels.sharding``)."""
    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from nat_jax import configs
    from nat_jax.kernels import xla
    from nat_jax.modeling import BuildOptions, NeighborhoodAttention

    # The bytes compared below are the kernels' own (see xla.NONFINITE_CONTAINMENT).
    xla.NONFINITE_CONTAINMENT = False

    mesh = Mesh(np.asarray(tpu_gate.abstract_devices(topology)), ("data",))
    cfg = configs.get(LAYER["preset"])
    options = BuildOptions(dtype="bfloat16", na_backend=backend)
    layer = nnx.eval_shape(lambda: NeighborhoodAttention(
        cfg, options, LAYER["dim"], LAYER["heads"], LAYER["dilation"], rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(layer)
    params = nnx.to_pure_dict(params)

    def step(params, x):
        def loss(params, x):
            y, _ = nnx.merge(graphdef, params)(x)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))

        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    batch = per_device_batch * len(mesh.devices.flat)
    x = jax.ShapeDtypeStruct((batch, LAYER["size"], LAYER["size"], LAYER["dim"]), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("data")))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)
    report = tpu_gate.compile_report(step, (params, x), mesh)
    report.update(topology=topology, backend=backend, batch=batch)
    return report


def auto_kernel_calls(topology: str) -> dict:
    """Worker task: Pallas calls in the jaxpr of one ``backend="auto"`` NA call traced with no
    mesh (the host is CPU-only) and with a mesh of ``topology``'s abstract TPU devices in
    context, and the platforms ``auto`` prepared each for."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from nat_jax import kernels

    q = jax.ShapeDtypeStruct((2, 28, 28, 2, 32), jnp.bfloat16)

    def op(q):
        return kernels.na2d(q, q, q, 7, dilation=2, backend="auto")

    out = {"plain": (str(jax.make_jaxpr(op)(q)).count("pallas_call"),
                     sorted(kernels.target_platforms()))}
    with jax.set_mesh(Mesh(np.asarray(tpu_gate.abstract_devices(topology)), ("data",))):
        out["mesh"] = (str(jax.make_jaxpr(op)(q)).count("pallas_call"),
                       sorted(kernels.target_platforms()))
    return out


def _layer_flops(per_device_batch: int) -> float:
    """Forward + backward FLOPs of the layer per device: 3x the forward's matmuls (qkv and
    projection) plus NATTEN's count for NA (backward 2.5x forward)."""
    tokens = per_device_batch * LAYER["size"] ** 2
    dense = 2 * tokens * LAYER["dim"] * (3 * LAYER["dim"] + LAYER["dim"])
    na = windows.na_flops(per_device_batch, LAYER["heads"], (LAYER["size"],) * 2, (7, 7),
                          LAYER["dim"] // LAYER["heads"])
    return 3 * dense + 3.5 * na


# A few kernel configurations beyond the layer's: 1-D and 3-D, float32, other head dims.
KERNEL_SAMPLE = [("causal-stride-even-dil", 1, "float32", 64), ("rpb-dil", 3, "bfloat16", 16),
                 ("causal-stride-even-dil", 2, "float32", 128)]


def _sample_cases():
    cases = tpu_gate.kernel_cases()
    return [next(c for c in cases if (c.feature, len(c.shape), c.dtype, c.head_dim) == key)
            for key in KERNEL_SAMPLE]


@pytest.fixture(scope="module")
def gate():
    """Every default-tier compile, in one worker process (a timeout per compile)."""
    tasks = [(layer_program, (t, b, PER_DEVICE_BATCH)) for t in TOPOLOGIES
             for b in ("xla", "pallas_tpu")]
    tasks += [(tpu_gate.compile_case, (c, t, ("pallas_tpu",))) for c in _sample_cases()
              for t in TOPOLOGIES]
    tasks.append((auto_kernel_calls, ("v5e-8",)))
    start = time.perf_counter()
    results = tpu_gate.run_isolated(tasks, timeout=900)
    for (fn, args), res in zip(tasks, results):
        assert res["ok"], f"{fn.__name__}{args}: {res['error']}"
    layers = {(r["topology"], r["backend"]): r for r in
              (res["value"] for res in results[:2 * len(TOPOLOGIES)])}
    kernels = [row for res in results[2 * len(TOPOLOGIES):-1] for row in res["value"]]
    return dict(layers=layers, kernels=kernels, auto=results[-1]["value"],
                seconds=time.perf_counter() - start)


def test_auto_prepares_tpu_kernels_under_a_tpu_mesh(gate):
    """``backend="auto"`` traces the TPU kernels only where the program may run on a TPU: a
    mesh of TPU devices in context (the deviceless compiles, a TPU host's jit), not in a plain
    CPU program."""
    plain_calls, plain_platforms = gate["auto"]["plain"]
    mesh_calls, mesh_platforms = gate["auto"]["mesh"]
    assert plain_calls == 0 and plain_platforms == ["cpu"]
    assert mesh_calls > 0 and mesh_platforms == ["cpu", "tpu"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_layer_compiles_on_both_paths(gate, topology):
    """The layer compiles on both paths and fits; the program on ``pallas_tpu`` holds the three
    Mosaic kernels (forward, dQ, dK/dV; containment off, as for every compile-only count) and
    counts at least the layer's own FLOPs (its cost estimate feeds XLA's cost analysis); both
    count at least their compulsory traffic (arguments in, results out). Which path moves fewer
    bytes is a measurement (``make tpu-gate``, the README), not asserted: for this dilated
    layer each dilation group is one 7x7 tile, so the xla path has no halo overhead and the two
    counts are within a few percent."""
    xla, kernel = gate["layers"][(topology, "xla")], gate["layers"][(topology, "pallas_tpu")]
    assert xla["mosaic_kernels"] == 0
    assert kernel["mosaic_kernels"] == tpu_gate.kernels_per_op(containment=False)
    assert xla["fits"] and kernel["fits"]
    want = _layer_flops(PER_DEVICE_BATCH)
    assert kernel["flops"] >= want, (kernel["flops"], want)
    for row in (xla, kernel):
        assert row["bytes_accessed"] >= row["argument_bytes"] + row["output_bytes"], row
    assert kernel["device_kind"] == {"v5e-8": "TPU v5 lite", "v4-8": "TPU v4"}[topology]


def test_kernel_sample_compiles(gate):
    """1-D/3-D, float32 and other head dims compile with Mosaic on both topologies, each with
    its three kernels and a FLOP count at least NATTEN's for forward + backward."""
    rows = gate["kernels"]
    assert {(r["case"], r["topology"]) for r in rows} == {
        (c.name, t) for c in _sample_cases() for t in TOPOLOGIES}
    for row in rows:
        assert not tpu_gate.problems(row), (row["case"], row["topology"], row.get("error"))
        case = next(c for c in _sample_cases() if c.name == row["case"])
        exact = 3.5 * windows.na_flops(case.batch, case.heads, case.shape, case.kernel_size,
                                       case.head_dim)
        assert row["flops"] >= exact


def test_gate_reports_compile_errors_and_timeouts():
    """The harness is not vacuous: a Mosaic rejection comes back as an error row, a compile
    that hangs is cut at its timeout, and the next task still runs in a fresh worker."""
    results = tpu_gate.run_isolated([(bad_kernel_program, ()), (time.sleep, (60,)),
                                     (math.factorial, (5,))], timeout=20)
    assert not results[0]["ok"] and "Mosaic" in results[0]["error"]
    assert not results[1]["ok"] and "timed out" in results[1]["error"]
    assert results[2] == {"ok": True, "value": 120}


def bad_kernel_program() -> dict:
    """A kernel Mosaic rejects: a lane gather whose source spans two vregs."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    def kernel(t_ref, o_ref):
        idx = 255 - lax.broadcasted_iota(jnp.int32, (8, 256), 1)
        o_ref[...] = jnp.take_along_axis(t_ref[...], idx, axis=1)

    mesh = Mesh(np.asarray(tpu_gate.abstract_devices("v5e-8")[:1]), ("x",))
    t = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    return tpu_gate.compile_report(
        lambda t: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 256),
                                                                        jnp.float32))(t),
        (t,), mesh)


def test_problems_and_roofline():
    chip = {"peak_flops": 2e14, "hbm_bytes_per_second": 1e12}
    r = tpu_gate.roofline(4e11, 1e9, chip)
    assert r["bound"] == "compute" and r["roofline_seconds"] == pytest.approx(2e-3)
    assert tpu_gate.roofline(1e9, 1e10, chip)["bound"] == "memory"
    row = dict(backend="pallas_tpu", fits=False, peak_bytes=2, memory_per_device=1,
               mosaic_kernels=2)
    assert len(tpu_gate.problems(row)) == 2
    assert tpu_gate.problems(dict(row, fits=True, mosaic_kernels=6)) == []
    assert tpu_gate.problems(dict(row, fits=True, containment=False, mosaic_kernels=3)) == []
    assert tpu_gate.problems({"error": "MosaicError: boom\nmore"}) == ["MosaicError: boom"]


def test_sample_is_deterministic_and_covers_every_family():
    cases = tpu_gate.kernel_cases()
    assert len(cases) == len(tpu_gate.DTYPES) * (
        3 * 3 * len(gpu_gate.HEAD_DIMS) + len(gpu_gate.MIXED_HEAD_DIMS))
    picked = tpu_gate.sample(cases, 0.1)
    assert picked == tpu_gate.sample(cases, 0.1)
    assert {(len(c.shape), c.dtype) for c in picked} == {
        (r, d) for r in (1, 2, 3) for d in tpu_gate.DTYPES}


@pytest.mark.slow
def test_kernel_sweep():
    """Every configuration ``auto`` may send to ``pallas_tpu`` compiles on v5e and v4 (the xla
    path beside it; with ``CI=true`` the conftest samples this test as a whole)."""
    rows = tpu_gate.run(tpu_gate.kernel_cases(), TOPOLOGIES, timeout=900)
    failed = [(r["case"], r["topology"], r.get("backend"), tpu_gate.problems(r)) for r in rows
              if tpu_gate.problems(r)]
    assert not failed


# ------------------------------------------------------------------ whole models (deviceless)


@pytest.mark.slow  # ~40 s; the default tier compiles NA layers for v5e-8 and v4-8 above
def test_trainer_step_of_digits_compiles_for_v4_8_fsdp():
    """The trainer's own train step (the small digits DiNAT) on v4-8 with FSDP and the
    pallas_tpu kernels: every NA layer's three Mosaic kernels run per shard, no activation is
    gathered over the batch, and it fits."""
    from nat_jax.train import deviceless

    report = deviceless.compile_program(
        "v4-8", "digits", per_device_batch=8, program="train", timeout=900,
        overrides={"fsdp": -1, "na_backend": "pallas_tpu"})
    assert report["fits"] and report["device_kind"] == "TPU v4"
    assert report["mosaic_kernels"] == tpu_gate.kernels_per_op() * 4
    assert not report["batch_all_gathers"]
    assert report["flops"] >= report["model_flops"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xla", "pallas_tpu"])
@pytest.mark.parametrize("topology", ["v5e-8", "v4-8"])
@pytest.mark.parametrize("config", ["nat_mini", "dinat_mini"])
def test_trainer_step_compiles_for_tpu(config, topology, backend):
    """The trainer's own train step of both families on both topologies (8 images per chip) on
    both paths: compiles, fits, counts at least the model's FLOPs, and on pallas_tpu launches
    the three Mosaic kernels of every NA layer per shard (no all-gather of activations over the
    batch). The recipe-batch rows are benchmarks/deviceless_tpu.py's."""
    from nat_jax.train import deviceless

    report = deviceless.compile_program(
        topology, config, per_device_batch=8, program="train", timeout=3600,
        overrides={"na_backend": backend})
    assert report["fits"] and report["flops"] >= report["model_flops"]
    assert not report["batch_all_gathers"], report["batch_all_gathers"]
    assert report["mosaic_kernels"] == (tpu_gate.kernels_per_op() * 18 if backend == "pallas_tpu"
                                        else 0)
    kind = {"v5e-8": "TPU v5 lite", "v4-8": "TPU v4"}[topology]
    assert report["device_kind"] == kind and report["roofline_seconds"] > 0


def test_hlo_summary_sees_combined_async_gathers():
    """XLA may combine gathers into one all-gather-start with a tuple result (as it does for the
    GPU NA program without a mesh): it counts once, and a batch-sized array among the gathered
    results (read at its all-gather-done) is a batch gather."""
    from nat_jax.train import deviceless

    hlo = """
  %all-gather-start.1 = ((bf16[4,4,1024,32]{3,2,1,0}, bf16[4,4,1024,32]{3,2,1,0}), (bf16[32,4,1024,32]{3,2,1,0}, bf16[32,4,1024,32]{3,2,1,0})) all-gather-start(%a, %b), channel_id=2
  %all-gather-done.1 = (bf16[32,4,1024,32]{3,2,1,0}, bf16[32,4,1024,32]{3,2,1,0}) all-gather-done(%all-gather-start.1)
  %ag = f32[8,64]{1,0} all-gather(%x), dimensions={0}
  %k = bf16[4,1024,64]{2,1,0} custom-call(%q), custom_call_target="tpu_custom_call"
  %while.3 = (s32[], /*index=1*/f32[4]{0}) while(%t), condition=%c, body=%b, metadata={op_name="jit(f)/while(x)"}
  ROOT %conditional.1 = (f32[2]{0}) conditional(%p, %a, %b), true_computation=%x
  %add.2 = f32[] add(%a, %b), metadata={op_name="jit(f)/while/body/conditional(y)"}
"""
    summary = deviceless.hlo_summary(hlo, global_batch=32)
    assert summary["all_gathers"] == 2 and summary["mosaic_kernels"] == 1
    # Loops and conditionals, which XLA's cost analysis counts once / both branches of.
    assert summary["while_loops"] == 1 and summary["conditionals"] == 1
    assert len(summary["batch_all_gathers"]) == 1
    assert summary["batch_all_gathers"][0].startswith("%all-gather-done.1")
