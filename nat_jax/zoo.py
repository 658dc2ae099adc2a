"""The model zoo, in one place: families, heads, published checkpoints, and building a model.

* :data:`FAMILIES`: ``"nat"`` and ``"dinat"``, each with its config class, its module class per
  head and the transformers modules of its PyTorch twin.
* :data:`HEADS`: ``"classification"``, ``"base"`` and ``"backbone"``, with the class-name suffix
  that ours and HF's classes share (``NatForImageClassification``, ``NatModel``,
  ``NatBackbone``).
* :data:`PUBLISHED`: every published ImageNet checkpoint (SHI-Labs, on the HuggingFace Hub) by
  preset name: hub id, eval preprocessing (image size, crop, mean/std) and reported top-1.
* :func:`build_model` / :func:`abstract_model`: the one way a model's structure is made, for
  real or as shapes (loading, converting and training all start from the latter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from flax import nnx

from nat_jax import configs
from nat_jax.configs import DinatConfig, ModelConfig, NatConfig
from nat_jax.modeling import (DinatBackbone, DinatForImageClassification, DinatModel,
                              NatBackbone, NatForImageClassification, NatModel)
from nat_jax.preprocess import EvalTransform

__all__ = ["FAMILIES", "HEADS", "PUBLISHED", "Family", "Published", "abstract_model",
           "build_model", "eval_transform_for", "family", "head_of", "init_rest", "model_class",
           "published", "seed_rngs"]

# head -> the suffix of its class names (ours and HF's: NatForImageClassification, NatModel...).
HEADS: dict[str, str] = {"classification": "ForImageClassification", "base": "Model",
                         "backbone": "Backbone"}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its config class, module class per head, and transformers' modules
    holding the PyTorch classes of the same names (used by ``convert --verify``)."""

    config_class: type[ModelConfig]
    classes: Mapping[str, type[nnx.Module]]
    hf_modeling: str
    hf_configuration: str

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def class_name(self, head: str) -> str:
        """``NatForImageClassification`` etc.: ours, and HF's for the same head."""
        return self.classes[_check_head(head)].__name__


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(NatConfig, {"classification": NatForImageClassification, "base": NatModel,
                       "backbone": NatBackbone},
           "transformers.models.deprecated.nat.modeling_nat",
           "transformers.models.deprecated.nat.configuration_nat"),
    Family(DinatConfig, {"classification": DinatForImageClassification, "base": DinatModel,
                         "backbone": DinatBackbone},
           "transformers.models.dinat.modeling_dinat",
           "transformers.models.dinat.configuration_dinat"),
)}


def _check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"head={head!r} must be one of {tuple(HEADS)}")
    return head


