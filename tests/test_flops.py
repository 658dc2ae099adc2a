"""The model FLOP count against XLA's own count of the traced forward (reference NA backend,
whose gather-and-dot does exactly the counted QK and AV work)."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import pytest

import nat_jax
from nat_jax import configs
from nat_jax.flops import model_flops


@pytest.mark.parametrize("name,size", [("nat_mini", 224), ("dinat_mini", 96)])
def test_model_flops_match_xla_count(name, size):
    """XLA also counts normalizations, activations, softmax and biases (a few percent more);
    at 96 pixels DiNAT's dilated layers attend on padded maps, which both counts include."""
    cfg = configs.get(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: nat_jax.build_model(
        cfg, rngs=nnx.Rngs(0), na_backend="reference")))
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    xla = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits).trace(state, x).lower()
    counted = xla.cost_analysis()["flops"]
    ours = model_flops(cfg, batch=2, image_size=size)
    assert 1.0 <= counted / ours["forward"] <= 1.1, (counted, ours)
    assert ours["train_step"] == 3 * ours["dense"] + int(3.5 * ours["na"])


def test_published_numbers():
    """NAT-Mini 2.7 GMACs and DiNAT-L at 384 89.7 GMACs (the papers count multiply-adds)."""
    assert model_flops(configs.get("nat_mini"))["forward"] / 2e9 == pytest.approx(2.7, abs=0.05)
    assert model_flops(configs.get("dinat_large_384"), image_size=384)["forward"] / 2e9 == pytest.approx(
        89.7, rel=0.01)
