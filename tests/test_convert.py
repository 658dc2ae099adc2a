"""Converter parity: transformers 4.53.3 NAT/DiNAT with random weights -> nat-jax -> back.

Every source format users bring is produced here from a PyTorch model with random weights: an HF
directory with ``pytorch_model.bin`` and one with ``model.safetensors`` (``save_pretrained``), and
an original SHI-Labs ``.pth`` (keys renamed from the original repository's names by code
written independently of ``convert/keymap.py``: fused qkv, gamma1/gamma2, wrapped in ``model``).
Each is converted with the CLI in-process, loaded with ``load_pretrained`` and compared with the
PyTorch model (logits and hidden states, fp32 1e-4); the export goes back into transformers and
must give identical logits.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# torch and transformers come with the test extra: a missing one must fail, not skip.
import torch  # noqa: E402
import transformers  # noqa: E402,F401

import nat_jax  # noqa: E402
from nat_jax.cli import main  # noqa: E402
from nat_jax.convert import hf_config, keymap, torch_natten  # noqa: E402

IMAGE = 32  # stages 8x8, 4x4, 2x2: the last stages are smaller than the window (HF pads)

NAT_SMALL = nat_jax.NatConfig(embed_dim=16, depths=(2, 1, 1), num_heads=(1, 2, 4),
                              kernel_size=3, mlp_ratio=2.0, num_labels=7)
DINAT_SMALL = nat_jax.DinatConfig(embed_dim=16, depths=(2, 2, 1), num_heads=(2, 2, 4),
                                  kernel_size=3, mlp_ratio=2.0, dilations=((1, 2), (2, 1), (1,)),
                                  layer_scale_init_value=1e-5, num_labels=7)
SMALL = {"nat": NAT_SMALL, "dinat": DINAT_SMALL}


def torch_model(config, seed: int = 0, head: str = "classification"):
    """transformers model for our ``config`` with every parameter random (seeded)."""
    hf = hf_config.config_to_hf(config, head)
    config_cls, model_cls = torch_natten.import_hf_classes(config.model_type, head)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{k: v for k, v in hf.items()
                                    if k not in ("architectures", "model_type")})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def hf_to_original(state: dict, model_type: str) -> dict:
    """HF state dict -> original SHI-Labs keys (``classification/nat.py`` of the original
    repository: ``patch_embed``, ``levels.i.blocks.j``, fused ``attn.qkv``, ``gamma1/2``)."""
    renames = [  # (HF pattern, original replacement), applied to keys without the model prefix
        (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"embeddings\.norm\.", "patch_embed.norm."),
        (r"encoder\.levels\.(\d+)\.layers\.(\d+)\.", r"levels.\1.blocks.\2."),
        (r"encoder\.levels\.(\d+)\.downsample\.", r"levels.\1.downsample."),
        (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
        (r"\.attention\.self\.rpb$", ".attn.rpb"),
        (r"\.attention\.output\.dense\.", ".attn.proj."),
        (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."),
        (r"^layernorm\.", "norm."),
    ]
    out, fused = {}, {}
    for key, value in state.items():
        value = value.detach().clone()
        if key.startswith("classifier."):
            out["head." + key.removeprefix("classifier.")] = value
            continue
        key = key.removeprefix(model_type + ".")
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        m = re.fullmatch(r"(.*)\.attention\.self\.(query|key|value)\.(weight|bias)", key)
        if m:
            fused.setdefault((m[1], m[3]), {})[m[2]] = value
        elif key.endswith(".layer_scale_parameters"):
            stem = key.removesuffix(".layer_scale_parameters")
            out[f"{stem}.gamma1"], out[f"{stem}.gamma2"] = value[0].clone(), value[1].clone()
        else:
            out[key] = value
    for (stem, kind), parts in fused.items():
        out[f"{stem}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def pixels(batch: int = 2, size: int = IMAGE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def forward(model, x: np.ndarray, **kwargs):
    """Our model on NHWC ``x``, jit-compiled (one compile is cheaper than eager op dispatch)."""
    return nnx.jit(lambda m, v: m(v, **kwargs))(model, jnp.asarray(x))


def assert_matches_torch(ours, theirs_model, x: np.ndarray, atol: float = 1e-4) -> None:
    """Logits and every hidden state of our model equal the PyTorch model's."""
    out = forward(ours, x, output_hidden_states=True)
    with torch.no_grad():
        ref = theirs_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=atol, rtol=1e-4)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=atol, rtol=1e-4)


