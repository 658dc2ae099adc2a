"""GPU compile gate: every Pallas NA kernel compiled by XLA's GPU compiler, without a GPU.

A GPU run compiles each Pallas kernel in two steps: Pallas lowers the kernel body to a Triton
module (a ``stablehlo.custom_call @__gpu$xla.gpu.triton`` holding MLIR bytecode), then XLA's GPU
compiler runs its bundled Triton on that module and ptxas on the PTX. Both run on a CPU-only
machine, for a GPU that is only described:

1. The CUDA plugin wheels (``jax-cuda13-plugin`` and ``jax-cuda13-pjrt`` of exactly jax's
   version, installed with ``--no-deps``: no driver, no GPU) provide XLA's GPU compiler.
   ``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`` with a
   ``GpuTargetConfigProto`` (:meth:`Arch.target_config`) gives an abstract A100 or H100.
2. ``jax.jit(f).trace(...).lower().compile()`` for that device is XLA's whole GPU compile, the
   Pallas kernels' Triton compile included: a module that fails verification fails here as it
   would on the GPU. XLA's thunk dump gives each kernel's launch size and shared memory.
3. XLA hands its PTX to ``ptxas``; a small shim in ``xla_gpu_cuda_data_dir`` keeps a copy, and
   ``ptxas -v`` on it reports registers, spills and stack per kernel (:func:`compile_for_gpu`).

(jaxlib 0.10 also exposes Triton's compile step to Python, ``jax._src.lib.triton.compile``;
jaxlib 0.11+ does not, and on 0.10 it reported 10-20% more registers than the PTX XLA actually
builds for the same module, so the gate always compiles through XLA.)

The gate fails on a compile or verification error, on shared memory above the architecture's
per-block limit, on any register spill and on a kernel that cannot be resident at all; it
records per kernel the registers, shared memory, the occupancy they allow (:func:`occupancy`),
and the FLOPs and bytes the launch moves (:func:`pallas.kernel_costs`).

What it cannot tell: numerics of the compiled code and speed. Those need a GPU.

The compiles run in fresh worker processes: the plugin must be registered before jax starts a
backend, and a worker keeps the caller's jax untouched. Command line::

    python -m nat_jax.kernels.gpu_gate --json benchmarks/results/gpu_gate.json
    python -m nat_jax.kernels.gpu_gate --sample 0.1      # a deterministic tenth of the sweep
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

TRITON_TARGET = "__gpu$xla.gpu.triton"
PLUGIN_DIR_ENV = "NAT_JAX_CUDA_PLUGIN_DIR"


# ----------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Arch:
    """One GPU part: per-SM limits (CUDA occupancy calculator values) and the device
    description XLA's GPU compiler plans for (:meth:`target_config`)."""

    name: str  # "sm_90"
    capability: str  # what XLA's Triton takes: "9.0"
    ptxas_target: str  # what ptxas takes: "sm_90a"
    device: str  # the part described: "NVIDIA H100 80GB HBM3"
    sms: int
    smem_per_block: int  # opt-in maximum dynamic shared memory of one block, bytes
    smem_per_sm: int
    memory: int  # device memory, bytes
    memory_bandwidth: int  # bytes/s
    l2_cache: int  # bytes
    clock_ghz: float
    smem_reserved_per_block: int = 1024  # the driver's per-block reservation (sm_80 and newer)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32

    def target_config(self) -> str:
        """``GpuTargetConfigProto`` (text format) for
        ``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)``:
        abstract devices of this part for ahead-of-time compilation."""
        major, minor = self.capability.split(".")
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.smem_per_sm}
  shared_memory_per_block_optin: {self.smem_per_block}
  threads_per_core_limit: {self.max_warps_per_sm * 32}
  core_count: {self.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: {self.regs_per_sm}
  registers_per_block_limit: {self.regs_per_sm}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{self.device}"
"""


# A100 SXM4 80GB and H100 SXM5 80GB, from their CUDA device properties.
ARCHS: dict[str, Arch] = {
    "sm_80": Arch("sm_80", "8.0", "sm_80", "NVIDIA A100-SXM4-80GB", sms=108,
                  smem_per_block=163 * 1024, smem_per_sm=164 * 1024, memory=85_089_632_256,
                  memory_bandwidth=2_039_000_000_000, l2_cache=41_943_040, clock_ghz=1.41),
    "sm_90": Arch("sm_90", "9.0", "sm_90a", "NVIDIA H100 80GB HBM3", sms=132,
                  smem_per_block=227 * 1024, smem_per_sm=228 * 1024, memory=84_942_979_072,
                  memory_bandwidth=3_352_320_000_000, l2_cache=52_428_800, clock_ghz=1.98),
}


def occupancy(registers: int, smem_bytes: int, num_warps: int, arch: Arch) -> dict[str, Any]:
    """Blocks and warps per SM that the kernel's registers and shared memory allow.

    Returns ``{"blocks_per_sm", "warps_per_sm", "occupancy", "limited_by"}`` (``occupancy`` is
    resident warps over the SM's maximum). ``blocks_per_sm == 0`` means the block cannot launch.
    """
    regs_per_warp = -(-max(registers, 1) * 32 // arch.reg_alloc_unit) * arch.reg_alloc_unit
    limits = {
        "registers": (arch.regs_per_sm // regs_per_warp) // num_warps,
        "shared memory": arch.smem_per_sm // (smem_bytes + arch.smem_reserved_per_block),
        "warps": arch.max_warps_per_sm // num_warps,
        "blocks": arch.max_blocks_per_sm,
    }
    if smem_bytes > arch.smem_per_block:
        limits["shared memory"] = 0
    limited_by = min(limits, key=lambda k: limits[k])
    blocks = limits[limited_by]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / arch.max_warps_per_sm, "limited_by": limited_by}


# ------------------------------------------------------------------- Triton modules in a program


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas (Triton lowering) kernel launch found in a lowered program."""

    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    ir: bytes  # the Triton module, MLIR bytecode


def export_for_cuda(fn: Callable, *args: Any) -> str:
    """StableHLO text of ``jax.jit(fn)`` exported for CUDA; ``args`` are arrays or
    ``jax.ShapeDtypeStruct`` (``None`` passes through)."""
    import jax

    from nat_jax.kernels import ops

    specs = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with ops.lowering_platforms("cuda"):
        exported = jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)],
        )(*specs)
    return exported.mlir_module()


