"""Every Pallas kernel configuration lowers for CUDA (Triton) on a CPU-only machine.

``jax.export`` with ``platforms=["cuda"]`` runs Pallas's whole Pallas-to-Triton lowering without a
GPU, so unsupported primitives (e.g. a gather on a loaded value) and non-power-of-two blocks fail
here. It does not compile PTX or check register / shared-memory limits: only a GPU run does that.
"""

from __future__ import annotations

import math

import pytest

import jax
import jax.numpy as jnp

from nat_jax.kernels import pallas
from nat_jax.kernels.params import make_params

TRITON = "__gpu$xla.gpu.triton"
DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}

# (name, spatial shape, kwargs): per rank, a plain case, an RPB case (odd kernel, stride 1,
# non-causal, with dilation) and a causal + stride + dilation + even kernel case.
CONFIGS = [
    ("1d", (200,), dict(kernel_size=7)),
    ("1d-rpb-dil", (200,), dict(kernel_size=7, dilation=3, rpb=True)),
    ("1d-causal-stride-dil", (203,), dict(kernel_size=8, stride=3, dilation=2, is_causal=True)),
    ("2d", (28, 28), dict(kernel_size=7)),
    ("2d-rpb-dil", (28, 30), dict(kernel_size=(7, 5), dilation=(2, 3), rpb=True)),
    ("2d-causal-stride-dil", (27, 28), dict(kernel_size=(6, 7), stride=(2, 1), dilation=(2, 1),
                                            is_causal=(True, False))),
    ("3d", (8, 12, 12), dict(kernel_size=3)),
    ("3d-rpb-dil", (8, 12, 12), dict(kernel_size=3, dilation=(1, 2, 2), rpb=True)),
    ("3d-causal-stride-dil", (9, 12, 10), dict(kernel_size=(3, 4, 3), stride=(1, 2, 3),
                                               dilation=(2, 1, 1), is_causal=(True, False, True))),
]


def export_cuda(fn, *args):
    exp = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*[None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    return exp.mlir_module()


def lower(shape, dtype, head_dim=32, head_dim_v=None, heads=2, batch=2, block_sizes=None,
          rpb=False, **kw):
    """Lower forward (out, lse) and the full VJP (dq, dk, dv, drpb) in one export; returns the
    number of Triton kernels in the module."""
    head_dim_v = head_dim_v or head_dim
    p = make_params(shape, head_dim, **kw)
    q = jax.ShapeDtypeStruct((batch, *shape, heads, head_dim), dtype)
    v = jax.ShapeDtypeStruct((batch, *shape, heads, head_dim_v), dtype)
    bias = (jax.ShapeDtypeStruct((heads, *(2 * k - 1 for k in p.kernel_size)), dtype)
            if rpb else None)

    def fn(q, k, v, bias):
        def f(q, k, v, bias):
            return pallas.na_fused(q, k, v, p, bias, block_sizes=block_sizes, interpret=False)
        (out, lse), vjp = jax.vjp(f, q, k, v, bias)
        return out, lse, vjp((out, lse))

    text = export_cuda(fn, q, q, v, bias)
    return text.count(f"custom_call @{TRITON}(")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name,shape,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_lowers_for_cuda(name, shape, kw, dtype):
    # forward + dQ + dK/dV (+ dRPB): every kernel the dispatcher can launch for this config.
    assert lower(shape, dtype, **kw) == 3 + bool(kw.get("rpb"))


@pytest.mark.parametrize("head_dim,head_dim_v", [(16, 16), (24, 40), (128, 64), (256, 256)])
def test_head_dims_lower(head_dim, head_dim_v):
    assert lower((20, 20), jnp.bfloat16, head_dim, head_dim_v, kernel_size=5, rpb=True) == 4


def test_tuning_candidates_lower():
    """Every block-size candidate the autotuner may pick lowers too."""
    from nat_jax.kernels import autotune

    shape, p = (32, 32), make_params((32, 32), 64, 7)
    q = jnp.zeros((1, *shape, 2, 64), jnp.bfloat16)
    cands = autotune.candidates(q, q, p)
    assert len(cands) >= 3
    for blocks in cands:
        assert math.prod(blocks.q) >= 16
        assert lower(shape, jnp.bfloat16, 64, block_sizes=blocks, kernel_size=7) == 3
