"""Model configurations (``NatConfig``, ``DinatConfig``) and the preset registry: architecture data.

Field names and defaults are HuggingFace transformers' ``NatConfig`` / ``DinatConfig``, so a
``config.json`` moves between the two unchanged. Nothing here depends on how a model runs
(compute dtype, NA backend, rematerialization: build-time arguments of the modules, see
:func:`nat_jax.zoo.build_model`) or on its published checkpoint (hub id, eval image size and
crop: :data:`nat_jax.zoo.PUBLISHED`). This module imports nothing from the package.

Presets cover every published ImageNet model (the table in :mod:`nat_jax.zoo`)::

    NatConfig.from_preset("nat_mini")
    nat_jax.configs.get("dinat_tiny")        # -> DinatConfig
    nat_jax.configs.list_presets()
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = ["ARCHITECTURE_FIELDS", "CONFIG_CLASSES", "DinatConfig", "ModelConfig", "NatConfig",
           "PRESETS", "architecture_differences", "get", "list_presets", "presets_matching"]

# What fixes the parameter tree and the forward computation (see ModelConfig.architecture);
# dropout rates, initialization, labels and backbone outputs are not part of it.
ARCHITECTURE_FIELDS = ("model_type", "patch_size", "num_channels", "embed_dim", "depths",
                       "num_heads", "kernel_size", "mlp_ratio", "qkv_bias", "hidden_act",
                       "layer_norm_eps", "layer_scale", "dilations")


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields shared by NAT and DiNAT (HF names and defaults). Use a subclass; ``from_dict``
    picks it from ``model_type``."""

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
        for i, (d, n) in enumerate(zip(self.layer_dilations, self.depths)):
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

    def architecture(self) -> dict[str, Any]:
        """The :data:`ARCHITECTURE_FIELDS` of this config: equal for two configs exactly when the
        same weights give the same outputs (``layer_scale`` is whether layer scale exists;
        ``dilations`` per layer, all ones for NAT)."""
        arch = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS
                if name not in ("layer_scale", "dilations")}
        arch["model_type"] = self.model_type
        arch["mlp_ratio"] = float(self.mlp_ratio)
        arch["layer_scale"] = self.layer_scale_init_value > 0
        arch["dilations"] = self.layer_dilations
        return arch

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

    # -------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``model_type`` (HF ``config.json`` keys)."""
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
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict (ours or an HF ``config.json``). Keys that are not fields are
        ignored: HF bookkeeping, and the ``dtype`` / ``param_dtype`` / ``na_backend`` /
        ``image_size`` / ``crop_pct`` entries of checkpoints written by nat-jax 0.1."""
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        target = cls
        if cls is ModelConfig or model_type != cls.model_type:
            target = CONFIG_CLASSES.get(model_type)
            if target is None:
                raise ValueError(f"model_type={model_type!r} is not one of "
                                 f"{sorted(CONFIG_CLASSES)}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("id2label") is not None and "num_labels" not in d:
            kwargs["num_labels"] = len(kwargs["id2label"])
        return target(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """The config of a published model, e.g. ``NatConfig.from_preset("nat_mini")``."""
        config = get(name, **overrides)
        if cls is not ModelConfig and not isinstance(config, cls):
            raise ValueError(f"preset {name!r} is a {type(config).__name__}, not a "
                             f"{cls.__name__}")
        return config


@dataclasses.dataclass(frozen=True)
class NatConfig(ModelConfig):
    """Neighborhood Attention Transformer (NAT) configuration (HF ``NatConfig`` fields)."""

    model_type: ClassVar[str] = "nat"
    __hash__ = ModelConfig.__hash__


@dataclasses.dataclass(frozen=True)
class DinatConfig(ModelConfig):
    """Dilated NAT configuration: ``dilations[stage][layer]`` (HF ``DinatConfig`` fields)."""

    model_type: ClassVar[str] = "dinat"

    dilations: tuple[tuple[int, ...], ...] = ((1, 8, 1), (1, 4, 1, 4), (1, 2, 1, 2, 1, 2),
                                              (1, 1, 1, 1, 1))
    __hash__ = ModelConfig.__hash__

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


# model_type -> config class (from_dict dispatches on it).
CONFIG_CLASSES: dict[str, type[ModelConfig]] = {c.model_type: c for c in (NatConfig, DinatConfig)}

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
    "dinat_large_384": DinatConfig(**_LARGE, dilations=_D384),
    "dinat_large_384_k11": DinatConfig(**_LARGE, dilations=_D224, kernel_size=11),
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


def presets_matching(architecture: Mapping[str, Any]) -> list[str]:
    """Presets whose :meth:`ModelConfig.architecture` agrees with every entry of
    ``architecture`` (a full one from a config, or the part a checkpoint's shapes tell)."""
    return [name for name, config in PRESETS.items()
            if all(config.architecture()[k] == v for k, v in architecture.items())]


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``["embed_dim: 64 vs 96", ...]``: every architecture field where ``a`` and ``b`` differ."""
    arch_a, arch_b = a.architecture(), b.architecture()
    return [f"{k}: {arch_a[k]} vs {arch_b[k]}" for k in arch_a if arch_a[k] != arch_b[k]]