def triton_kernels(mlir_text: str) -> list[TritonKernel]:
    """Every ``__gpu$xla.gpu.triton`` custom call in a StableHLO module (text), in program
    order."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    found: list[TritonKernel] = []
    with mlir.make_ir_context():
        module = ir.Module.parse(mlir_text)

        def walk(op) -> None:
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        child = child.operation
                        if child.name == "stablehlo.custom_call":
                            target = ir.StringAttr(child.attributes["call_target_name"]).value
                            if target == TRITON_TARGET:
                                found.append(_kernel_from_config(
                                    ir.DictAttr(child.attributes["mhlo.backend_config"]), ir))
                        walk(child)

        walk(module.operation)
    return found


def _kernel_from_config(config, ir) -> TritonKernel:
    def integer(name: str) -> int:
        return ir.IntegerAttr(config[name]).value

    return TritonKernel(name=ir.StringAttr(config["name"]).value,
                        num_warps=integer("num_warps"), num_stages=integer("num_stages"),
                        grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
                        ir=ir.StringAttr(config["ir"]).value_bytes)


# ------------------------------------------------------------------------- compile and ptxas


def plugin_dir() -> Path:
    """Where the CUDA plugin wheels are installed for the gate (``pip install --no-deps
    --target DIR jax-cuda13-plugin==V jax-cuda13-pjrt==V``): ``$NAT_JAX_CUDA_PLUGIN_DIR``, else
    ``<venv>/cuda-plugin`` (what ``make install`` creates)."""
    return Path(os.environ.get(PLUGIN_DIR_ENV, Path(sys.prefix) / "cuda-plugin"))


def find_ptxas() -> str:
    """``ptxas`` from PATH, else the copy in an installed ``nvidia-cuda-nvcc`` wheel."""
    found = shutil.which("ptxas")
    if found:
        return found
    for root in [plugin_dir(), *map(Path, sys.path)]:
        candidate = root / "nvidia" / "cu13" / "bin" / "ptxas"
        for path in (candidate, root / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"):
            if path.is_file():
                return str(path)
    raise RuntimeError("ptxas not found: put the CUDA toolkit's bin/ on PATH or "
                       "`pip install nvidia-cuda-nvcc` (make install does this when needed)")


def activate_cuda_plugin(path: Path | None = None) -> None:
    """Register the CUDA plugin (XLA's GPU compiler, its Triton included) in this process.

    Must run before jax initializes a backend; :func:`run` calls it in fresh worker processes.
    Raises ``RuntimeError`` naming what to install if the plugin is missing or its version is
    not jax's.
    """
    path = path or plugin_dir()
    if path.is_dir() and str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import jax
    from jax._src import xla_bridge

    if not jax.config.jax_platforms:
        # No GPU here: keep the plugin from probing for a driver and cuDNN.
        jax.config.update("jax_platforms", "cpu")
    xla_bridge._discover_and_register_pjrt_plugins()  # noqa: SLF001 (the documented way here)
    if "cuda" not in xla_bridge._backend_factories:  # noqa: SLF001
        raise RuntimeError(
            f"XLA's GPU compiler is not available: install the CUDA plugin of jax's version, "
            f"`pip install --no-deps --target {path} jax-cuda13-plugin=={jax.__version__} "
            f"jax-cuda13-pjrt=={jax.__version__}` (make install does this)")


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(report: str) -> dict[str, int]:
    """Registers, stack and spill bytes from ``ptxas -v`` output (one entry function)."""
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        match = pattern.search(report)
        if match is None:
            raise ValueError(f"ptxas output has no {key!r}:\n{report}")
        out[key] = int(match.group(1))
    return out


def problems(row: dict[str, Any]) -> list[str]:
    """Why a compiled kernel fails the gate (empty: it passes)."""
    if row.get("error"):
        return [row["error"]]
    arch = ARCHS[row["arch"]]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads "
                   f"({row['registers']} registers)")
    if row["smem_bytes"] > arch.smem_per_block:
        out.append(f"shared memory {row['smem_bytes']} B > {arch.smem_per_block} B per block")
    if row["blocks_per_sm"] < 1:
        out.append(f"cannot be resident (limited by {row['limited_by']})")
    return out


# ----------------------------------------------------------------------------- the kernel sweep


@dataclasses.dataclass(frozen=True)
class Case:
    """One NA call whose forward and backward kernels the gate compiles."""

    feature: str
    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    rpb: bool
    dtype: str
    head_dim: int
    head_dim_v: int
    batch: int = 2
    heads: int = 2
    block_sizes: Any = None  # pallas.BlockSizes; None: what the dispatcher picks

    @property
    def name(self) -> str:
        dims = f"d{self.head_dim}" + (f"v{self.head_dim_v}" if self.head_dim_v != self.head_dim
                                      else "")
        name = f"{len(self.shape)}d-{self.feature}-{self.dtype}-{dims}"
        if self.block_sizes is not None:
            b = self.block_sizes
            name += "-q{}-kv{}".format(*("x".join(map(str, t)) for t in (b.q, b.kv)))
        return name


# Per rank: a plain odd window, RPB with dilation (RPB implies odd kernels, stride 1,
# non-causal), and causal + stride + even kernel + dilation. Shapes leave several tiles per axis
# so boxes, clamping and padding are real.
_FEATURES: dict[int, list[tuple[str, tuple, dict, bool]]] = {
    1: [("plain", (1000,), dict(kernel_size=13), False),
        ("rpb-dil", (997,), dict(kernel_size=7, dilation=3), True),
        ("causal-stride-even-dil", (1003,), dict(kernel_size=8, stride=3, dilation=2,
                                                 is_causal=True), False)],
    2: [("plain", (56, 56), dict(kernel_size=7), False),
        ("rpb-dil", (28, 30), dict(kernel_size=(7, 5), dilation=(2, 3)), True),
        ("causal-stride-even-dil", (27, 28), dict(kernel_size=(6, 7), stride=(2, 1),
                                                  dilation=(2, 1), is_causal=(True, False)),
         False)],
    3: [("plain", (8, 16, 16), dict(kernel_size=3), False),
        ("rpb-dil", (8, 12, 12), dict(kernel_size=3, dilation=(1, 2, 2)), True),
        ("causal-stride-even-dil", (9, 12, 10), dict(kernel_size=(3, 4, 3), stride=(1, 2, 3),
                                                     dilation=(2, 1, 1),
                                                     is_causal=(True, False, True)), False)],
}
DTYPES = ("float32", "bfloat16", "float16")
HEAD_DIMS = (16, 32, 64, 128, 256)
# Value head_dim different from the query's (padded separately inside the kernels).
MIXED_HEAD_DIMS = ((24, 40), (64, 128), (128, 64), (256, 32))


def _case(feature, shape, kw, rpb, dtype, head_dim, head_dim_v, block_sizes=None) -> Case:
    from nat_jax.kernels.params import make_params

    p = make_params(shape, head_dim, kw["kernel_size"], kw.get("stride", 1),
                    kw.get("dilation", 1), kw.get("is_causal", False))
    return Case(feature, tuple(shape), p.kernel_size, p.stride, p.dilation, p.is_causal, rpb,
                dtype, head_dim, head_dim_v, block_sizes=block_sizes)


def dispatch_cases(with_candidates: bool = True) -> list[Case]:
    """Every kernel specialization ``backend="auto"`` / ``"pallas"`` can launch: ranks 1-3,
    each feature family, every supported dtype, every padded head_dim from 16 to 256 (plus
    mixed query/value head dims), with the default block sizes; and, with
    ``with_candidates``, each autotuning candidate on a 2-D and a 1-D shape. Combinations the
    kernels refuse (:func:`pallas.unsupported`) are not dispatchable and not included."""
    import jax

    from nat_jax.kernels import autotune, pallas
    from nat_jax.kernels.params import make_params

    def dispatchable(shape, kw, rpb, dtype, dq, dv) -> bool:
        p = make_params(shape, dq, kw["kernel_size"], kw.get("stride", 1),
                        kw.get("dilation", 1), kw.get("is_causal", False))
        q = jax.ShapeDtypeStruct((2, *shape, 2, dq), dtype)
        v = jax.ShapeDtypeStruct((2, *shape, 2, dv), dtype)
        bias = jax.ShapeDtypeStruct((2, *(2 * k - 1 for k in p.kernel_size)), dtype)
        return pallas.unsupported(q, v, p, bias if rpb else None) is None

    cases = []
    for features in _FEATURES.values():
        for feature, shape, kw, rpb in features:
            for dtype in DTYPES:
                for d in HEAD_DIMS:
                    if dispatchable(shape, kw, rpb, dtype, d, d):
                        cases.append(_case(feature, shape, kw, rpb, dtype, d, d))
    for dtype in DTYPES:
        for dq, dv in MIXED_HEAD_DIMS:
            if dispatchable((28, 28), dict(kernel_size=7), True, dtype, dq, dv):
                cases.append(_case("plain", (28, 28), dict(kernel_size=7), True, dtype, dq, dv))
    if with_candidates:
        for rank in (1, 2):
            feature, shape, kw, rpb = _FEATURES[rank][0]
            for dtype in DTYPES:
                for d in HEAD_DIMS:
                    if not dispatchable(shape, kw, rpb, dtype, d, d):
                        continue
                    p = make_params(shape, d, kw["kernel_size"])
                    q = jax.ShapeDtypeStruct((2, *shape, 2, d), dtype)
                    for blocks in autotune.candidates(q, q, p)[1:]:  # [0] is the default
                        cases.append(_case("candidate", shape, kw, rpb, dtype, d, d, blocks))
    return cases


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` (deterministic sampling across runs/machines)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0x100000000


def sample(cases: Sequence[Case], fraction: float) -> list[Case]:
    """A deterministic sample: cases whose name hashes below ``fraction``, plus the first case
    of each (rank, dtype) so every kernel family and dtype is always compiled."""
    if fraction >= 1:
        return list(cases)
    seen, out = set(), []
    for c in cases:
        group = (len(c.shape), c.dtype)
        if stable_fraction(c.name) < fraction or group not in seen:
            out.append(c)
        seen.add(group)
    return out


def case_function(case: Case, sharding: Any = None) -> tuple[Callable, list]:
    """Forward (out, lse) and the whole VJP of one case, and abstract arguments for it
    (placed with ``sharding`` when compiling for an abstract device)."""
    import jax
    import jax.numpy as jnp

    from nat_jax.kernels import pallas
    from nat_jax.kernels.params import NAParams

    p = NAParams(case.kernel_size, case.stride, case.dilation, case.is_causal,
                 case.head_dim ** -0.5)
    dtype = jnp.dtype(case.dtype)

    def spec(shape):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    q = spec((case.batch, *case.shape, case.heads, case.head_dim))
    v = spec((case.batch, *case.shape, case.heads, case.head_dim_v))
    bias = spec((case.heads, *(2 * k - 1 for k in case.kernel_size))) if case.rpb else None

    def fwd_bwd(q, k, v, bias):
        def f(q, k, v, bias):
            return pallas.na_fused(q, k, v, p, bias, block_sizes=case.block_sizes)

        (out, lse), vjp = jax.vjp(f, q, k, v, bias)
        return out, lse, vjp((out, lse))

    return fwd_bwd, [q, q, v, bias]


def case_costs(case: Case) -> dict[str, dict[str, int]]:
    """FLOPs and bytes of every kernel of a case (see :func:`pallas.kernel_costs`)."""
    import jax
    import jax.numpy as jnp

    from nat_jax.kernels import pallas
    from nat_jax.kernels.params import NAParams

    p = NAParams(case.kernel_size, case.stride, case.dilation, case.is_causal,
                 case.head_dim ** -0.5)
    q = jax.ShapeDtypeStruct((case.batch, *case.shape, case.heads, case.head_dim),
                             jnp.dtype(case.dtype))
    v = jax.ShapeDtypeStruct((*q.shape[:-1], case.head_dim_v), q.dtype)
    blocks = case.block_sizes or pallas.default_block_sizes(q, v, p)
    return pallas.kernel_costs(q.shape, case.head_dim_v, q.dtype, p, case.rpb, blocks)


# ----------------------------------------------------------- compiling through XLA


_THUNK = re.compile(r"(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+"
                    r"shared_memory: (\d+) bytes")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def parse_ptxas_functions(report: str) -> dict[str, dict[str, int]]:
    """Per entry function: registers, stack and spill bytes from ``ptxas -v`` output."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(report)]
    return {name: parse_ptxas(report[pos:starts[i + 1][0] if i + 1 < len(starts) else None])
            for i, (pos, name) in enumerate(starts)}


def _libdevice_dir() -> Path | None:
    """A CUDA ``nvvm`` directory holding libdevice (XLA links it into non-Triton fusions)."""
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(
        str(p) for p in Path("/usr/local").glob("cuda-*"))]
    roots += [str(Path(p) / "nvidia" / sub) for p in sys.path for sub in ("cu13", "cuda_nvcc")]
    for root in roots:
        if root and Path(root, "nvvm", "libdevice").is_dir():
            return Path(root, "nvvm")
    return None


