"""Whole-model parity with HuggingFace transformers 4.53.3 NAT / DiNAT (PyTorch, CPU).

HF's models get random weights (every tensor, including RPB, LayerNorm and layer scale, so no
term can hide), which are copied into ours with the small explicit map below (the real converter
lives in ``nat_jax.convert``). Logits, every hidden state and the attention weights must agree to
~1e-4 in fp32, at 224 and at sizes small enough to trigger HF's pad-before-qkv path.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import natten_shim
import oracle
import torch  # test extra: a missing one must fail, not skip
import transformers

import nat_jax
from nat_jax import DinatConfig, NatConfig, zoo
from nat_jax.convert import torch_natten


@pytest.fixture(autouse=True)
def _hf_runs_the_test_shim(monkeypatch):
    """transformers' NAT/DiNAT call this test's own NATTEN stand-in (written from the rules,
    independently of nat_jax.kernels) during each test, and whatever they called before
    afterwards: the converter's --verify is never checked against this shim."""
    torch_natten.install()  # the names must exist in natten.functional before transformers'
    for family in zoo.FAMILIES.values():  # modeling modules are first imported
        modeling = importlib.import_module(family.hf_modeling)
        monkeypatch.setattr(modeling, "natten2dqkrpb", natten_shim.natten2dqkrpb)
        monkeypatch.setattr(modeling, "natten2dav", natten_shim.natten2dav)

# ------------------------------------------------------------------ HF -> ours copy (tests only)

_RENAME = {  # our module name -> HF module name, inside a layer
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
    "attention.proj": "attention.output.dense",
}


def _hf_tensor(sd: dict, path: tuple, prefix: str, used: set) -> np.ndarray:
    """HF value for our parameter at ``path`` (tuple of str/int), laid out as ours."""
    *mods, leaf = (str(p) for p in path)
    if mods and mods[0] in ("nat", "dinat"):
        mods[0] = prefix
    name = ".".join(mods)
    for ours, theirs in _RENAME.items():
        name = name.replace(ours, theirs)
    if leaf in ("rpb", "layer_scale_parameters"):
        key = f"{name}.self.rpb" if leaf == "rpb" else f"{name}.{leaf}"
        used.add(key)
        return sd[key].numpy()
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    if name.endswith("attention.qkv"):
        base = name[:-len("qkv")] + "self."
        keys = [f"{base}{p}.{torch_leaf}" for p in ("query", "key", "value")]
        used.update(keys)
        t = np.concatenate([sd[k].numpy() for k in keys], axis=0)
    else:
        used.add(f"{name}.{torch_leaf}")
        t = sd[f"{name}.{torch_leaf}"].numpy()
    if leaf == "kernel":
        t = t.T if t.ndim == 2 else t.transpose(2, 3, 1, 0)
    return t


def copy_from_hf(hf_model, model) -> None:
    """Copy every HF tensor into ``model`` (shape-checked); fails if any HF tensor is unused."""
    sd = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    prefix = "dinat" if type(model).__name__.startswith("Dinat") else "nat"
    state = nnx.state(model, nnx.Param)
    used: set[str] = set()

    def load(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        t = _hf_tensor(sd, keys, prefix, used)
        assert t.shape == leaf.shape, (keys, t.shape, leaf.shape)
        return jnp.asarray(t, leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(load, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    assert used == set(sd), f"unused HF tensors: {sorted(set(sd) - used)[:5]}"


def _randomize(hf_model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "layer_scale" in name:
                p.copy_(0.5 + 0.2 * noise)
            elif "rpb" in name:
                p.copy_(noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (1.0 / np.sqrt(np.prod(p.shape[1:]))))


def _hf_config(config):
    common = dict(
        embed_dim=config.embed_dim, depths=list(config.depths), num_heads=list(config.num_heads),
        kernel_size=config.kernel_size, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
        drop_path_rate=0.0, layer_scale_init_value=config.layer_scale_init_value,
        num_labels=config.num_labels, out_features=list(config.backbone_stages()[0]))
    if isinstance(config, DinatConfig):
        return transformers.DinatConfig(dilations=[list(d) for d in config.dilations], **common)
    return transformers.NatConfig(**common)


def build_pair(config, head: str = "classification", seed: int = 0):
    """(hf_model, our_model) with identical random weights."""
    hf_cls = {
        ("nat", "classification"): transformers.NatForImageClassification,
        ("dinat", "classification"): transformers.DinatForImageClassification,
        ("nat", "backbone"): transformers.NatBackbone,
        ("dinat", "backbone"): transformers.DinatBackbone,
    }[config.model_type, head]
    torch.manual_seed(seed)
    hf = hf_cls(_hf_config(config)).eval()
    _randomize(hf, seed)
    ours = nat_jax.build_model(config, rngs=nnx.Rngs(seed), head=head)
    copy_from_hf(hf, ours)
    return hf, ours


def assert_close(ours, theirs, tol=1e-4, what=""):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    scale = max(1.0, float(np.abs(theirs).max()))
    err = float(np.abs(ours - theirs).max())
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def _forward(model, x):
    @nnx.jit
    def run(m, x):
        return m(x, output_hidden_states=True, output_attentions=True)
    return run(model, x)


def check_classifier(config, height, width, seed=0, batch=2):
    hf, ours = build_pair(config, seed=seed)
    x = np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True,
                 output_attentions=True)
    out = _forward(ours, jnp.asarray(x))
    assert_close(out.logits, ref.logits, what="logits")
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_stages + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, b, what=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.reshaped_hidden_states, ref.reshaped_hidden_states)):
        assert_close(a, b, what=f"reshaped_hidden_states[{i}]")
    assert len(out.attentions) == len(ref.attentions) == config.num_stages
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, b, what=f"attentions[{i}]")
    # Last hidden state and pooled output (the base model's view).
    base = ours.base_model(jnp.asarray(x))
    ref_base = getattr(hf, config.model_type)(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert_close(base.last_hidden_state, ref_base.last_hidden_state.detach(),
                 what="last_hidden_state")
    assert_close(base.pooler_output, ref_base.pooler_output.detach(), what="pooler_output")


SMALL_NAT = NatConfig(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), kernel_size=5,
                      mlp_ratio=2.0, num_labels=10, layer_scale_init_value=1e-5,
                      drop_path_rate=0.0)
