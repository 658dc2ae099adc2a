"""Model zoo, configs and module behaviour (no PyTorch here; parity is in test_hf_parity.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nat_jax
from nat_jax import DinatConfig, NatConfig, configs

# Published parameter counts (millions, one decimal), checkpoints.md.
PUBLISHED_PARAMS_M = {
    "nat_mini": 20.0, "nat_tiny": 27.9, "nat_small": 50.7, "nat_base": 89.8,
    "dinat_mini": 20.0, "dinat_tiny": 27.9, "dinat_small": 50.7, "dinat_base": 89.8,
    "dinat_large": 200.9, "dinat_large_384": 200.9, "dinat_large_384_k11": 201.1,
}

TINY = DinatConfig(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                   dilations=((2,), (1, 2), (1,), (1,)), mlp_ratio=2.0, num_labels=7,
                   layer_scale_init_value=0.5, drop_path_rate=0.2)


def _tiny_nat(**kw):
    return NatConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                     mlp_ratio=2.0, num_labels=5, **kw)


def _images(rng, b=2, h=64, w=64):
    return jnp.asarray(rng.standard_normal((b, h, w, 3)), jnp.float32)


@functools.cache
def _jitted(items: tuple):
    kwargs = dict(items)
    return nnx.jit(lambda m, x: m(x, **kwargs))


def run(model, x, **kwargs):
    """``model(x, **kwargs)`` through one cached ``nnx.jit`` per keyword set (fast on CPU)."""
    return _jitted(tuple(sorted(kwargs.items())))(model, x)


@pytest.fixture(scope="module")
def tiny_model():
    return nat_jax.build_model(TINY, rngs=nnx.Rngs(0))


def _same_weights(model, config):
    """A model for ``config`` (same structure) holding ``model``'s parameters, cast."""
    def build():
        return nat_jax.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()  # dropout RNG state
    values = jax.tree.map(lambda a, t: a.astype(t.dtype), nnx.to_pure_dict(
        nnx.state(model, nnx.Param)), nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, values)
    return nnx.merge(graphdef, params, rest)


# ------------------------------------------------------------------ configs


def test_every_preset_is_covered():
    assert set(configs.list_presets()) == set(PUBLISHED_PARAMS_M)
    assert set(configs.PRETRAINED_SOURCES) == set(configs.PRESETS)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_preset_parameter_count(name):
    config = configs.get(name)
    model = nnx.eval_shape(lambda: nat_jax.build_model(config, rngs=nnx.Rngs(0)))
    assert round(nat_jax.count_params(model) / 1e6, 1) == PUBLISHED_PARAMS_M[name]
    assert type(model).__name__ == ("DinatForImageClassification" if name.startswith("dinat")
                                    else "NatForImageClassification")


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_config_json_round_trip(name):
    config = configs.get(name)
    again = type(config).from_json(config.to_json())
    assert again == config and type(again) is type(config)
    assert configs._BaseConfig.from_json(config.to_json()) == config  # dispatch on model_type
    assert json.loads(config.to_json())["model_type"] == config.model_type
    assert hash(again) == hash(config)


def test_config_api():
    assert isinstance(NatConfig.from_preset("nat_mini"), NatConfig)
    assert isinstance(configs.get("dinat_tiny"), DinatConfig)
    with pytest.raises(ValueError, match="nat_mini, nat_tiny"):
        configs.get("nat_huge")
    with pytest.raises(ValueError, match="DinatConfig"):
        NatConfig.from_preset("dinat_mini")
    c = dataclasses.replace(configs.get("dinat_mini"), id2label={0: "a", 1: "b"}, num_labels=2,
                            dtype="bfloat16")
    assert DinatConfig.from_json(c.to_json()) == c and c.label_names() == ["a", "b"]
    assert configs.get("nat_mini", num_labels=10).num_labels == 10
    assert configs.get("nat_mini").label_names()[281] == "tabby, tabby cat"
    assert configs.get("dinat_large_384").dilations[0] == (1, 13, 1)
    assert configs.model_class_for(c, "backbone") is nat_jax.DinatBackbone
    with pytest.raises(ValueError, match="dilations"):
        DinatConfig(depths=(1, 1, 1, 1), dilations=((1, 2),) * 4)
    with pytest.raises(ValueError, match="num_heads"):
        NatConfig(embed_dim=30, num_heads=(4, 4, 4, 4))


