"""Model configurations (``NatConfig``, ``DinatConfig``) and the preset registry.

Field names follow HuggingFace transformers' ``NatConfig`` / ``DinatConfig`` so configs move
between the two; JAX-only fields are ``dtype`` (compute), ``param_dtype``, ``na_backend``,
``image_size`` and ``crop_pct`` (eval preprocessing).

Presets cover every published ImageNet model (see ``shared/reference/checkpoints.md``)::

    NatConfig.from_preset("nat_mini")
    nat_jax.configs.get("dinat_tiny")        # -> DinatConfig
    nat_jax.configs.list_presets()
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp

__all__ = ["DinatConfig", "NatConfig", "PRESETS", "PRETRAINED_SOURCES", "get", "list_presets",
           "model_class_for"]

_HEADS = ("classification", "base", "backbone")


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class _BaseConfig:
    """Fields shared by NAT and DiNAT (HF names and defaults, except the JAX-only ones)."""

    model_type: ClassVar[str] = ""

    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 64
    depths: tuple[int, ...] = (3, 4, 6, 5)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    kernel_size: int = 7
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    layer_scale_init_value: float = 0.0
    out_features: tuple[str, ...] | None = None
    out_indices: tuple[int, ...] | None = None
    num_labels: int = 1000
    id2label: dict[int, str] | None = None
    image_size: int = 224
    crop_pct: float = 0.875
    dtype: str = "float32"
    param_dtype: str = "float32"
    na_backend: str = "auto"

    def __post_init__(self):
        for name in ("depths", "num_heads", "out_features", "out_indices"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.id2label is not None:
            object.__setattr__(self, "id2label",
                               {int(k): str(v) for k, v in dict(self.id2label).items()})
            if len(self.id2label) != self.num_labels:
                raise ValueError(f"len(id2label)={len(self.id2label)} must equal "
                                 f"num_labels={self.num_labels}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths={self.depths} and num_heads={self.num_heads} must have "
                             "one entry per stage")
        for name in ("embed_dim", "num_channels", "depths", "num_heads"):
            value = getattr(self, name)
            if not value or min(value if isinstance(value, tuple) else (value,)) < 1:
                raise ValueError(f"{name}={value} must be >= 1 (every entry)")
        for i, h in enumerate(self.num_heads):
            if self.stage_dims[i] % h:
                raise ValueError(f"num_heads[{i}]={h} must divide the stage width "
                                 f"{self.stage_dims[i]} (embed_dim * 2**{i})")
        if self.patch_size != 4:
            raise ValueError(f"patch_size={self.patch_size}: only 4 (two stride-2 convs) exists")
        if self.kernel_size < 2:
            raise ValueError(f"kernel_size={self.kernel_size} must be >= 2")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only exact 'gelu' is supported")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises TypeError on an unknown dtype name
        dil = self.layer_dilations
        for i, (d, n) in enumerate(zip(dil, self.depths)):
            if len(d) != n:
                raise ValueError(f"dilations[{i}] has {len(d)} entries, depths[{i}]={n}")
        self.backbone_stages()  # validates out_features / out_indices

    def __hash__(self) -> int:
        # Modules keep the config as static data, which JAX hashes; id2label is a dict.
        return hash(self.to_json(indent=None))

    # -------------------------------------------------------------- derived values

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width of each stage: ``embed_dim * 2**i``."""
        return tuple(int(self.embed_dim * 2 ** i) for i in range(len(self.depths)))

    @property
    def hidden_size(self) -> int:
        """Width of the last stage (HF ``hidden_size``)."""
        return self.stage_dims[-1]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem",) + tuple(f"stage{i}" for i in range(1, len(self.depths) + 1))

    @property
    def layer_dilations(self) -> tuple[tuple[int, ...], ...]:
        """Dilation of every layer, per stage (all ones for NAT)."""
        return tuple((1,) * n for n in self.depths)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self):
        return jnp.dtype(self.param_dtype)

    def backbone_stages(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """``(out_features, out_indices)`` aligned as HF does for backbones.

        Default is the last stage; either list may be given and the other is derived from it
        (the raw fields stay as given so ``dataclasses.replace`` of one of them just works).
        """
        names = self.stage_names
        feats, idx = self.out_features, self.out_indices
        if feats is None and idx is None:
            feats, idx = (names[-1],), (len(names) - 1,)
        elif feats is None:
            idx = tuple(i % len(names) for i in idx)
            for i in idx:
                if not 0 <= i < len(names):
                    raise ValueError(f"out_indices={self.out_indices} out of range for {names}")
            feats = tuple(names[i] for i in idx)
        elif idx is None:
            for f in feats:
                if f not in names:
                    raise ValueError(f"out_features={feats}: {f!r} is not one of {names}")
            idx = tuple(names.index(f) for f in feats)
        elif tuple(names[i] for i in idx) != tuple(feats):
            raise ValueError(f"out_features={feats} and out_indices={idx} disagree "
                             f"(stage names {names})")
        return tuple(feats), tuple(idx)

    def label_names(self) -> list[str]:
        """Class names: ``id2label`` if set, ImageNet-1k names for 1000 classes, else LABEL_i."""
        if self.id2label is not None:
            return [self.id2label[i] for i in range(self.num_labels)]
        if self.num_labels == 1000:
            from nat_jax.preprocess import imagenet_labels
            return list(imagenet_labels())
        return [f"LABEL_{i}" for i in range(self.num_labels)]

    # -------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        if d["id2label"] is not None:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _BaseConfig:
        """Build from a dict (ours or an HF ``config.json``; unknown HF keys are ignored)."""
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        target = cls
        if cls is _BaseConfig or model_type != cls.model_type:
            target = _CONFIG_CLASSES.get(model_type)
            if target is None:
                raise ValueError(f"model_type={model_type!r} is not one of "
                                 f"{sorted(_CONFIG_CLASSES)}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("id2label") is not None and "num_labels" not in d:
            kwargs["num_labels"] = len(kwargs["id2label"])
        return target(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> _BaseConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> _BaseConfig:
        """The config of a published model, e.g. ``NatConfig.from_preset("nat_mini")``."""
        config = get(name, **overrides)
        if cls is not _BaseConfig and not isinstance(config, cls):
            raise ValueError(f"preset {name!r} is a {type(config).__name__}, not a "
                             f"{cls.__name__}")
        return config


@dataclasses.dataclass(frozen=True)
class NatConfig(_BaseConfig):
    """Neighborhood Attention Transformer (NAT) configuration (HF ``NatConfig`` fields)."""

    model_type: ClassVar[str] = "nat"
    __hash__ = _BaseConfig.__hash__


@dataclasses.dataclass(frozen=True)
class DinatConfig(_BaseConfig):
    """Dilated NAT configuration: ``dilations[stage][layer]`` (HF ``DinatConfig`` fields)."""

    model_type: ClassVar[str] = "dinat"

    dilations: tuple[tuple[int, ...], ...] = ((1, 8, 1), (1, 4, 1, 4), (1, 2, 1, 2, 1, 2),
                                              (1, 1, 1, 1, 1))
    __hash__ = _BaseConfig.__hash__

    def __post_init__(self):
        object.__setattr__(self, "dilations", tuple(tuple(int(x) for x in d)
                                                    for d in self.dilations))
        if len(self.dilations) != len(self.depths):
            raise ValueError(f"dilations has {len(self.dilations)} stages, depths "
                             f"{len(self.depths)}")
        if any(x < 1 for d in self.dilations for x in d):
            raise ValueError(f"dilations={self.dilations}: every dilation must be >= 1")
        super().__post_init__()

    @property
    def layer_dilations(self) -> tuple[tuple[int, ...], ...]:
        return self.dilations


_CONFIG_CLASSES: dict[str, type[_BaseConfig]] = {"nat": NatConfig, "dinat": DinatConfig}

# ------------------------------------------------------------------ presets

_D224 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
_D384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3) * 9, (1,) * 5)
_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
             drop_path_rate=0.2)