SMALL_DINAT = DinatConfig(embed_dim=16, depths=(2, 2, 2, 1), num_heads=(2, 2, 4, 4),
                          kernel_size=3, mlp_ratio=2.0, num_labels=10,
                          dilations=((1, 4), (2, 3), (1, 2), (1,)), drop_path_rate=0.0)


def test_shim_matches_oracle(rng):
    """The torch NATTEN stand-in agrees with the float64 oracle (incl. dilation and RPB)."""
    for (h, w), k, d in [((7, 9), 3, 1), ((10, 12), 3, 2), ((13, 11), 5, 2)]:
        q, kk, v = (rng.standard_normal((2, h, w, 2, 4)) for _ in range(3))
        rpb = rng.standard_normal((2, 2 * k - 1, 2 * k - 1))
        want = oracle.na_qk(q, kk, k, d, scale=1.0, rpb=rpb)
        t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2, 4)  # noqa: E731
        got = natten_shim.natten2dqkrpb(t(q), t(kk), torch.from_numpy(rpb), k, d)
        np.testing.assert_allclose(got.permute(0, 2, 3, 1, 4).numpy(), want, atol=1e-10)
        attn = rng.random((2, h, w, 2, k * k))
        got = natten_shim.natten2dav(t(attn), t(v), k, d).permute(0, 2, 3, 1, 4).numpy()
        np.testing.assert_allclose(got, oracle.na_av(attn, v, k, d), atol=1e-10)


@pytest.mark.parametrize("config", [SMALL_NAT, SMALL_DINAT], ids=["nat", "dinat"])
@pytest.mark.parametrize("size", [(224, 224), (64, 96)], ids=str)
def test_small_config_parity(config, size):
    check_classifier(config, *size)


def test_nat_mini_parity_224():
    check_classifier(nat_jax.configs.get("nat_mini"), 224, 224, batch=1)


def test_dinat_mini_parity_small_input():
    # 96x96: stage maps 24, 12, 6, 3; K*d up to 56 so nearly every layer pads.
    check_classifier(nat_jax.configs.get("dinat_mini"), 96, 96, batch=1)


@pytest.mark.slow
def test_dinat_mini_parity_224():
    check_classifier(nat_jax.configs.get("dinat_mini"), 224, 224, batch=1)


@pytest.mark.slow
def test_nat_mini_parity_small_input():
    check_classifier(nat_jax.configs.get("nat_mini"), 96, 64, batch=1)


@pytest.mark.parametrize("config", [SMALL_NAT, SMALL_DINAT], ids=["nat", "dinat"])
def test_backbone_parity(config):
    config = dataclasses.replace(config, out_features=("stem", "stage2", "stage4"))
    hf, ours = build_pair(config, head="backbone", seed=3)
    x = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2))
    out = ours(jnp.asarray(x))
    assert len(out.feature_maps) == len(ref.feature_maps) == 3
    for i, (a, b) in enumerate(zip(out.feature_maps, ref.feature_maps)):
        assert_close(a, b, what=f"feature_maps[{i}]")


def test_copy_map_covers_layer_scale_and_qkv_layout():
    """The fused qkv columns are [q | k | v] (HF query/key/value stacked)."""
    hf, ours = build_pair(SMALL_NAT, seed=1)
    layer = ours.nat.encoder.levels[0].layers[0]
    sd = hf.state_dict()
    c = SMALL_NAT.embed_dim
    kernel = np.asarray(layer.attention.qkv.kernel[...])
    prefix = "nat.encoder.levels.0.layers.0.attention.self."
    np.testing.assert_array_equal(kernel[:, c:2 * c], sd[prefix + "key.weight"].numpy().T)
    assert layer.layer_scale_parameters[...].shape == (2, c)