def _ptxas_shim(workdir: Path) -> Path:
    """A CUDA directory for ``xla_gpu_cuda_data_dir`` whose ``bin/ptxas`` keeps a copy of every
    PTX file XLA compiles (into ``$NAT_JAX_PTX_CAPTURE``) before running the real ptxas."""
    shim = workdir / "cuda"
    (shim / "bin").mkdir(parents=True, exist_ok=True)
    script = shim / "bin" / "ptxas"
    script.write_text(
        "#!/bin/sh\n"
        'if [ -n "$NAT_JAX_PTX_CAPTURE" ] && [ -f "$1" ]; then\n'
        '  cp "$1" "$(mktemp "$NAT_JAX_PTX_CAPTURE/XXXXXXXX.ptx")"\n'
        "fi\n"
        f'exec "{find_ptxas()}" "$@"\n')
    script.chmod(0o755)
    nvvm = _libdevice_dir()
    if nvvm is not None and not (shim / "nvvm").exists():
        (shim / "nvvm").symlink_to(nvvm)
    return shim


def abstract_gpu(arch: Arch):
    """One abstract device of ``arch`` (needs :func:`activate_cuda_plugin`)."""
    from jax.experimental import topologies

    (device,) = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                             target_config=arch.target_config()).devices
    return device