def assert_same_torch_model(back, model, x: np.ndarray) -> None:
    """``back`` (exported and reloaded) has bit-identical weights and the same logits.

    Logits are compared to 1e-6: torch's CPU kernels round differently depending on the memory
    alignment of the weights (safetensors loads them at unaligned offsets), so even identical
    weights give logits that differ in the last bits.
    """
    exported = back.state_dict()
    assert set(exported) == set(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        np.testing.assert_allclose(back(x_nchw).logits.numpy(), model(x_nchw).logits.numpy(),
                                   rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module", params=["nat", "dinat"])
def small(request, tmp_path_factory):
    """(config, torch model, directory holding the saved sources) for a small NAT / DiNAT."""
    config = SMALL[request.param]
    model = torch_model(config)
    root = tmp_path_factory.mktemp(f"src_{request.param}")
    model.save_pretrained(root / "hf_bin", safe_serialization=False)
    model.save_pretrained(root / "hf_safetensors", safe_serialization=True)
    torch.save({"model": hf_to_original(model.state_dict(), config.model_type), "epoch": 300},
               root / "original.pth")
    (root / "config.json").write_text(json.dumps(hf_config.config_to_hf(config)))
    return config, model, root


@pytest.mark.parametrize("fmt", ["hf_bin", "hf_safetensors"])
def test_hf_directory_converts_with_parity(small, fmt, tmp_path):
    config, model, root = small
    assert sorted(p.name for p in (root / fmt).iterdir()) == sorted(
        ["config.json", "pytorch_model.bin" if fmt == "hf_bin" else "model.safetensors"])
    assert run_cli("convert", root / fmt, tmp_path / "out", "--quiet") == 0
    ours = nat_jax.load_pretrained(tmp_path / "out")
    assert type(ours).__name__ == type(model).__name__
    assert ours.config.depths == config.depths
    assert ours.config.layer_dilations == config.layer_dilations
    assert_matches_torch(ours, model, pixels())


def test_original_pth_converts_with_parity_and_exports_back(small, tmp_path):
    config, model, root = small
    raw = torch.load(root / "original.pth", weights_only=True)
    assert "levels.0.blocks.0.attn.qkv.weight" in raw["model"]  # really the original naming
    assert run_cli("convert", root / "original.pth", tmp_path / "out", "--config",
                   root / "config.json", "--quiet") == 0
    ours = nat_jax.load_pretrained(tmp_path / "out")
    x = pixels()
    assert_matches_torch(ours, model, x)

    assert run_cli("export", tmp_path / "out", tmp_path / "hf", "--quiet") == 0
    _, model_cls = torch_natten.import_hf_classes(config.model_type)
    back = model_cls.from_pretrained(tmp_path / "hf").eval()
    assert back.config.id2label == model.config.id2label
    assert_same_torch_model(back, model, x)


def test_python_api_bfloat16(tmp_path):
    model = torch_model(DINAT_SMALL, seed=3)
    model.save_pretrained(tmp_path / "src")
    result = nat_jax.convert.convert(tmp_path / "src", tmp_path / "out", dtype="bfloat16")
    assert result.dtype == "bfloat16" and result.head == "classification"
    assert result.num_params == sum(p.numel() for p in model.parameters())
    ours = nat_jax.load_pretrained(tmp_path / "out")
    kernel = ours.dinat.encoder.levels[0].layers[0].attention.qkv.kernel
    assert kernel.dtype == jnp.bfloat16
    out = forward(ours, pixels())
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels().transpose(0, 3, 1, 2))).logits.numpy()
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(np.asarray(out.logits) - ref).max() / scale < 5e-2
    # a bfloat16 checkpoint exports as float32 (the bf16 values, exactly widened)
    nat_jax.convert.export(tmp_path / "out", tmp_path / "hf")
    _, model_cls = torch_natten.import_hf_classes("dinat")
    back = model_cls.from_pretrained(tmp_path / "hf")
    for key, value in model.state_dict().items():
        exported = back.state_dict()[key]
        assert exported.dtype == torch.float32
        torch.testing.assert_close(exported, value.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_verify_fp32_passes_and_reports(tmp_path, capsys):
    model = torch_model(NAT_SMALL, seed=4)
    model.save_pretrained(tmp_path / "src")
    assert run_cli("convert", tmp_path / "src", tmp_path / "out", "--verify", "--verify-size",
                   IMAGE) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "ok" in out and "params" in out


def test_base_model_and_backbone_round_trip(tmp_path):
    """HF NatModel / DinatBackbone checkpoints (no model prefix) convert and export too."""
    for head, config in (("base", NAT_SMALL), ("backbone", dataclasses.replace(
            DINAT_SMALL, out_features=("stage1", "stage3")))):
        model = torch_model(config, seed=5, head=head)
        model.save_pretrained(tmp_path / head)
        assert run_cli("convert", tmp_path / head, tmp_path / f"{head}_jax", "--quiet") == 0
        ours = nat_jax.load_pretrained(tmp_path / f"{head}_jax")
        x = pixels()
        out = forward(ours, x)
        with torch.no_grad():
            ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        if head == "base":
            pairs = [(out.last_hidden_state, ref.last_hidden_state)]
        else:
            pairs = list(zip(out.feature_maps, ref.feature_maps))
        for a, b in pairs:
            np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=1e-4)
        assert run_cli("export", tmp_path / f"{head}_jax", tmp_path / f"{head}_hf",
                       "--quiet") == 0
        _, model_cls = torch_natten.import_hf_classes(config.model_type, head)
        back = model_cls.from_pretrained(tmp_path / f"{head}_hf")
        for key, value in model.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["nat_mini", "dinat_mini"])
