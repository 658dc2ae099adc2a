"""nat_jax.from_pretrained: Hub repos through huggingface_hub's cache (laid out here by hand,
offline), converted once and cached per commit; preset names; local nat-jax and PyTorch
checkpoints."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test extra: a missing one must fail, not skip
from flax import nnx

import nat_jax
from nat_jax import hub
from test_convert import DINAT_SMALL, pixels, torch_model

REPO = "test-org/tiny-dinat"


def _commit(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # 40 hex digits, like a git commit


def _add_snapshot(cache, repo: str, commit: str, model, *, refs=(), safetensors=False):
    """One snapshot of ``repo`` in a huggingface_hub cache: snapshots/<commit>/ with config.json
    and the weights (as transformers' save_pretrained writes them), refs/<name> -> commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    model.save_pretrained(snapshot, safe_serialization=safetensors)
    config = json.loads((snapshot / "config.json").read_text())
    for key in ("image_size", "crop_pct", "mean", "std"):  # as published: no eval settings
        config.pop(key, None)
    (snapshot / "config.json").write_text(json.dumps(config))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Two commits of REPO: main (pytorch_model.bin) and tag v2 (model.safetensors, other
    weights); the converted-checkpoint cache in tmp_path/nat_jax."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "nat_jax"))
    cache = tmp_path / "hf"
    first, second = torch_model(DINAT_SMALL, seed=31), torch_model(DINAT_SMALL, seed=32)
    _add_snapshot(cache, REPO, _commit("one"), first, refs=("main",))
    _add_snapshot(cache, REPO, _commit("two"), second, refs=("v2",), safetensors=True)
    return cache, {"main": first, "v2": second}


def _torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()


@nnx.jit
def _logits(model, x):
    return model(x).logits


def test_hub_repo_converts_once_per_commit(hub_cache, monkeypatch):
    cache, torch_models = hub_cache
    x = pixels()
    model = nat_jax.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    np.testing.assert_allclose(_logits(model, jnp.asarray(x)),
                               _torch_logits(torch_models["main"], x), atol=1e-4, rtol=1e-4)
    converted = hub.converted_path(REPO, _commit("one"))
    assert (converted / "params").is_dir() and (converted / "config.json").is_file()
    # The published config has no eval settings: the default transform (no preset matches).
    assert model.eval_transform == nat_jax.EvalTransform()

    # Cached: the next call neither converts nor needs the PyTorch weights any more.
    import nat_jax.convert as convert_package

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    convert = convert_package.convert
    monkeypatch.setattr(convert_package, "convert", no_conversion)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / _commit("one")
    (snapshot / "pytorch_model.bin").unlink()
    again = nat_jax.from_pretrained(REPO, cache_dir=cache, local_files_only=True,
                                    dtype="bfloat16")
    assert again.options.dtype == "bfloat16"
    np.testing.assert_allclose(_logits(again, jnp.asarray(x)), _logits(model, jnp.asarray(x)),
                               atol=5e-2, rtol=5e-2)
    monkeypatch.setattr(convert_package, "convert", convert)

    # Another revision (a tag, or its commit hash): other weights, converted into its own entry.
    for revision in ("v2", _commit("two")):
        other = nat_jax.from_pretrained(REPO, revision=revision, cache_dir=cache,
                                        local_files_only=True)
        np.testing.assert_allclose(_logits(other, jnp.asarray(x)),
                                   _torch_logits(torch_models["v2"], x), atol=1e-4, rtol=1e-4)
    assert (hub.converted_path(REPO, _commit("two")) / "params").is_dir()


def test_offline_mode_and_missing_entries(hub_cache, monkeypatch):
    cache, _ = hub_cache
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    model = nat_jax.from_pretrained(REPO, cache_dir=cache, head="base")
    assert isinstance(model, nat_jax.DinatModel)
    for name, revision, message in [
        ("test-org/absent", None, "test-org/absent is not in the Hugging Face cache"),
        (REPO, "v9", "is not in the Hugging Face cache"),
        ("dinat_mini", None, "shi-labs/dinat-mini-in1k-224 is not in the Hugging Face cache"),
        ("no-such-model", None, "is neither a local path, a preset with published weights"),
    ]:
        with pytest.raises(hub.PretrainedNotFoundError, match=message) as error:
            nat_jax.from_pretrained(name, revision=revision, cache_dir=cache)
        assert "\n" not in str(error.value)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / _commit("two")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(hub.PretrainedNotFoundError, match="has none of model.safetensors"):
        nat_jax.from_pretrained(REPO, revision="v2", cache_dir=cache)


def test_local_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "nat_jax"))
    torch_dinat = torch_model(DINAT_SMALL, seed=33)
    torch_dinat.save_pretrained(tmp_path / "hf")
    x = pixels()
    want = _torch_logits(torch_dinat, x)
    # A PyTorch directory: converted in memory, no conversion cached (the cache root may hold
    # the cpu backend's compiled kernels, built there on first use).
    model = nat_jax.from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(_logits(model, jnp.asarray(x)), want, atol=1e-4, rtol=1e-4)
    assert not (tmp_path / "nat_jax" / "converted").exists()
    backbone = nat_jax.from_pretrained(tmp_path / "hf", head="backbone", na_backend="reference")
    assert isinstance(backbone, nat_jax.DinatBackbone)
    assert backbone.options.na_backend == "reference"
    # A nat-jax checkpoint: loaded as is.
    nat_jax.save_pretrained(model, tmp_path / "ours")
    loaded = nat_jax.from_pretrained(str(tmp_path / "ours"))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded, nnx.Param),
                 nnx.state(model, nnx.Param))
