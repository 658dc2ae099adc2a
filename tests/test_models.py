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
from nat_jax import DinatConfig, NatConfig, configs, zoo

# Published parameter counts (millions, one decimal; the NAT and DiNAT papers' tables).
PUBLISHED_PARAMS_M = {
    "nat_mini": 20.0, "nat_tiny": 27.9, "nat_small": 50.7, "nat_base": 89.8,
    "dinat_mini": 20.0, "dinat_tiny": 27.9, "dinat_small": 50.7, "dinat_base": 89.8,
    "dinat_large": 200.9, "dinat_large_384": 200.9, "dinat_large_384_k11": 201.1,
}

TINY = DinatConfig(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                   dilations=((2,), (1, 2), (1,), (1,)), mlp_ratio=2.0, num_labels=7,
                   layer_scale_init_value=0.5, drop_path_rate=0.2)


# Two small stages: the cheapest model that still has dilation, padding and several layers.
SMALL = DinatConfig(embed_dim=8, depths=(1, 2), num_heads=(1, 2), kernel_size=3,
                    dilations=((2,), (1, 2)), mlp_ratio=2.0, num_labels=3,
                    layer_scale_init_value=0.5, drop_path_rate=0.0)


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


def _same_weights(model, config=None, **options):
    """``model``'s parameters (cast) in a model of ``config`` (default: the same) built with
    build ``options`` (dtype, na_backend, ...)."""
    config = config or model.config
    graphdef, params, _ = zoo.abstract_model(config, **options)
    values = jax.tree.map(lambda a, t: a.astype(t.dtype), nnx.to_pure_dict(
        nnx.state(model, nnx.Param)), nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, values)
    return nnx.merge(graphdef, params, zoo.init_rest(config, **options))


# ------------------------------------------------------------------ configs


def test_every_preset_is_covered():
    assert set(configs.list_presets()) == set(PUBLISHED_PARAMS_M)
    assert set(zoo.PUBLISHED) == set(configs.PRESETS)
    for name, entry in zoo.PUBLISHED.items():
        assert entry.config is configs.get(name) and entry.hub_id.startswith("shi-labs/")
        assert zoo.published(entry.hub_id.upper()) is entry and zoo.published(name) is entry
        # Every published architecture is told apart by its fields: matching is unambiguous.
        assert configs.presets_matching(entry.config.architecture()) == [name]
        assert zoo.eval_transform_for(entry.config) == entry.eval_transform
    assert zoo.PUBLISHED["dinat_large_384"].eval_transform.image_size == 384
    assert zoo.PUBLISHED["dinat_large_384_k11"].eval_transform.crop_pct == 1.0


def test_zoo_owns_families_and_heads():
    """One table: each family's config class and module per head, HF's class names."""
    assert set(zoo.FAMILIES) == set(configs.CONFIG_CLASSES) == {"nat", "dinat"}
    for model_type, family in zoo.FAMILIES.items():
        assert family.config_class is configs.CONFIG_CLASSES[model_type]
        for head, suffix in zoo.HEADS.items():
            cls = family.classes[head]
            assert cls.config_class is family.config_class
            assert cls.__name__ == family.config_class.__name__[:-len("Config")] + suffix
            assert zoo.head_of(cls.__name__) == head
            assert zoo.model_class(family.config_class(), head) is cls
    with pytest.raises(ValueError, match="head='segmentation' must be one of"):
        zoo.model_class(NatConfig(), "segmentation")
    with pytest.raises(ValueError, match="'SwinModel' is not a NAT/DiNAT model class"):
        zoo.head_of("SwinModel")


