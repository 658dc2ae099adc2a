"""save_pretrained / load_pretrained round trips, preprocessing and the predict helper."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nat_jax
from nat_jax import DinatConfig, NatConfig
from nat_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD

SMALL = DinatConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                    dilations=((2,), (1,), (1,), (1,)), mlp_ratio=2.0, num_labels=4,
                    id2label={0: "cat", 1: "dog", 2: "fish", 3: "bird"},
                    layer_scale_init_value=1e-2, drop_path_rate=0.1)


@pytest.fixture(scope="module")
def model():
    return nat_jax.build_model(SMALL, rngs=nnx.Rngs(7))


@nnx.jit
def _forward(m, x):
    return m(x, output_hidden_states=True)


def test_round_trip_identical_outputs(tmp_path, model, rng):
    path = nat_jax.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "params"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["architectures"] == ["DinatForImageClassification"]
    assert meta["id2label"]["1"] == "dog" and meta["model_type"] == "dinat"
    loaded = nat_jax.load_pretrained(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    x = jnp.asarray(rng.standard_normal((2, 32, 48, 3)), jnp.float32)
    a, b = _forward(model, x), _forward(loaded, x)
    np.testing.assert_array_equal(a.logits, b.logits)
    for p, q in zip(a.hidden_states, b.hidden_states):
        np.testing.assert_array_equal(p, q)
    # The classifier checkpoint also loads as the bare model.
    base = nat_jax.load_pretrained(path, head="base")
    assert isinstance(base, nat_jax.DinatModel)
    np.testing.assert_array_equal(_forward(base, x).hidden_states[-1], a.hidden_states[-1])
    # Overrides: bf16 compute keeps float32 parameters.
    half = nat_jax.load_pretrained(path, dtype="bfloat16", na_backend="reference")
    assert half.config.dtype == "bfloat16" and half.config.na_backend == "reference"
    np.testing.assert_allclose(_forward(half, x).logits, a.logits, atol=5e-2, rtol=5e-2)


def test_existing_path_and_overwrite(tmp_path, model):
    path = tmp_path / "ckpt"
    nat_jax.save_pretrained(model, path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        nat_jax.save_pretrained(model, path)
    other = nat_jax.build_model(SMALL, rngs=nnx.Rngs(8))
    nat_jax.save_pretrained(other, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp dirs left behind
    loaded = nat_jax.load_pretrained(path)
    got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    want = nnx.to_pure_dict(nnx.state(other, nnx.Param))
    np.testing.assert_array_equal(got["classifier"]["kernel"], want["classifier"]["kernel"])


def test_failed_save_leaves_nothing(tmp_path, model, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        nat_jax.save_pretrained(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_mismatched_checkpoint_is_rejected(tmp_path, model):
    path = nat_jax.save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["embed_dim"] = 32
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match"):
        nat_jax.load_pretrained(path)


def _params(module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def test_checkpoints_load_into_smaller_heads_only(tmp_path, model, rng, caplog):
    """As transformers does: a classifier checkpoint loads as a backbone (classifier and final
    norm dropped, the feature-map norms newly initialized, with a warning) and as a base
    model; a base checkpoint as a backbone. Larger heads are a clear ValueError."""
    path = nat_jax.save_pretrained(model, tmp_path / "classifier")
    with caplog.at_level(logging.WARNING, logger="nat_jax.pretrained"):
        backbone = nat_jax.load_pretrained(path, head="backbone")
    assert isinstance(backbone, nat_jax.DinatBackbone)
    got, saved = _params(backbone), _params(model)["dinat"]
    assert sorted(got) == ["embeddings", "encoder", "hidden_states_norms"]
    for part in ("embeddings", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, got[part], saved[part])
    norm = got["hidden_states_norms"]["stage4"]
    np.testing.assert_array_equal(norm["scale"], np.ones(norm["scale"].shape))
    np.testing.assert_array_equal(norm["bias"], np.zeros(norm["bias"].shape))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "hidden_states_norms newly initialized" in warned and "layernorm" in warned
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32)
    assert backbone(x).feature_maps[0].shape == (1, 128, 1, 1)  # stage 4 of 32x32: 1x1

    base_path = nat_jax.save_pretrained(nat_jax.load_pretrained(path, head="base"),
                                        tmp_path / "base")
    from_base = nat_jax.load_pretrained(base_path, head="backbone")
    jax.tree.map(np.testing.assert_array_equal, _params(from_base)["encoder"], saved["encoder"])
    backbone_path = nat_jax.save_pretrained(backbone, tmp_path / "backbone")
    for ckpt, head, allowed in [(base_path, "classification", "'base', 'backbone'"),
                                (backbone_path, "classification", "'backbone'"),
                                (backbone_path, "base", "'backbone'")]:
        with pytest.raises(ValueError, match=f"lacks weights the '{head}' head needs; load it "
                                             f"with head= one of {allowed}"):
            nat_jax.load_pretrained(ckpt, head=head)


# ------------------------------------------------------------------ preprocessing


def test_imagenet_labels():
    labels = nat_jax.imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) == 999  # "crane": bird and machine
    assert labels[0] == "tench, Tinca tinca" and labels[281] == "tabby, tabby cat"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_preprocess_matches_timm_eval_transform():
    """Resize 256 (bicubic, PIL) + center crop 224 + normalize, against a direct PIL pipeline."""
    from PIL import Image
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = nat_jax.preprocess(img)
    assert out.shape == (1, 224, 224, 3) and out.dtype == np.float32
    ref = Image.fromarray(img).resize((341, 256), Image.BICUBIC)  # int(256 * 400 / 300) = 341
    left, top = int(round((341 - 224) / 2)), 16
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), np.float32) / 255
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    # PIL input, gray input, batches and crop_pct=1.0 (the 384 models).
    batch = nat_jax.preprocess([Image.fromarray(img), img[..., 0]])
    assert batch.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(batch[0], out[0])
    assert nat_jax.preprocess(np.stack([img, img]), 384, crop_pct=1.0).shape == (2, 384, 384, 3)
    with pytest.raises(ValueError, match="uint8"):
        nat_jax.preprocess(img.astype(np.float32))


def test_preprocess_high_bit_depth_images_like_training(tmp_path):
    """16-bit, 32-bit and float PIL images are scaled to their peak, as the training pipeline
    decodes them (PIL's own RGB conversion clipped a 16-bit image to white)."""
    from PIL import Image

    from nat_jax.train import input_pipeline

    rng = np.random.default_rng(3)
    values = rng.integers(0, 4000, (40, 48))
    images = {"I;16": Image.fromarray(values.astype(np.uint16)),
              "I": Image.fromarray(values.astype(np.int32)),
              "F": Image.fromarray((values / 4000).astype(np.float32))}
    for mode, image in images.items():
        assert image.mode == mode
        array = np.asarray(image, np.float64)
        gray = np.floor(array * 255 / max(array.max(), 1.0) + 1e-6).astype(np.uint8)
        expected = nat_jax.preprocess(np.dstack([gray] * 3), 32, crop_pct=1.0)
        np.testing.assert_allclose(nat_jax.preprocess(image, 32, crop_pct=1.0), expected,
                                   atol=1e-5, err_msg=mode)
    # The training pipeline decodes the same 16-bit image (as a PNG file) to the same pixels.
    images["I;16"].save(tmp_path / "deep.png")
    decoded = input_pipeline.decode({"file": str(tmp_path / "deep.png"), "label": 0})["image"]
    np.testing.assert_array_equal(
        decoded, np.dstack([np.floor(values * 255 / values.max() + 1e-6).astype(np.uint8)] * 3))
    assert decoded.max() == 255  # the peak, not a clipped white image


def test_empty_inputs_and_bad_k_are_rejected(model):
    with pytest.raises(ValueError, match="no images to preprocess"):
        nat_jax.preprocess([])
    with pytest.raises(ValueError, match=r"image of shape \(0, 0, 3\) is empty"):
        nat_jax.preprocess(np.zeros((0, 0, 3), np.uint8))
    pixels = np.zeros((1, 32, 32, 3), np.float32)
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"k={k} must be >= 1"):
            nat_jax.predict(model, pixels, k=k)
        with pytest.raises(ValueError, match=f"k={k} must be >= 1"):
            nat_jax.top_k(np.zeros((1, 4)), k)


def test_top_k_and_predict(model):
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    top = nat_jax.top_k(logits, 2, ["a", "b", "c", "d"])
    assert [(i, n) for i, n, _ in top[0]] == [(1, "b"), (3, "d")]
    assert abs(sum(p for *_, p in nat_jax.top_k(logits, 4)[0]) - 1) < 1e-6
    img = np.random.default_rng(1).integers(0, 256, (80, 64, 3), dtype=np.uint8)
    small = nat_jax.preprocess(img, 64, crop_pct=1.0)
    preds = nat_jax.predict(model, small, k=3)
    assert len(preds) == 1 and len(preds[0]) == 3
    assert {name for _, name, _ in preds[0]} <= {"cat", "dog", "fish", "bird"}
    probs = [p for *_, p in preds[0]]
    assert probs == sorted(probs, reverse=True)


def test_nat_config_labels_default_to_imagenet():
    config = NatConfig()
    assert config.label_names()[1] == "goldfish, Carassius auratus"