def test_full_size_mini_original_and_hf(preset, tmp_path):
    config = nat_jax.configs.get(preset)
    model = torch_model(config, seed=7)
    torch.save({"model": hf_to_original(model.state_dict(), config.model_type)},
               tmp_path / f"{preset}.pth")
    assert run_cli("convert", tmp_path / f"{preset}.pth", tmp_path / "out", "--arch", preset,
                   "--quiet") == 0
    ours = nat_jax.load_pretrained(tmp_path / "out")
    assert ours.eval_transform == nat_jax.zoo.PUBLISHED[preset].eval_transform
    assert_matches_torch(ours, model, pixels(batch=1, size=224))
    model.save_pretrained(tmp_path / "hf")
    assert run_cli("convert", tmp_path / "hf", tmp_path / "out_hf", "--quiet") == 0
    assert run_cli("export", tmp_path / "out_hf", tmp_path / "back", "--quiet") == 0
    _, model_cls = torch_natten.import_hf_classes(config.model_type)
    back = model_cls.from_pretrained(tmp_path / "back").eval()
    assert_same_torch_model(back, model, pixels(batch=1, size=64))


# Two presets cover both layer-scale settings and both families quickly; the rest are slow.
_QUICK_PRESETS = ("nat_small", "dinat_mini")


@pytest.mark.parametrize("name", [
    n if n in _QUICK_PRESETS else pytest.param(n, marks=pytest.mark.slow)
    for n in nat_jax.configs.list_presets()])
def test_key_table_matches_modeling_tree(name):
    """A preset's key table covers our parameter tree exactly, with HF and original keys."""
    from nat_jax.convert.pipeline import expected_shapes
    config = nat_jax.configs.get(name)
    rows = keymap.key_table(keymap.Structure.from_config(config))
    assert {r.target for r in rows} == set(expected_shapes(config, "classification"))
    assert all(r.original and r.hf for r in rows)
    for scheme in keymap.SCHEMES:  # no source key is used twice
        keys = [k for r in rows for k in r.keys(scheme)]
        assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("shape,kernel,dilation", [((9, 11), 3, 1), ((10, 13), 3, 3),
                                                   ((7, 7), 7, 1), ((14, 15), 5, 2)])