def test_config_reads_hf_config_dict():
    """A HuggingFace config.json dict (extra keys, list values, str id2label keys) loads."""
    import transformers
    hf = transformers.DinatConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                                  dilations=[[2], [1], [1], [1]], num_labels=3,
                                  out_features=["stage2"]).to_dict()
    config = configs._BaseConfig.from_dict(json.loads(json.dumps(hf)))
    assert isinstance(config, DinatConfig)
    assert config.depths == (1, 1, 1, 1) and config.num_labels == 3
    assert config.backbone_stages() == (("stage2",), (2,))


def test_backbone_stage_alignment():
    c = _tiny_nat(out_indices=(1, -1))
    assert c.backbone_stages() == (("stage1", "stage4"), (1, 4))
    c2 = dataclasses.replace(c, out_indices=None, out_features=("stem",))
    assert c2.backbone_stages() == (("stem",), (0,))
    with pytest.raises(ValueError, match="out_features"):
        _tiny_nat(out_features=("stage9",))


# ------------------------------------------------------------------ modules


def test_output_shapes_and_layouts(rng, tiny_model):
    x = _images(rng, 2, 64, 96)
    out = run(tiny_model, x, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 7) and out.logits.dtype == jnp.float32
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3), (2, 3)]
    assert [h.shape for h in out.hidden_states] == [(2, *s, c) for s, c in
                                                    zip(sizes, (16, 32, 64, 128, 128))]
    for h, r in zip(out.hidden_states, out.reshaped_hidden_states):
        np.testing.assert_array_equal(np.transpose(h, (0, 3, 1, 2)), r)
    # One attention tensor per stage (its last layer): [B, heads, H_pad, W_pad, K*K].
    # The last stage's 2x3 map is smaller than K=3 and is padded to 3x3 like HF.
    assert [a.shape for a in out.attentions] == [
        (2, 1, 16, 24, 9), (2, 2, 8, 12, 9), (2, 2, 4, 6, 9), (2, 4, 3, 3, 9)]
    for a in out.attentions:
        np.testing.assert_allclose(np.sum(a, -1), 1.0, rtol=1e-5)
    base = run(tiny_model.dinat, x)
    np.testing.assert_allclose(base.pooler_output, out.pooler_output, rtol=1e-6, atol=1e-6)
    assert base.last_hidden_state.shape == (2, 2, 3, 128) and base.pooler_output.shape == (2, 128)