def family(model_type: str) -> Family:
    """The :class:`Family` of ``model_type`` ("nat" or "dinat")."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not one of {list(FAMILIES)}")
    return FAMILIES[model_type]


def model_class(config: ModelConfig, head: str = "classification") -> type[nnx.Module]:
    """Module class for ``config`` and ``head`` ("classification", "base" or "backbone")."""
    return family(config.model_type).classes[_check_head(head)]


def head_of(class_name: str) -> str:
    """The head of a model class name (ours or HF's), e.g. "DinatBackbone" -> "backbone"."""
    for fam in FAMILIES.values():
        for head, cls in fam.classes.items():
            if cls.__name__ == class_name:
                return head
    raise ValueError(f"{class_name!r} is not a NAT/DiNAT model class")


# ------------------------------------------------------------------ published checkpoints


@dataclasses.dataclass(frozen=True)
class Published:
    """A published checkpoint: ``preset`` (architecture, :mod:`nat_jax.configs`), where its
    weights live, its eval preprocessing and its reported ImageNet-1k top-1 (%)."""

    preset: str
    hub_id: str
    eval_transform: EvalTransform
    top1: float

    @property
    def config(self) -> ModelConfig:
        return configs.get(self.preset)


_AT_384 = EvalTransform(image_size=384, crop_pct=1.0)

PUBLISHED: dict[str, Published] = {p.preset: p for p in (
    Published("nat_mini", "shi-labs/nat-mini-in1k-224", EvalTransform(), 81.8),
    Published("nat_tiny", "shi-labs/nat-tiny-in1k-224", EvalTransform(), 83.2),
    Published("nat_small", "shi-labs/nat-small-in1k-224", EvalTransform(), 83.7),
    Published("nat_base", "shi-labs/nat-base-in1k-224", EvalTransform(), 84.3),
    Published("dinat_mini", "shi-labs/dinat-mini-in1k-224", EvalTransform(), 81.8),
    Published("dinat_tiny", "shi-labs/dinat-tiny-in1k-224", EvalTransform(), 82.7),
    Published("dinat_small", "shi-labs/dinat-small-in1k-224", EvalTransform(), 83.8),
    Published("dinat_base", "shi-labs/dinat-base-in1k-224", EvalTransform(), 84.4),
    Published("dinat_large", "shi-labs/dinat-large-in22k-in1k-224", EvalTransform(), 86.6),
    Published("dinat_large_384", "shi-labs/dinat-large-in22k-in1k-384", _AT_384, 87.4),
    Published("dinat_large_384_k11", "shi-labs/dinat-large-11x11-in22k-in1k-384", _AT_384,
              87.5),
)}


def published(name: str) -> Published | None:
    """The published checkpoint with preset name or hub id ``name`` (case-insensitive for hub
    ids, as the Hub is), or None."""
    if name in PUBLISHED:
        return PUBLISHED[name]
    return next((p for p in PUBLISHED.values() if p.hub_id.lower() == name.lower()), None)


def eval_transform_for(config: ModelConfig) -> EvalTransform:
    """The eval preprocessing of the published checkpoint with ``config``'s architecture (the
    default 224 / 0.875 transform when none or several match)."""
    names = configs.presets_matching(config.architecture())
    return PUBLISHED[names[0]].eval_transform if len(names) == 1 else EvalTransform()


# ------------------------------------------------------------------ building


def seed_rngs(seed: int) -> nnx.Rngs:
    """The RNG streams every nat-jax model is built with: parameters from ``seed``, dropout
    and drop path from ``seed + 1``."""
    return nnx.Rngs(params=seed, dropout=seed + 1)


def build_model(config: ModelConfig, *, rngs: nnx.Rngs, head: str = "classification",
                **options) -> nnx.Module:
    """The model for ``config`` and ``head`` ("classification", "base" or "backbone").

    ``options``: the build-time arguments of the model classes (``dtype``, ``param_dtype``,
    ``na_backend``, ``remat``, ``eval_transform``; see :class:`nat_jax.modeling.BuildOptions`).
    """
    return model_class(config, head)(config, rngs=rngs, **options)


def abstract_model(config: ModelConfig, head: str = "classification", *, seed: int = 0,
                   **options) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)`` of a model, as shapes: nothing is allocated or initialized.

    ``params`` is the ``nnx.Param`` state (``jax.ShapeDtypeStruct`` leaves) to fill, e.g. with
    ``nnx.replace_by_pure_dict``; ``rest`` the other state (dropout RNG streams), whose values
    :func:`init_rest` makes. ``nnx.merge(graphdef, params, rest)`` is the model.
    """
    model = nnx.eval_shape(lambda: build_model(config, rngs=seed_rngs(seed), head=head,
                                               **options))
    return nnx.split(model, nnx.Param, ...)


def init_rest(config: ModelConfig, head: str = "classification", *, seed: int = 0,
              **options) -> nnx.State:
    """The non-parameter state of a new model (its RNG streams), as :func:`build_model` with
    :func:`seed_rngs` would make it; under jit XLA drops the parameter initializers."""
    return jax.jit(lambda: nnx.split(build_model(config, rngs=seed_rngs(seed), head=head,
                                                 **options), nnx.Param, ...)[2])()