def test_configs_import_nothing_from_the_package():
    """Configs are architecture data: nat_jax/configs.py imports only the standard library
    (before, configs and modeling imported each other)."""
    import ast
    import sys

    tree = ast.parse(open(configs.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported, "no imports found: the check reads the wrong file"
    assert all(name.split(".")[0] in sys.stdlib_module_names | {"__future__"}
               for name in imported), imported
    fields = {f.name for f in dataclasses.fields(DinatConfig)}
    assert not fields & {"dtype", "param_dtype", "na_backend", "image_size", "crop_pct"}


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
    assert configs.ModelConfig.from_json(config.to_json()) == config  # dispatch on model_type
    assert json.loads(config.to_json())["model_type"] == config.model_type
    assert hash(again) == hash(config)


def test_config_api():
    assert isinstance(NatConfig.from_preset("nat_mini"), NatConfig)
    assert isinstance(configs.get("dinat_tiny"), DinatConfig)
    with pytest.raises(ValueError, match="nat_mini, nat_tiny"):
        configs.get("nat_huge")
    with pytest.raises(ValueError, match="DinatConfig"):
        NatConfig.from_preset("dinat_mini")
    c = dataclasses.replace(configs.get("dinat_mini"), id2label={0: "a", 1: "b"}, num_labels=2)
    assert DinatConfig.from_json(c.to_json()) == c and nat_jax.label_names(c) == ["a", "b"]
    assert configs.get("nat_mini", num_labels=10).num_labels == 10
    assert nat_jax.label_names(configs.get("nat_mini"))[281] == "tabby, tabby cat"
    assert configs.get("dinat_large_384").dilations[0] == (1, 13, 1)
    assert zoo.model_class(c, "backbone") is nat_jax.DinatBackbone
    # Older checkpoints' config.json hold build options and eval settings: ignored here.
    old = dict(c.to_dict(), dtype="bfloat16", param_dtype="float32", na_backend="xla",
               image_size=224, crop_pct=0.875)
    assert configs.ModelConfig.from_dict(old) == c
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
    config = configs.ModelConfig.from_dict(json.loads(json.dumps(hf)))
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
    ref = _same_weights(tiny_model, na_backend="reference")
    xla = _same_weights(tiny_model, na_backend="xla")
    assert ref.dinat.encoder.levels[0].layers[0].attention.backend == "reference"
    assert ref.options.na_backend == "reference" and ref.config == xla.config == TINY
    np.testing.assert_allclose(run(ref, x).logits, run(xla, x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,message", [
    (dict(dtype="float33"), "dtype='float33' is not a dtype name"),
    (dict(param_dtype="half-ish"), "param_dtype='half-ish' is not a dtype name"),
    (dict(na_backend="cuda"), "na_backend='cuda' is not one of ('auto', 'reference'"),
])
def test_bad_build_options_raise(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        nat_jax.build_model(_tiny_nat(), rngs=nnx.Rngs(0), **options)


def test_bf16_compute_close_to_fp32(rng, tiny_model):
    model16 = _same_weights(tiny_model, dtype="bfloat16")
    x = _images(rng)
    out32 = run(tiny_model, x, output_hidden_states=True)
    out16 = run(model16, x, output_hidden_states=True)
    assert out16.hidden_states[-1].dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    scale = float(jnp.abs(out32.logits).max())
    err = float(jnp.abs(out16.logits - out32.logits).max())
    assert err <= 5e-2 * max(scale, 1.0), (err, scale)


def test_param_dtype_bf16(rng, tiny_model):
    model = _same_weights(tiny_model, dtype="bfloat16", param_dtype="bfloat16")
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


def test_train_and_eval_modes_are_module_state(rng, tiny_model):
    """Models are built in eval mode; model.train() turns dropout and drop path on (drawing from
    the model's RNG streams), model.eval() off again: no flag passes through the call."""
    config = dataclasses.replace(SMALL, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                 drop_path_rate=0.2)
    model = nat_jax.build_model(config, rngs=nnx.Rngs(0))
    assert jax.tree.leaves(nnx.state(model, nnx.RngState))
    x = _images(rng, 1, 32, 32)
    eval1 = run(model, x).logits
    model.train()
    train1 = run(model, x).logits
    train2 = run(model, x).logits  # the stream advanced inside jit
    model.eval()
    assert not np.allclose(train1, eval1) and not np.allclose(train1, train2)
    np.testing.assert_array_equal(run(model, x).logits, eval1)
    # nnx.view gives a train-mode view without changing the model itself.
    train3 = run(nnx.view(model, deterministic=False), x).logits
    assert not np.allclose(train3, eval1)
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
            logits = m(x).logits
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return nnx.grad(loss_fn)(m)

    grads = grad_fn(nnx.view(tiny_model, deterministic=False))  # train mode, fixture untouched
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


def test_remat_gives_the_same_gradients(rng, tiny_model):
    """remat=True recomputes each layer in the backward pass: same numbers, less memory (the
    measurement is benchmarks/remat.py)."""
    x = _images(rng, 1, 32, 32)
    plain = nat_jax.build_model(SMALL, rngs=nnx.Rngs(0))
    remat = _same_weights(plain, remat=True)
    assert remat.dinat.encoder.levels[0].remat and not plain.dinat.encoder.levels[0].remat

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(m(x).logits ** 2))(m)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads(plain), grads(remat))


@pytest.mark.slow  # default-tier time (~35-60 s); make test-all runs it
def test_ordered_backward_gives_the_same_gradients_and_dropout(rng):
    """ordered_backward only orders the backward pass: in train mode (drop path and dropout
    drawing from the model's streams) the loss and gradients equal the plain model's, with
    and without remat, and the streams advance as without it."""
    x = _images(rng, 2, 32, 32)
    # Built the same way (the same initial streams), with drop path on.
    config = dataclasses.replace(SMALL, drop_path_rate=0.3)
    plain = _same_weights(nat_jax.build_model(config, rngs=nnx.Rngs(0)))

    @nnx.jit
    def run(m):
        m.train()
        nnx.reseed(m, dropout=jax.random.key(3))
        return nnx.value_and_grad(lambda m: jnp.sum(m(x).logits ** 2) + jnp.sum(
            m(x).logits))(m)

    want_loss, want = run(plain)
    for remat in (False, True):
        ordered = _same_weights(plain, ordered_backward=True, remat=remat)
        assert ordered.dinat.encoder.levels[0].layers[0].ordered_backward
        loss, got = run(ordered)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     got, want)