_TINY = dict(_MINI, depths=(3, 4, 18, 5))
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
              drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
             drop_path_rate=0.5, layer_scale_init_value=1e-5)
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0,
              drop_path_rate=0.35)

# name -> config (configs are frozen, so the registry's instances can be shared).
PRESETS: dict[str, NatConfig | DinatConfig] = {
    "nat_mini": NatConfig(**_MINI),
    "nat_tiny": NatConfig(**_TINY),
    "nat_small": NatConfig(**_SMALL, layer_scale_init_value=1e-5),
    "nat_base": NatConfig(**_BASE),
    "dinat_mini": DinatConfig(**_MINI, dilations=((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3,
                                                  (1,) * 5)),
    "dinat_tiny": DinatConfig(**_TINY, dilations=_D224),
    "dinat_small": DinatConfig(**_SMALL, dilations=_D224),
    "dinat_base": DinatConfig(**_BASE, dilations=_D224),
    "dinat_large": DinatConfig(**_LARGE, dilations=_D224),
    "dinat_large_384": DinatConfig(**_LARGE, dilations=_D384, image_size=384, crop_pct=1.0),
    "dinat_large_384_k11": DinatConfig(**_LARGE, dilations=_D224, kernel_size=11,
                                       image_size=384, crop_pct=1.0),
}

# Where the published weights live (for the converter and the README); nothing downloads here.
PRETRAINED_SOURCES: dict[str, str] = {
    "nat_mini": "shi-labs/nat-mini-in1k-224",
    "nat_tiny": "shi-labs/nat-tiny-in1k-224",
    "nat_small": "shi-labs/nat-small-in1k-224",
    "nat_base": "shi-labs/nat-base-in1k-224",
    "dinat_mini": "shi-labs/dinat-mini-in1k-224",
    "dinat_tiny": "shi-labs/dinat-tiny-in1k-224",
    "dinat_small": "shi-labs/dinat-small-in1k-224",
    "dinat_base": "shi-labs/dinat-base-in1k-224",
    "dinat_large": "shi-labs/dinat-large-in22k-in1k-224",
    "dinat_large_384": "shi-labs/dinat-large-in22k-in1k-384",
    "dinat_large_384_k11": "shi-labs/dinat-large-11x11-in22k-in1k-384",
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get` / ``from_preset``."""
    return list(PRESETS)


def get(name: str, **overrides) -> NatConfig | DinatConfig:
    """Config of preset ``name`` (``NatConfig`` or ``DinatConfig``), with field overrides.

    Raises:
      ValueError: for an unknown name (the message lists the presets).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    config = PRESETS[name]
    return dataclasses.replace(config, **overrides) if overrides else config


def model_class_for(config: _BaseConfig, head: str = "classification") -> type:
    """Module class for ``config`` and ``head`` ("classification", "base" or "backbone")."""
    from nat_jax import modeling
    if head not in _HEADS:
        raise ValueError(f"head={head!r} must be one of {_HEADS}")
    table = {
        "nat": (modeling.NatForImageClassification, modeling.NatModel, modeling.NatBackbone),
        "dinat": (modeling.DinatForImageClassification, modeling.DinatModel,
                  modeling.DinatBackbone),
    }
    if config.model_type not in table:
        raise ValueError(f"config.model_type={config.model_type!r} is not one of {list(table)}")
    return table[config.model_type][_HEADS.index(head)]

