"""examples/hourglass.py (NA at the fine levels, global attention at the coarse one) builds,
trains and learns: run as a module so it never rots."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hourglass.py"


def _load():
    spec = importlib.util.spec_from_file_location("hourglass_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hourglass_denoiser_learns():
    example = _load()
    losses = example.train(steps=30, size=56, batch=4, log_every=0)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_hourglass_mixes_both_attentions():
    import flax.nnx as nnx

    from nat_jax.layers import NeighborhoodAttention2D

    example = _load()
    model = example.Hourglass(rngs=nnx.Rngs(0))
    kinds = {type(node).__name__ for _, node in nnx.iter_graph(model)}
    assert {"NeighborhoodAttention2D", "MultiHeadAttention"} <= kinds
    assert sum(isinstance(n, NeighborhoodAttention2D) for _, n in nnx.iter_graph(model)) == 4