def test_ordered_backward_model_runs_under_jax_jit_closing_over_its_state(rng):
    """A jax.jit function that merges the model from state it closes over (variables created
    outside the trace, as a notebook or benchmark writes it) runs an ordered_backward model in
    eval mode and gives the plain model's logits. (In train mode the dropout streams must
    advance, which needs the state passed in, as for any model.)"""
    x = _images(rng, 2, 32, 32)
    config = dataclasses.replace(SMALL, drop_path_rate=0.3)
    plain = _same_weights(nat_jax.build_model(config, rngs=nnx.Rngs(0)))
    ordered = _same_weights(plain, ordered_backward=True)
    logits = {}
    for name, model in (("plain", plain), ("ordered", ordered)):
        model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        forward = jax.jit(lambda params, x: nnx.merge(graphdef, params, rest)(x).logits)
        logits[name] = forward(params, x)
    np.testing.assert_allclose(logits["ordered"], logits["plain"], rtol=1e-6, atol=1e-6)


# Stage 0: two same layers (period 1); stage 1: DiNAT's alternating dilations over 5 layers
# (period 2: two scanned groups, then one layer run after the scan).
SCANNED = dataclasses.replace(SMALL, depths=(2, 5), dilations=((1, 1), (1, 2, 1, 2, 1)),
                              drop_path_rate=0.3, hidden_dropout_prob=0.1)


def _scans(model, x) -> int:
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x).logits)(state)).count(
        "scan[")


@pytest.mark.parametrize("options", [
    dict(), pytest.param(dict(remat=True, ordered_backward=True), marks=pytest.mark.slow)],
    ids=["scan", "scan+remat+ordered"])
def test_scan_layers_equals_the_unrolled_model(rng, options):
    """scan_layers runs each stage's repeated layers as one scan over stacked parameters: in
    train mode (drop path with its per-layer rates, MLP dropout) the loss, every parameter's
    gradient and the streams' counts equal the unrolled model's; attention weights (the last
    layer of each stage, run after the scan) and hidden states too."""
    x = _images(rng, 3, 32, 32)
    plain = _same_weights(nat_jax.build_model(SCANNED, rngs=nnx.Rngs(0)), **options)
    scanned = _same_weights(plain, scan_layers=True, **options)
    assert _scans(scanned, x) == 2 and _scans(plain, x) == 0

    @nnx.jit
    def run(m):
        m.train()
        nnx.reseed(m, dropout=jax.random.key(3))
        return nnx.value_and_grad(lambda m: jnp.sum(m(x).logits ** 2))(m)

    (want_loss, want), (loss, got) = run(plain), run(scanned)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    counts = [nnx.to_pure_dict(nnx.state(m, nnx.RngCount)) for m in (plain, scanned)]
    assert jax.tree.leaves(counts[0]) and all(int(c) > 0 for c in jax.tree.leaves(counts[0]))
    jax.tree.map(np.testing.assert_array_equal, *counts)
    if options:
        return
    plain.eval()
    scanned.eval()
    outs = [_jitted((("output_attentions", True), ("output_hidden_states", True)))(m, x)
            for m in (plain, scanned)]
    assert all(a is not None for a in outs[1].attentions)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *outs)


