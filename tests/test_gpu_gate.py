"""The GPU compile gate: every Pallas kernel compiled by XLA's own Triton and ptxas, on CPU.

The default tier compiles a deterministic sample of the dispatchable configurations (every rank
and dtype at least once) for sm_80 and sm_90; the whole sweep (``gpu_gate.dispatch_cases()``,
default block sizes and every autotuning candidate) is the ``slow`` tier and
``python -m nat_jax.kernels.gpu_gate``. Also checked: the gate itself fails on what it must
catch (a module XLA's Triton rejects, a kernel that spills), and its resource arithmetic.
"""

from __future__ import annotations

import os

import pytest

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from nat_jax.kernels import gpu_gate

SAMPLE = float(os.environ.get("NAT_JAX_GPU_GATE_SAMPLE", "0.03"))  # 14 cases: every rank, dtype


def assert_gate_passes(rows):
    assert rows, "nothing was compiled"
    failed = {f"{r['case']}/{r['kernel']}/{r['arch']}": gpu_gate.problems(r)
              for r in rows if gpu_gate.problems(r)}
    assert not failed, failed
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["smem_bytes"] <= gpu_gate.ARCHS[r["arch"]]\
            .smem_per_block
        assert r["blocks_per_sm"] >= 1 and r["flops"] > 0 and r["bytes"] > 0


def test_sample_of_dispatchable_kernels_compiles_spill_free():
    cases = gpu_gate.sample(gpu_gate.dispatch_cases(), SAMPLE)
    assert {(len(c.shape), c.dtype) for c in cases} == {
        (r, d) for r in (1, 2, 3) for d in gpu_gate.DTYPES}
    rows = gpu_gate.run(cases, ("sm_80", "sm_90"), jobs=2)
    assert {r["kernel"] for r in rows} >= {"fwd", "dq", "dkv"}
    assert_gate_passes(rows)


@pytest.mark.slow
def test_every_dispatchable_kernel_compiles_spill_free():
    assert_gate_passes(gpu_gate.run(gpu_gate.dispatch_cases(), ("sm_80", "sm_90"), jobs=2))


# ------------------------------------------------------------------- the gate can fail


def _probe(body, out_shape, in_shapes, num_warps=4):
    def fn(*args):
        return pl.pallas_call(body, out_shape=out_shape, name="probe",
                              compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                                   num_stages=1))(*args)

    def make_args(sharding):
        return [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in in_shapes]

    return gpu_gate.compile_for_gpu(fn, make_args, gpu_gate.ARCHS["sm_90"])


def _weak_select(x_ref, o_ref):
    # A weakly typed literal beside an int32 value in a select: Pallas lowers the literal with
    # the predicate's type (i1), a module XLA's Triton refuses to parse. This is how every
    # dK/dV kernel once failed.
    x = x_ref[0]
    weak = (x > 0) * 1  # bool * Python int: a weakly typed int32 scalar
    o_ref[...] = jnp.full(o_ref.shape, jnp.where(x > 5, weak, 0), jnp.int32)


def _register_hog(x_ref, o_ref):
    # 16384 float32 values that must all stay live across a reduction, held by one warp: 512
    # per thread, twice what a thread can keep in registers.
    x = x_ref[...]
    o_ref[...] = x * jnp.sum(x)


def _compile_in_worker(which: str):
    """Runs in a gate worker (the CUDA plugin registered): compile one probe kernel."""
    if which == "weak_select":
        spec = jax.ShapeDtypeStruct((16,), jnp.int32)
        return _probe(_weak_select, spec, [spec])
    x = jax.ShapeDtypeStruct((32, 512), jnp.float32)
    return _probe(_register_hog, x, [x], num_warps=1)


@pytest.fixture(scope="module")
def gate_worker():
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"),
            initializer=gpu_gate._worker_init,  # noqa: SLF001
            initargs=(str(gpu_gate.plugin_dir()),)) as pool:
        yield pool


def test_gate_reports_a_module_triton_rejects(gate_worker):
    (row,) = gate_worker.submit(_compile_in_worker, "weak_select").result()
    assert row["kernel"] == "probe" and row["error"] and "xla" in row["error"]
    assert gpu_gate.problems(row) == [row["error"]]


def test_gate_reports_register_spills(gate_worker):
    (row,) = gate_worker.submit(_compile_in_worker, "hog").result()
    assert row["error"] is None
    assert row["spill_stores"] > 0 and any("spills" in p for p in gpu_gate.problems(row))


# ------------------------------------------------------------------ resource arithmetic


def test_occupancy_arithmetic():
    h100 = gpu_gate.ARCHS["sm_90"]
    # 128 registers x 32 lanes = 4096 per warp -> 16 warps by registers -> 4 blocks of 4 warps.
    occ = gpu_gate.occupancy(128, 36 * 1024, 4, h100)
    assert occ == {"blocks_per_sm": 4, "warps_per_sm": 16, "occupancy": 0.25,
                   "limited_by": "registers"}
    # 40 registers -> 1280 (rounded up to 256s) per warp; shared memory then limits:
    # 228 KB / (100 KB + 1 KB reserved) = 2 blocks.
    occ = gpu_gate.occupancy(40, 100 * 1024, 8, h100)
    assert occ["blocks_per_sm"] == 2 and occ["limited_by"] == "shared memory"
    assert gpu_gate.occupancy(32, 200 * 1024, 4, gpu_gate.ARCHS["sm_80"])["blocks_per_sm"] == 0


def test_ptxas_report_parsing():
    report = """ptxas info    : Compiling entry function 'na_pallas_fwd' for 'sm_90a'
ptxas info    : Function properties for na_pallas_fwd
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers"""
    assert gpu_gate.parse_ptxas(report) == {"registers": 168, "stack_bytes": 16,
                                            "spill_stores": 8, "spill_loads": 12}
    with pytest.raises(ValueError, match="registers"):
        gpu_gate.parse_ptxas("ptxas fatal   : Unresolved extern function")


def test_sampling_is_deterministic_and_covers_every_rank_and_dtype():
    cases = gpu_gate.dispatch_cases(with_candidates=False)
    a, b = gpu_gate.sample(cases, 0.1), gpu_gate.sample(cases, 0.1)
    assert [c.name for c in a] == [c.name for c in b]
    assert len(a) < len(cases) and gpu_gate.sample(cases, 1.0) == cases
    assert {(len(c.shape), c.dtype) for c in a} == {(len(c.shape), c.dtype) for c in cases}
    assert len({c.name for c in cases}) == len(cases)