def test_torch_natten_matches_oracle(shape, kernel, dilation, rng):
    """The stand-in natten2dqkrpb / natten2dav used by --verify equal the float64 oracle."""
    import oracle
    q, k, v = (rng.standard_normal((2, 3, *shape, 4)) for _ in range(3))
    rpb = rng.standard_normal((3, 2 * kernel - 1, 2 * kernel - 1))
    heads_last = lambda a: np.moveaxis(a, 1, 3)  # noqa: E731  [B,h,H,W,x] -> [B,H,W,h,x]
    logits = torch_natten.natten2dqkrpb(torch.from_numpy(q), torch.from_numpy(k),
                                        torch.from_numpy(rpb), kernel, dilation).numpy()
    want = oracle.na_qk(heads_last(q), heads_last(k), kernel, dilation, scale=1.0, rpb=rpb)
    np.testing.assert_allclose(heads_last(logits), want, atol=1e-12)
    attn = rng.random((2, 3, *shape, kernel * kernel))
    out = torch_natten.natten2dav(torch.from_numpy(attn), torch.from_numpy(v), kernel,
                                  dilation).numpy()
    want = oracle.na_av(heads_last(attn), heads_last(v), kernel, dilation)
    np.testing.assert_allclose(heads_last(out), want, atol=1e-12)
    with pytest.raises(ValueError, match="kernel_size"):
        torch_natten.natten2dav(torch.from_numpy(attn), torch.from_numpy(v), shape[0] + 1, 1)


def test_hub_style_config_json_maps_to_our_config():
    """A config.json as published on the hub (extra keys, no eval settings) maps to the preset,
    and to the eval transform of the published checkpoint with that architecture."""
    preset = nat_jax.configs.get("dinat_large_384")
    hub = hf_config.config_to_hf(preset)
    for key in hf_config.TRANSFORM_KEYS:
        hub.pop(key)
    hub.update(path_norm=True, hidden_size=1536, transformers_version="4.26.0.dev0",
               stage_names=["stem", "stage1", "stage2", "stage3", "stage4"])
    config = hf_config.config_from_hf(hub)
    assert type(config) is nat_jax.DinatConfig
    transform = hf_config.eval_transform_from_hf(hub, config)
    assert (transform.image_size, transform.crop_pct) == (384, 1.0)  # the published one
    assert not nat_jax.configs.architecture_differences(config, preset)
    assert nat_jax.label_names(config) == nat_jax.label_names(preset)
    # Our export's extra keys win over the table.
    hub.update(image_size=320, crop_pct=0.95)
    assert hf_config.eval_transform_from_hf(hub, config) == nat_jax.EvalTransform(320, 0.95)
    with pytest.raises(nat_jax.convert.ConversionError, match="wrong model family"):
        hf_config.config_from_hf({"model_type": "swin"})


def test_verify_runs_the_converters_own_natten_functions(tmp_path, monkeypatch):
    """--verify checks against convert.torch_natten even when other natten2dqkrpb/natten2dav
    were bound into transformers first (the parity tests bind their own shim): before, the
    earlier binding stayed, so --verify tested whatever someone else had installed."""
    import importlib

    from nat_jax.convert.pipeline import verify_against_torch

    model = torch_model(NAT_SMALL, seed=9)
    model.save_pretrained(tmp_path / "src")
    ours, _ = nat_jax.convert.convert_model(tmp_path / "src")
    modeling = importlib.import_module(nat_jax.zoo.FAMILIES["nat"].hf_modeling)

    def wrong_qk(query, key, rpb, kernel_size, dilation):  # zero logits: uniform attention
        return torch.zeros(*query.shape[:4], kernel_size * kernel_size)

    monkeypatch.setattr(modeling, "natten2dqkrpb", wrong_qk)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    diff, scale = verify_against_torch(ours, NAT_SMALL, "classification", state, IMAGE)
    assert diff <= 1e-4 * scale
    assert modeling.natten2dqkrpb is wrong_qk  # restored afterwards
    with torch.no_grad():  # and it does break the model, so the check above means something
        broken = model(torch.from_numpy(pixels().transpose(0, 3, 1, 2))).logits.numpy()
    assert np.abs(broken - np.asarray(forward(ours, pixels()).logits)).max() > 1e-2