def test_drop_path_rate_is_data_and_checked():
    """Drop path keeps its rate as a (non-parameter) variable, so layers with different rates
    share one structure; models without drop path hold no stream for it."""
    model = nat_jax.build_model(SCANNED, rngs=nnx.Rngs(0))
    rates = [float(layer.drop_path.rate[...]) for stage in model.dinat.encoder.levels
             for layer in stage.layers]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 7), rtol=1e-6)
    assert "drop_path" not in str(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    off = nat_jax.build_model(SMALL, rngs=nnx.Rngs(0))
    assert off.dinat.encoder.levels[1].layers[1].drop_path.rngs is None
    with pytest.raises(ValueError, match="drop path rate 1.0"):
        nat_jax.build_model(dataclasses.replace(SMALL, drop_path_rate=1.0), rngs=nnx.Rngs(0))


def test_no_weight_decay_lists_rpb_and_layer_scale(tiny_model):
    """The model tells the trainer which parameters take no weight decay, by path."""
    paths = tiny_model.no_weight_decay()
    params = nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param))
    flat = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert paths <= flat
    layers = sum(TINY.depths)
    assert sorted(p[-1] for p in paths) == ["layer_scale_parameters"] * layers + ["rpb"] * layers
    assert ("dinat", "encoder", "levels", 1, "layers", 1, "attention", "rpb") in paths
    backbone = nat_jax.build_model(_tiny_nat(), rngs=nnx.Rngs(0), head="backbone")
    assert {p[-1] for p in backbone.no_weight_decay()} == {"rpb"}  # no layer scale there
    assert ("encoder", "levels", 0, "layers", 0, "attention", "rpb") in backbone.no_weight_decay()


@pytest.mark.parametrize("trigger", ["output_attentions", "attention_dropout"])
def test_unfused_attention_runs_on_the_model_backend(rng, monkeypatch, trigger):
    """Attention weights and attention dropout need na2d_qk / na2d_av: they run on the model's
    na_backend (the model used to switch every such layer to the gather reference, ignoring
    na_backend). 'xla' gets counting qk/av implementations here to show the routing."""
    from nat_jax.kernels import ops, reference

    calls = []

    def qk(query, key, p, rpb):
        calls.append("qk")
        return reference.na_qk(query, key, p, rpb)

    def av(weights, value, p):
        calls.append("av")
        return reference.na_av(weights, value, p)

    monkeypatch.setitem(ops._BACKENDS, "xla", dataclasses.replace(ops._BACKENDS["xla"], qk=qk,
                                                                   av=av))
    ops._qk.clear_cache()  # their jit caches may hold another run's counting functions
    ops._av.clear_cache()
    x = _images(rng, 1, 32, 32)
    config = SMALL if trigger == "output_attentions" else \
        dataclasses.replace(SMALL, attention_probs_dropout_prob=0.5)
    model = nat_jax.build_model(config, rngs=nnx.Rngs(0), na_backend="xla")
    want = run(model, x).logits  # the fused path: no unfused call
    assert calls == []
    if trigger == "output_attentions":
        got = run(model, x, output_attentions=True)
        assert [a.shape[1] for a in got.attentions] == list(SMALL.num_heads)
        np.testing.assert_allclose(got.logits, want, rtol=1e-5, atol=1e-5)
    else:
        got = run(nnx.view(model, deterministic=False), x)
        assert not np.allclose(got.logits, want)  # the dropout did drop
    # Weights: each stage's last layer; dropout: every layer.
    expected = SMALL.num_stages if trigger == "output_attentions" else sum(SMALL.depths)
    assert calls.count("qk") == calls.count("av") == expected


