"""benchmarks/profile_train_step.py reads XLA's compiled HLO to put each op in a category; a
regex change once shifted its groups and every matmul fusion silently became "other"."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import profile_train_step as pts  # noqa: E402


def test_fusions_with_dots_are_matmuls():
    def f(x, w):
        return jnp.tanh(x @ w) * 2.0 + x

    x, w = jnp.ones((64, 32)), jnp.ones((32, 32))
    hlo = jax.jit(f).lower(x, w).compile().as_text()
    ops = pts.hlo_ops(hlo)
    inner = pts._fused_opcodes(hlo)
    # Every fusion instruction maps to the opcodes of its fused computation.
    fusions = [name for name, op in ops.items() if op[0] == "fusion"]
    assert fusions and set(fusions) == set(inner)
    dots = [name for name, op in ops.items()
            if op[0] in ("dot", "convolution") or inner.get(name, set()) & {"dot", "convolution"}]
    assert dots, (ops, inner)
    for name in dots:
        opcode, op_name, source, _ = ops[name]
        assert pts.categorize(opcode, op_name, source, inner.get(name, set())) == "matmul fwd"
