"""HF ``config.json`` <-> nat-jax config (``NatConfig`` / ``DinatConfig``) and eval transform.

Our config classes are HF's fields exactly, so the architecture maps one to one
(``ModelConfig.from_dict`` / ``to_dict``). What lives here is the rest: the model family check,
the HF-only bookkeeping (``architectures``, ``label2id``, ``torch_dtype``) on export, and the eval
preprocessing, which HF keeps outside ``config.json``: read from the extra keys our export writes
(``image_size``, ``crop_pct``, ``mean``, ``std``; transformers keeps unknown keys as attributes),
else from the published checkpoint with the same architecture (:mod:`nat_jax.zoo`).
"""

from __future__ import annotations

from typing import Any

from nat_jax import zoo
from nat_jax.configs import ModelConfig
from nat_jax.convert.loading import ConversionError
from nat_jax.preprocess import EvalTransform, label_names

# Eval-transform fields written as extra config.json keys (EvalTransform's fields).
TRANSFORM_KEYS = ("image_size", "crop_pct", "mean", "std")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our config from an HF NAT/DiNAT ``config.json`` dict.

    Raises ConversionError for another model family or invalid values.
    """
    model_type = hf.get("model_type")
    if model_type not in zoo.FAMILIES:
        raise ConversionError(f"{source}: model_type={model_type!r} is not a NAT/DiNAT model "
                              f"(expected one of {list(zoo.FAMILIES)}): wrong model family")
    try:
        return ModelConfig.from_dict(hf)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: invalid NAT/DiNAT config: {e}") from None


def eval_transform_from_hf(hf: dict[str, Any] | None, config: ModelConfig,
                           source: str = "config.json") -> EvalTransform:
    """The eval transform stored in ``hf`` (our export's extra keys), else the one of the
    published checkpoint with ``config``'s architecture, else the default (224, crop 0.875)."""
    given = {k: hf[k] for k in TRANSFORM_KEYS if hf and hf.get(k) is not None}
    if not given:
        return zoo.eval_transform_for(config)
    try:
        return EvalTransform(**given)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: invalid eval transform: {e}") from None


def config_to_hf(config: ModelConfig, head: str = "classification",
                 eval_transform: EvalTransform | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict that transformers' ``NatConfig``/``DinatConfig`` loads.

    Label names come from :func:`nat_jax.label_names` (ImageNet names for 1000 classes), so the
    PyTorch model's ``id2label`` matches ours. The eval transform rides along as extra keys so a
    round trip keeps it.
    """
    hf: dict[str, Any] = {"architectures": [zoo.family(config.model_type).class_name(head)]}
    hf.update(config.to_dict())
    out_features, out_indices = config.backbone_stages()
    hf["out_features"], hf["out_indices"] = list(out_features), list(out_indices)
    names = label_names(config)
    hf["id2label"] = {str(i): name for i, name in enumerate(names)}
    hf["label2id"] = {name: i for i, name in enumerate(names)}
    hf["torch_dtype"] = "float32"
    transform = eval_transform or zoo.eval_transform_for(config)
    hf.update({k: list(v) if isinstance(v, tuple) else v
               for k, v in ((k, getattr(transform, k)) for k in TRANSFORM_KEYS)})
    return hf