def test_unfused_attention_without_backend_kernels_warns_once(rng, recwarn):
    """A backend with no unfused kernels ('pallas' today) runs the tiled xla ones, saying so
    once per op instead of silently."""
    from nat_jax.kernels import ops

    ops._warned_fallback.discard(("pallas", "qk"))
    ops._warned_fallback.discard(("pallas", "av"))
    model = nat_jax.build_model(SMALL, rngs=nnx.Rngs(0), na_backend="pallas")
    x = _images(rng, 2, 32, 32)
    with pytest.warns(UserWarning, match="backend 'pallas' has no unfused kernels; using 'xla'"):
        nnx.jit(lambda m, x: m(x, output_attentions=True).attentions)(model, x)
    recwarn.clear()
    nnx.jit(lambda m, x: m(x, output_attentions=True).attentions)(model, x[:1])  # retrace
    assert not [w for w in recwarn if "unfused" in str(w.message)]


@pytest.mark.parametrize("shape,kernel,strides,padding,im2col", [
    ((2, 16, 16, 3), (3, 3, 3, 8), (2, 2), ((1, 1), (1, 1)), False),  # RGB stem: stays a conv
    ((2, 16, 16, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 1)), True),
    ((2, 15, 9, 24), (3, 3, 24, 12), (2, 2), ((1, 1), (1, 1)), True),  # odd (Ho = ceil(H/2))
    ((1, 11, 10, 16), (3, 2, 16, 5), (2, 1), ((0, 1), (2, 0)), True),  # asymmetric everything
    ((1, 12, 12, 16), (3, 3, 16, 4), (3, 3), ((1, 0), (0, 0)), True),  # rows cropped, stride 3
])
def test_convs_on_cpu_run_as_im2col_and_equal_lax_conv(rng, shape, kernel, strides, padding,
                                                       im2col):
    """``nnx.Conv``'s convolution in our models is an im2col matmul when lowered for CPU with at
    least 16 input channels (faster backward there) and stays a convolution otherwise and for
    other platforms; values and both gradients equal ``lax.conv_general_dilated``'s."""
    from nat_jax import modeling

    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    w = jnp.asarray(rng.standard_normal(kernel, np.float32))
    dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))

    def ours(x, w):
        return modeling._conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)

    def theirs(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn,
                                            precision="highest")

    out, expected = jax.jit(ours)(x, w), theirs(x, w)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    ct = jnp.asarray(rng.standard_normal(expected.shape, np.float32))
    grads = jax.jit(jax.grad(lambda x, w: jnp.vdot(ours(x, w), ct), argnums=(0, 1)))(x, w)
    expected_grads = jax.grad(lambda x, w: jnp.vdot(theirs(x, w), ct), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))

    cpu_hlo = jax.jit(ours).lower(x, w).compile().as_text()
    assert ("convolution(" not in cpu_hlo) == im2col
    tpu = jax.export.export(jax.jit(ours), platforms=["tpu"])(x, w).mlir_module()
    assert "stablehlo.convolution" in tpu and "dot_general" not in tpu


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_norm_with_written_backward_equals_flax(rng, dtype):
    """The models' LayerNorm (hand-written backward) against ``nnx.LayerNorm``: outputs and the
    gradients of input, scale and bias, on inputs far from zero mean (two-pass variance)."""
    from nat_jax import modeling

    kw = dict(epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=nnx.Rngs(0))
    ours, flax_ln = modeling.LayerNorm(24, **kw), nnx.LayerNorm(24, **kw)
    for m in (ours, flax_ln):  # the same non-trivial parameters in both
        m.scale[...] = jnp.asarray(np.linspace(0.5, 2.0, 24, dtype=np.float32))
        m.bias[...] = jnp.asarray(np.linspace(-1.0, 1.0, 24, dtype=np.float32))
    x = jnp.asarray(rng.standard_normal((3, 5, 7, 24)) * 3.0 + 50.0, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def grads(m):
        def loss(m, x):
            return jnp.vdot(m(x).astype(jnp.float32), ct)
        return jax.grad(loss, argnums=(0, 1))(m, x)

    tol = 1e-5 if dtype is None else 2e-2
    out, want = ours(x), flax_ln(x)
    assert out.dtype == want.dtype
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)
    (gm, gx), (wm, wx) = grads(ours), grads(flax_ln)
    scale = float(jnp.abs(wx).max())
    np.testing.assert_allclose(gx.astype(np.float32), wx.astype(np.float32), rtol=tol,
                               atol=tol * scale)
    for name in ("scale", "bias"):
        g, w = getattr(gm, name)[...], getattr(wm, name)[...]
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(jnp.abs(w).max()))