def test_fused_and_unfused_paths_agree(rng, tiny_model):
    """output_attentions switches the last layer of each stage to qk/softmax/av: same numbers."""
    x = _images(rng)
    a = run(tiny_model, x).logits
    b = run(tiny_model, x, output_attentions=True).logits
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_backends_agree(rng, tiny_model):
    x = _images(rng, 1, 48, 48)
    ref = _same_weights(tiny_model, dataclasses.replace(TINY, na_backend="reference"))
    xla = _same_weights(tiny_model, dataclasses.replace(TINY, na_backend="xla"))
    assert ref.dinat.encoder.levels[0].layers[0].attention.backend == "reference"
    np.testing.assert_allclose(run(ref, x).logits, run(xla, x).logits, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_fp32(rng, tiny_model):
    model16 = _same_weights(tiny_model, dataclasses.replace(TINY, dtype="bfloat16"))
    x = _images(rng)
    out32 = run(tiny_model, x, output_hidden_states=True)
    out16 = run(model16, x, output_hidden_states=True)
    assert out16.hidden_states[-1].dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    scale = float(jnp.abs(out32.logits).max())
    err = float(jnp.abs(out16.logits - out32.logits).max())
    assert err <= 5e-2 * max(scale, 1.0), (err, scale)


def test_param_dtype_bf16(rng, tiny_model):
    model = _same_weights(tiny_model, dataclasses.replace(TINY, dtype="bfloat16",
                                                          param_dtype="bfloat16"))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert np.isfinite(np.asarray(run(model, _images(rng)).logits)).all()


@pytest.mark.parametrize("out_features", [("stem", "stage1", "stage2", "stage3", "stage4"),
                                          ("stage2",)])
def test_backbone_shapes_and_strides(rng, out_features):
    config = dataclasses.replace(TINY, out_features=out_features)
    model = nat_jax.DinatBackbone(config, rngs=nnx.Rngs(0))
    out = run(model, _images(rng, 2, 64, 64))
    stage = {"stem": 0, "stage1": 1, "stage2": 2, "stage3": 3, "stage4": 4}
    want_c = {0: 16, 1: 16, 2: 32, 3: 64, 4: 128}
    want_s = {0: 4, 1: 4, 2: 8, 3: 16, 4: 32}
    assert model.channels == tuple(want_c[stage[f]] for f in out_features)
    assert model.strides == tuple(want_s[stage[f]] for f in out_features)
    assert [f.shape for f in out.feature_maps] == [
        (2, want_c[stage[f]], 64 // want_s[stage[f]], 64 // want_s[stage[f]])
        for f in out_features]
    assert set(nnx.state(model, nnx.Param)["hidden_states_norms"]) == set(out_features)


def test_jit_does_not_retrace(rng, tiny_model):
    model = tiny_model
    traces = []

    @nnx.jit
    def forward(m, x):
        traces.append(x.shape)
        return m(x).logits

    x = _images(rng)
    a = forward(model, x)
    b = forward(model, x + 1.0)
    forward(model, x)
    assert len(traces) == 1
    forward(model, _images(rng, 1, 32, 32))
    assert len(traces) == 2
    assert not np.allclose(a, b)


def test_dropout_and_drop_path_use_rngs(rng, tiny_model):
    config = dataclasses.replace(TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = _same_weights(tiny_model, config)
    assert jax.tree.leaves(nnx.state(model, nnx.RngState))
    x = _images(rng)
    eval1 = run(model, x).logits  # deterministic=True is the default
    train1 = run(model, x, deterministic=False).logits
    train2 = run(model, x, deterministic=False).logits  # the stream advanced inside jit
    assert not np.allclose(train1, eval1) and not np.allclose(train1, train2)
    np.testing.assert_array_equal(run(model, x).logits, eval1)
    # Without any dropout rate no module keeps an RNG stream (nothing to draw).
    plain = nnx.eval_shape(lambda: nat_jax.build_model(_tiny_nat(drop_path_rate=0.0),
                                                       rngs=nnx.Rngs(0)))
    assert not jax.tree.leaves(nnx.state(plain, nnx.RngState))


def test_gradients_are_finite(rng, tiny_model):
    x, labels = _images(rng), jnp.array([1, 3])

    @nnx.jit
    def grad_fn(m):
        def loss_fn(m):
            logits = m(x, deterministic=False).logits
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return nnx.grad(loss_fn)(m)

    grads = grad_fn(tiny_model)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    rpb = grads["dinat"]["encoder"]["levels"][0]["layers"][0]["attention"]["rpb"]
    assert float(jnp.abs(rpb[...]).sum()) > 0


def test_wrong_inputs_raise(rng):
    model = nat_jax.build_model(_tiny_nat(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="NatConfig"):
        nat_jax.NatModel(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head"):
        nat_jax.build_model(TINY, rngs=nnx.Rngs(0), head="segmentation")


@pytest.mark.parametrize("shape", [(0, 32, 32, 3), (1, 0, 0, 3), (2, 32, 0, 3), (1, 32, 32, 0)])
def test_zero_sized_inputs_raise(shape):
    """Empty batches and images are a ValueError naming the shape (were a ZeroDivisionError in
    the attention, or NaN logits from pooling nothing)."""
    model = nat_jax.build_model(_tiny_nat(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=re.escape(f"pixel_values.shape={shape} must be")):
        model(jnp.zeros(shape))


@pytest.mark.parametrize("field,value", [("num_heads", (0, 2, 4, 8)), ("embed_dim", 0),
                                         ("depths", (1, 0, 1, 1)), ("num_channels", 0)])
def test_zero_sized_configs_raise(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value} must be >= 1")):
        NatConfig(**{field: value})
