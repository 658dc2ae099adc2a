"""The Pallas kernels are real Triton kernels wherever a program is lowered for CUDA.

``jax.export(..., platforms=["cuda"])`` on this CPU-only machine runs Pallas's whole Triton
lowering. These tests check *which* program gets kernels: the interpret/compile choice follows
the platform the program is lowered for (not ``jax.default_backend()``), and ``backend="auto"``
puts the kernels into CUDA programs and the xla path into CPU ones. Whether the kernels compile
(XLA's Triton + ptxas: registers, spills, shared memory) is ``test_gpu_gate.py``.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import na_cases
from nat_jax import kernels
from nat_jax.kernels import gpu_gate, pallas
from nat_jax.kernels.params import make_params

KERNELS = ["na_pallas_fwd", "na_pallas_dq", "na_pallas_dkv", "na_pallas_drpb"]


def kernel_names(fn, *args) -> list[str]:
    """Every kernel of the CUDA export, once per name. Each kernel is there twice: the call and
    its rerun on sanitized inputs in the non-finite containment branch (checked below)."""
    text = gpu_gate.export_for_cuda(fn, *args)
    names = collections.Counter(k.name.strip('"') for k in gpu_gate.triton_kernels(text))
    assert set(names.values()) <= {2}, names
    return sorted(names)


def fwd_bwd(op):
    def fn(q, k, v, bias):
        (out, lse), vjp = jax.vjp(op, q, k, v, bias)
        return out, lse, vjp((out, lse))

    return fn


@pytest.mark.parametrize("shape,kw", [((200,), dict(kernel_size=7, dilation=3)),
                                      ((28, 30), dict(kernel_size=(7, 5), dilation=(2, 3))),
                                      ((8, 12, 12), dict(kernel_size=3, dilation=(1, 2, 2)))],
                         ids=["1d", "2d", "3d"])
def test_default_interpret_compiles_for_cuda(shape, kw):
    """pallas.na_fused without ``interpret=``: a CUDA export holds every kernel (forward, dQ,
    dK/dV, dRPB) as a Triton call, although this process's default backend is the CPU."""
    assert jax.default_backend() == "cpu"
    p = make_params(shape, 32, **kw)
    q = jax.ShapeDtypeStruct((2, *shape, 2, 32), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((2, *(2 * k - 1 for k in p.kernel_size)), jnp.bfloat16)
    names = kernel_names(fwd_bwd(lambda q, k, v, b: pallas.na_fused(q, k, v, p, b)),
                         q, q, q, bias)
    assert names == sorted(KERNELS)


def test_auto_backend_follows_the_lowering_platform(rng):
    """The same ``backend="auto"`` call: Pallas kernels when lowered for CUDA, the cpu
    backend's own kernels (or, without a compiler, the xla path: no custom calls at all) when
    lowered for the CPU, where it also runs and is exact."""
    q, k, v = (jnp.asarray(rng.standard_normal((1, 20, 20, 2, 32)), jnp.float32)
               for _ in range(3))

    def op(q, k, v, bias):
        return kernels.na2d(q, k, v, 5, dilation=2, backend="auto", return_lse=True)

    assert kernel_names(fwd_bwd(op), q, k, v, None) == sorted(KERNELS[:3])
    cpu_text = jax.jit(fwd_bwd(op)).lower(q, k, v, None).as_text()
    targets = set(re.findall(r"custom_call @(\w+)", cpu_text))
    want = {"nat_jax_na_forward", "nat_jax_na_backward_query", "nat_jax_na_backward_key"}
    assert targets == (want if na_cases.auto_on_cpu() == "cpu" else set())
    out = kernels.na2d(q, k, v, 5, dilation=2, backend="auto")
    want = kernels.na2d(q, k, v, 5, dilation=2, backend="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_auto_prepares_calls_only_for_the_target_platforms(rng):
    """On a CPU-only host ``auto`` traces the xla path alone (tracing every platform's Pallas
    kernels into every CPU program took most of a train step's trace time); inside
    ``lowering_platforms("cuda")`` (how ``gpu_gate.export_for_cuda`` exports) the CUDA branch
    with the kernels is there too, and ``target_platforms`` says which platforms count."""
    q = jax.ShapeDtypeStruct((1, 20, 20, 2, 32), jnp.float32)

    def op(q):
        return kernels.na2d(q, q, q, 5, dilation=2, backend="auto")

    assert kernels.target_platforms() == {"cpu"}
    assert "pallas_call" not in str(jax.make_jaxpr(op)(q))
    with kernels.lowering_platforms("cuda"):
        assert kernels.target_platforms() == {"cpu", "cuda"}
        text = str(jax.make_jaxpr(op)(q))
        assert "pallas_call" in text and "platform_index" in text
    assert kernels.target_platforms() == {"cpu"}  # the context is left behind
    # Exported for CUDA without the context, the program is the (portable) xla path.
    plain = jax.export.export(jax.jit(op), platforms=["cuda"])(q).mlir_module()
    assert "custom_call" not in plain or gpu_gate.TRITON_TARGET not in plain


def test_auto_keeps_unsupported_calls_on_xla_for_cuda():
    """A head_dim beyond the kernels' limit stays on the xla path even in a CUDA program."""
    q = jax.ShapeDtypeStruct((1, 16, 16, 1, 512), jnp.bfloat16)
    names = kernel_names(fwd_bwd(lambda q, k, v, b: kernels.na2d(q, k, v, 5, return_lse=True)),
                         q, q, q, None)
    assert names == []