def inspect_gpu_compile(lowered: Any, arch: Arch, options: dict[str, Any] | None = None
                        ) -> tuple[Any, list[dict[str, Any]], int]:
    """Compile a program lowered for an abstract ``arch`` device with XLA's GPU compiler and
    report every Pallas (Triton) kernel in it as a GPU session would build it.

    Returns ``(compiled, rows, launches)``: ``compiled`` is ``None`` when XLA refused the
    program (every row then carries the compiler's message as ``error``; a program without
    kernels gets one row, kernel ``"(program)"``); ``launches`` counts
    the kernel launches in XLA's thunk sequence. One row per compiled kernel (PTX entry):
    ``kernel``, ``arch``, ``num_warps``, ``num_stages``, ``grid``, ``registers``,
    ``spill_stores``, ``spill_loads``, ``stack_bytes``, ``smem_bytes`` (the largest launch of
    that name), the :func:`occupancy` fields, and ``error`` (``None`` when it compiled).
    """
    kernels = {k.name.strip('"'): k for k in triton_kernels(lowered.as_text())}

    def base(name: str) -> str:  # XLA numbers distinct kernels of one name: name__1, ...
        return name if name in kernels else re.sub(r"_+\d+$", "", name)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        capture, dump = tmp / "ptx", tmp / "dump"
        capture.mkdir()
        os.environ["NAT_JAX_PTX_CAPTURE"] = str(capture)
        compiled, error = None, None
        try:
            compiled = lowered.compile({**(options or {}), "xla_dump_to": str(dump),
                                        "xla_gpu_cuda_data_dir": str(_ptxas_shim(tmp)),
                                        "xla_gpu_enable_libnvptxcompiler": False})
        except Exception as err:  # the compiler's message is the report
            error = f"xla: {type(err).__name__}: {str(err)[:2000]}"
        finally:
            del os.environ["NAT_JAX_PTX_CAPTURE"]
        if error is not None:
            # A program without Pallas kernels still reports why XLA refused it.
            return None, [{"kernel": name, "arch": arch.name, "num_warps": k.num_warps,
                           "num_stages": k.num_stages, "grid": list(k.grid), "error": error}
                          for name, k in kernels.items()] or [
                              {"kernel": "(program)", "arch": arch.name, "error": error}], 0
        # Launches (thunks) and PTX entries by name; one kernel may be launched many times
        # (a model's layers) and several distinct kernels may share a name.
        launches: dict[str, list[tuple]] = {}
        for path in sorted(dump.glob("*thunk_sequence.txt")):
            for m in _THUNK.finditer(path.read_text()):
                if base(m.group(1)) in kernels:
                    launches.setdefault(m.group(1), []).append(m.groups())
        entries: list[tuple[str, dict[str, int]]] = []
        for ptx in sorted(capture.glob("*.ptx")):
            text = ptx.read_text()
            if any(f".entry {name}(" in text for name in launches):
                proc = subprocess.run([find_ptxas(), "-v", f"--gpu-name={arch.ptxas_target}",
                                       str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                                      capture_output=True, text=True, check=False)
                entries += [(name, stats) for name, stats in
                            parse_ptxas_functions(proc.stderr + proc.stdout).items()
                            if name in launches]
    rows = []
    for name, stats in entries:
        _, gx, gy, gz, threads, *_, smem = max(launches[name], key=lambda g: int(g[-1]))
        row = {"kernel": name, "arch": arch.name, "num_warps": int(threads) // 32,
               "num_stages": kernels[base(name)].num_stages,
               "grid": [int(gx), int(gy), int(gz)], "error": None, **stats,
               "smem_bytes": int(smem)}
        row.update(occupancy(row["registers"], row["smem_bytes"], row["num_warps"], arch))
        rows.append(row)
    for name in sorted(set(launches) - {name for name, _ in entries}):
        rows.append({"kernel": name, "arch": arch.name,
                     "error": f"xla: no PTX for kernel {name} reached ptxas"})
    for name in sorted(set(kernels) - {base(n) for n in launches}):
        rows.append({"kernel": name, "arch": arch.name,
                     "error": f"xla: kernel {name} is not launched by the compiled program"})
    launched = sum(len(v) for v in launches.values())
    return compiled, rows, launched


def compile_for_gpu(fn: Callable, make_args: Callable[[Any], Sequence], arch: Arch
                    ) -> list[dict[str, Any]]:
    """Compile ``jax.jit(fn)`` for one abstract ``arch`` device (:func:`inspect_gpu_compile`);
    ``make_args(sharding)`` returns the abstract arguments placed with ``sharding``."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, SingleDeviceSharding

    device = abstract_gpu(arch)
    # Pallas's Triton lowering (jax >= 0.11) reads the target GPU from the context mesh.
    with jax.set_mesh(Mesh(np.asarray([device]), ("gpu",))):
        lowered = jax.jit(fn).trace(*make_args(SingleDeviceSharding(device))).lower()
    return inspect_gpu_compile(lowered, arch)[1]


def _check_case(case: Case, archs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Worker task: every kernel of ``case`` on every arch (rows for the report)."""
    start = time.perf_counter()
    base = {"case": case.name, "rank": len(case.shape), "feature": case.feature,
            "dtype": case.dtype, "head_dim": case.head_dim, "head_dim_v": case.head_dim_v,
            "shape": list(case.shape), "kernel_size": list(case.kernel_size),
            "rpb": case.rpb}
    try:
        costs = case_costs(case)
        fn, _ = case_function(case)
        compiled = [row for a in archs for row in compile_for_gpu(
            fn, lambda sharding: case_function(case, sharding)[1], ARCHS[a])]
    except Exception as err:  # a lowering failure is a gate failure, reported per case
        return [dict(base, kernel="(lowering)", arch=a, error=f"lowering: {type(err).__name__}: "
                     f"{err}") for a in archs]
    rows = []
    # The non-finite containment branch launches the same kernels again: report each once.
    unique = {tuple(sorted((k, str(v)) for k, v in row.items())): row for row in compiled}
    for row in unique.values():
        short = row["kernel"].removeprefix("na_pallas_")
        row = dict(base, **row)
        row["kernel"] = short
        rows.append(dict(row, **costs.get(short, {})))
    for row in rows:
        row["seconds"] = round((time.perf_counter() - start) / max(1, len(rows)), 3)
    return rows


def _worker_init(path: str) -> None:
    activate_cuda_plugin(Path(path))


def run(cases: Iterable[Case], archs: Sequence[str] = ("sm_80", "sm_90"), jobs: int | None = None,
        progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Compile every case's kernels in ``jobs`` fresh worker processes; one row per
    (kernel, arch). ``progress(done, total)`` is called as cases finish."""
    cases = list(cases)
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"arch={a!r} is not one of {sorted(ARCHS)}")
    find_ptxas()  # fail early, in the caller, with the install hint
    jobs = jobs or min(len(cases), os.cpu_count() or 1) or 1
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                initargs=(str(plugin_dir()),)) as pool:
        futures = [pool.submit(_check_case, c, tuple(archs)) for c in cases]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            rows.extend(future.result())
            if progress:
                progress(done, len(cases))
    order = {c.name: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: (order[r["case"]], r["kernel"], r["arch"]))
    return rows


def environment() -> dict[str, Any]:
    """Versions that decide what the gate sees: jax, jaxlib, the plugin, ptxas."""
    import jax
    import jaxlib

    plugin = None
    for dist in plugin_dir().glob("jax_cuda13_plugin-*.dist-info"):
        plugin = dist.name.removesuffix(".dist-info").split("-")[1]
    try:
        ptxas_version = subprocess.run([find_ptxas(), "--version"], capture_output=True,
                                       text=True, check=False).stdout.strip().splitlines()[-1]
    except RuntimeError:
        ptxas_version = None
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "cuda_plugin": plugin,
            "ptxas": ptxas_version, "python": sys.version.split()[0]}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts for the report header: kernels compiled, failures by kind, worst resources."""
    failed = [r for r in rows if problems(r)]
    ok = [r for r in rows if not r.get("error")]
    return {
        "kernels": len(rows),
        "cases": len({r["case"] for r in rows}),
        "failed": len(failed),
        "compile_errors": sum(bool(r.get("error")) for r in rows),
        "spilling": sum(bool(r.get("spill_stores") or r.get("spill_loads")) for r in ok),
        "max_registers": max((r["registers"] for r in ok), default=None),
        "max_smem_bytes": max((r["smem_bytes"] for r in ok), default=None),
        "min_occupancy": min((r["occupancy"] for r in ok), default=None),
    }


def markdown_summary(rows: Sequence[dict[str, Any]], arch: str = "sm_90") -> str:
    """A README table: per dtype and head_dim (query = value), the worst case over ranks and
    features of each kernel's registers / shared memory (KB) / occupancy on ``arch``."""
    kernels = ("fwd", "dq", "dkv", "drpb")
    cells: dict[tuple[str, int], dict[str, tuple[int, float, float]]] = {}
    for r in rows:
        if r["arch"] != arch or r.get("error") or r["head_dim"] != r["head_dim_v"] \
                or r["feature"] == "candidate":
            continue
        cell = cells.setdefault((r["dtype"], r["head_dim"]), {})
        regs, smem, occ = cell.get(r["kernel"], (0, 0.0, 1.0))
        cell[r["kernel"]] = (max(regs, r["registers"]), max(smem, r["smem_bytes"] / 1024),
                             min(occ, r["occupancy"]))
    lines = ["| dtype | head_dim | " + " | ".join(kernels) + " |",
             "|---|---|" + "---|" * len(kernels)]
    for (dtype, d), cell in sorted(cells.items(), key=lambda x: (DTYPES.index(x[0][0]),
                                                                 x[0][1])):
        lines.append(f"| {dtype} | {d} | " + " | ".join(
            "{} / {:.0f} / {:.2f}".format(*cell[k]) if k in cell else "-" for k in kernels)
            + " |")
    return "\n".join(lines)


def _print_table(rows: Sequence[dict[str, Any]], failures_only: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Pallas NA kernels compiled by XLA's Triton + ptxas")
    for col in ("case", "kernel", "arch", "warps", "regs", "spill B", "smem KB", "blocks/SM",
                "occupancy", "status"):
        table.add_column(col, justify="left" if col in ("case", "kernel", "status") else "right",
                         no_wrap=col != "status")
    for r in rows:
        why = problems(r)
        if failures_only and not why:
            continue
        ok = not r.get("error")
        table.add_row(r["case"], r["kernel"], r["arch"], str(r.get("num_warps", "")),
                      str(r.get("registers", "")) if ok else "",
                      str(r.get("spill_stores", 0) + r.get("spill_loads", 0)) if ok else "",
                      f"{r['smem_bytes'] / 1024:.1f}" if ok else "",
                      str(r.get("blocks_per_sm", "")) if ok else "",
                      f"{r['occupancy']:.2f}" if ok else "",
                      "ok" if not why else "; ".join(why)[:120])
    if table.row_count:
        Console(width=max(160, Console().width)).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nat_jax.kernels.gpu_gate",
        description="Compile every Pallas NA kernel configuration with XLA's own Triton and "
                    "ptxas on this (CPU) machine; fail on compile errors, spills and shared "
                    "memory over the limit.")
    parser.add_argument("--sample", type=float, default=1.0,
                        help="deterministic fraction of the sweep (default: all of it)")
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated (sm_80, sm_90)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")
    parser.add_argument("--no-candidates", action="store_true",
                        help="skip the autotuning candidates (default block sizes only)")
    parser.add_argument("--match", default=None, metavar="REGEX",
                        help="only cases whose name matches, e.g. 'float32|candidate'")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--all-rows", action="store_true",
                        help="print every kernel, not only the failing ones")
    parser.add_argument("--markdown", type=Path, default=None, metavar="REPORT",
                        help="print the README summary table of a JSON report and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        import json

        report = json.loads(args.markdown.read_text())
        for arch in report["archs"]:
            print(f"\n{arch} (registers / shared memory KB / occupancy, worst case):\n")
            print(markdown_summary(report["kernels"], arch))
        return 0

    from rich.progress import Progress

    cases = sample(dispatch_cases(with_candidates=not args.no_candidates), args.sample)
    if args.match:
        cases = [c for c in cases if re.search(args.match, c.name)]
    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    start = time.perf_counter()
    with Progress() as bar:
        task = bar.add_task("compiling", total=len(cases))
        rows = run(cases, archs, args.jobs,
                   progress=lambda done, total: bar.update(task, completed=done))
    summary = summarize(rows)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    _print_table(rows, failures_only=not args.all_rows)
    print(", ".join(f"{k}={v}" for k, v in summary.items()))
    if args.json:
        from nat_jax.timing import write_json

        write_json(args.json, {"environment": environment(), "archs": list(archs),
                               "sample": args.sample, "summary": summary, "kernels": rows})
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
