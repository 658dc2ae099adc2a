"""HF ``config.json`` <-> nat-jax config (``NatConfig`` / ``DinatConfig``), and architecture checks.

Our config fields carry HF's names, so most of the mapping is the identity; what lives here is the
part that is not: the model family check, the JAX-only fields (``image_size``, ``crop_pct``) that
HF configs lack (taken from the preset with the same architecture), the HF-only bookkeeping
(``architectures``, ``label2id``, ``torch_dtype``) on export, and the comparison of two
architectures used to reject a wrong ``--arch``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nat_jax import configs
from nat_jax.convert.loading import ConversionError

HF_MODEL_TYPES = ("nat", "dinat")
HF_CLASS_STEMS = {"nat": "Nat", "dinat": "Dinat"}
HF_HEAD_SUFFIXES = {"classification": "ForImageClassification", "base": "Model",
                    "backbone": "Backbone"}
# Fields that decide the parameter tree or the forward pass. Everything else (dropout rates,
# initializer range, labels, image size) may differ between a checkpoint and a preset.
ARCH_FIELDS = ("patch_size", "num_channels", "embed_dim", "depths", "num_heads", "kernel_size",
               "mlp_ratio", "qkv_bias", "hidden_act", "layer_norm_eps")
# HF config keys we write that are not dataclass fields of ours.
_HF_FIELDS = ("patch_size", "num_channels", "embed_dim", "depths", "num_heads", "kernel_size",
              "mlp_ratio", "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob",
              "drop_path_rate", "hidden_act", "initializer_range", "layer_norm_eps",
              "layer_scale_init_value")
_JAX_ONLY_FIELDS = ("image_size", "crop_pct")


def architecture_of(config: configs._BaseConfig) -> dict[str, Any]:
    """The fields of ``config`` that fix the weights and the computation (see ARCH_FIELDS)."""
    arch = {"model_type": config.model_type}
    arch.update({name: getattr(config, name) for name in ARCH_FIELDS})
    arch["mlp_ratio"] = float(arch["mlp_ratio"])
    arch["layer_scale"] = config.layer_scale_init_value > 0
    arch["dilations"] = config.layer_dilations
    return arch


def architecture_differences(a: configs._BaseConfig, b: configs._BaseConfig) -> list[str]:
    """``["embed_dim: 64 vs 96", ...]``: every architecture field where ``a`` and ``b`` differ."""
    arch_a, arch_b = architecture_of(a), architecture_of(b)
    return [f"{k}: {arch_a[k]} vs {arch_b[k]}" for k in arch_a if arch_a[k] != arch_b[k]]


def matching_presets(config: configs._BaseConfig) -> list[str]:
    """Presets whose architecture equals ``config``'s (labels and image size aside)."""
    return [name for name in configs.list_presets()
            if not architecture_differences(config, configs.get(name))]


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> configs._BaseConfig:
    """Our config from an HF NAT/DiNAT ``config.json`` dict.

    ``image_size`` / ``crop_pct`` are read if present (configs written by :func:`config_to_hf`
    carry them), else taken from the one preset with the same architecture, else our defaults.
    Raises ConversionError for another model family or invalid values.
    """
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConversionError(f"{source}: model_type={model_type!r} is not a NAT/DiNAT model "
                              f"(expected one of {list(HF_MODEL_TYPES)}): wrong model family")
    try:
        config = configs._BaseConfig.from_dict(hf)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: invalid NAT/DiNAT config: {e}") from None
    if not any(name in hf for name in _JAX_ONLY_FIELDS):
        presets = matching_presets(config)
        if len(presets) == 1:
            preset = configs.get(presets[0])
            config = dataclasses.replace(config, **{name: getattr(preset, name)
                                                    for name in _JAX_ONLY_FIELDS})
    return config


def config_to_hf(config: configs._BaseConfig, head: str = "classification") -> dict[str, Any]:
    """An HF ``config.json`` dict that transformers' ``NatConfig``/``DinatConfig`` loads.

    Label names come from ``config.label_names()`` (ImageNet names for 1000 classes), so the
    PyTorch model's ``id2label`` matches ours. Our ``image_size``/``crop_pct`` ride along as extra
    keys (transformers keeps unknown keys as attributes) so a round trip keeps them.
    """
    architecture = HF_CLASS_STEMS[config.model_type] + HF_HEAD_SUFFIXES[head]
    hf: dict[str, Any] = {"architectures": [architecture], "model_type": config.model_type}
    for name in _HF_FIELDS:
        value = getattr(config, name)
        hf[name] = list(value) if isinstance(value, tuple) else value
    if config.model_type == "dinat":
        hf["dilations"] = [list(d) for d in config.dilations]
    out_features, out_indices = config.backbone_stages()
    hf["out_features"], hf["out_indices"] = list(out_features), list(out_indices)
    try:
        names = config.label_names()
    except ImportError:  # label table not available: HF's own default names
        names = [f"LABEL_{i}" for i in range(config.num_labels)]
    hf["id2label"] = {str(i): name for i, name in enumerate(names)}
    hf["label2id"] = {name: i for i, name in enumerate(names)}
    hf["torch_dtype"] = "float32"
    for name in _JAX_ONLY_FIELDS:
        hf[name] = getattr(config, name)
    return hf
