"""The one key map between our parameter tree, HF state dicts and original SHI-Labs state dicts.

:func:`key_table` lists, for a given architecture, every parameter of our model as a
:class:`KeyRow`: its path in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, the HF key(s) and
the original key(s) holding the same tensor, the named layout rule that turns the PyTorch layout
into ours, and how several source keys join into one tensor. This mirrors the table in
:mod:`nat_jax.modeling`'s docstring. Everything else here walks that table:

* :func:`to_ours`: source state dict (either scheme) -> our parameters; every source key must be
  consumed and every parameter filled with the right shape, else one :class:`KeyMismatchError`
  lists the missing keys, unexpected keys and shape mismatches together.
* :func:`from_ours`: our parameters -> a state dict in either scheme (export).
* :func:`translate`: original <-> HF state dicts (for running the HF model on original weights).
* :func:`detect_source` / :func:`infer_architecture`: what a bare state dict is and what can be
  read off its shapes (NAT vs DiNAT and dilations cannot: they change no parameter).

There is no substring matching: keys are built from the table and looked up exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from nat_jax import zoo
from nat_jax.convert.loading import ConversionError

Path = tuple[str | int, ...]
SCHEMES = ("hf", "original")


class KeyMismatchError(ConversionError):
    """Source keys and model parameters do not correspond one to one (with matching shapes)."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str],
                 what: str):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... and {len(items) - 6} more"
                                                if len(items) > 6 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        super().__init__(f"the checkpoint does not match {what}: {'; '.join(parts)}")


# ------------------------------------------------------------------------------------------------
# Named rules


@dataclasses.dataclass(frozen=True)
class Layout:
    """PyTorch tensor layout <-> ours for one layer type."""

    ndim: int | None  # rank the PyTorch tensor must have (None: any)
    to_ours: Any
    to_torch: Any


LAYOUTS: dict[str, Layout] = {
    # torch Linear weight [out, in] -> Flax kernel [in, out]
    "linear": Layout(2, lambda a: a.T, lambda a: a.T),
    # torch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]
    "conv": Layout(4, lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    # biases, LayerNorm weight/bias, RPB [heads, 2K-1, 2K-1], layer scale [2, C]
    "same": Layout(None, lambda a: a, lambda a: a),
}

# How several source tensors form one parameter (in PyTorch layout), and back.
JOINS = {
    # q, k, v Linear weights/biases -> fused qkv: rows [0:C] q, [C:2C] k, [2C:3C] v
    "concat": (lambda parts: np.concatenate(parts, axis=0),
               lambda value, n: np.split(value, n, axis=0)),
    # gamma1, gamma2 [C] -> layer_scale_parameters [2, C]
    "stack": (lambda parts: np.stack(parts, axis=0),
              lambda value, n: list(value)),
}


@dataclasses.dataclass(frozen=True)
class KeyRow:
    """One parameter of our model and where it lives in the PyTorch state dicts.

    Attributes:
      target: path in our parameter tree (pure dict; list indices are ints).
      hf: HF state-dict key(s), in join order.
      original: original SHI-Labs key(s), in join order; () where the original code has none.
      layout: key of :data:`LAYOUTS`.
      join: key of :data:`JOINS`, used by whichever scheme has several keys.
    """

    target: Path
    hf: tuple[str, ...]
    original: tuple[str, ...]
    layout: str = "same"
    join: str = "concat"

    def keys(self, scheme: str) -> tuple[str, ...]:
        return self.hf if scheme == "hf" else self.original


@dataclasses.dataclass(frozen=True)
class Structure:
    """What the parameter tree depends on (from a config, or read off a state dict)."""

    model_type: str  # "nat" / "dinat" (only the HF key prefix depends on it)
    depths: tuple[int, ...]
    layer_scale: bool
    qkv_bias: bool = True
    num_labels: int = 1000
    head: str = "classification"
    backbone_features: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any, head: str = "classification") -> Structure:
        features = config.backbone_stages()[0] if head == "backbone" else ()
        return cls(model_type=config.model_type, depths=tuple(config.depths),
                   layer_scale=config.layer_scale_init_value > 0, qkv_bias=config.qkv_bias,
                   num_labels=config.num_labels, head=head, backbone_features=tuple(features))


# ------------------------------------------------------------------------------------------------
# The table


def _pair(target: Path, hf: str, original: str | None, kind: str,
          bias: bool = True) -> list[KeyRow]:
    """Rows of one torch module with ``weight`` (and ``bias``): kind "linear", "conv" or "norm"."""
    orig = (lambda name: (f"{original}.{name}",)) if original is not None else (lambda _: ())
    weight_name, layout = ("scale", "same") if kind == "norm" else ("kernel", kind)
    rows = [KeyRow(target + (weight_name,), (f"{hf}.weight",), orig("weight"), layout=layout)]
    if bias:
        rows.append(KeyRow(target + ("bias",), (f"{hf}.bias",), orig("bias")))
    return rows


def _layer_path(base: Path, i: int, j: int) -> Path:
    return base + ("encoder", "levels", i, "layers", j)


def _layer_rows(s: Structure, base: Path, hf: str, i: int, j: int) -> list[KeyRow]:
    """Rows of layer ``j`` of stage ``i`` (HF ``NatLayer``, original ``NATLayer``)."""
    t = _layer_path(base, i, j)
    h = f"{hf}encoder.levels.{i}.layers.{j}"
    o = f"levels.{i}.blocks.{j}"
    qkv = tuple(f"{h}.attention.self.{n}" for n in ("query", "key", "value"))
    rows = _pair(t + ("layernorm_before",), f"{h}.layernorm_before", f"{o}.norm1", "norm")
    rows.append(KeyRow(t + ("attention", "qkv", "kernel"), tuple(f"{q}.weight" for q in qkv),
                       (f"{o}.attn.qkv.weight",), layout="linear", join="concat"))
    if s.qkv_bias:
        rows.append(KeyRow(t + ("attention", "qkv", "bias"), tuple(f"{q}.bias" for q in qkv),
                           (f"{o}.attn.qkv.bias",), join="concat"))
    rows.append(KeyRow(t + ("attention", "rpb"), (f"{h}.attention.self.rpb",),
                       (f"{o}.attn.rpb",)))
    rows += _pair(t + ("attention", "proj"), f"{h}.attention.output.dense", f"{o}.attn.proj",
                  "linear")
    rows += _pair(t + ("layernorm_after",), f"{h}.layernorm_after", f"{o}.norm2", "norm")
    rows += _pair(t + ("mlp", "fc1"), f"{h}.intermediate.dense", f"{o}.mlp.fc1", "linear")
    rows += _pair(t + ("mlp", "fc2"), f"{h}.output.dense", f"{o}.mlp.fc2", "linear")
    if s.layer_scale:
        rows.append(KeyRow(t + ("layer_scale_parameters",), (f"{h}.layer_scale_parameters",),
                           (f"{o}.gamma1", f"{o}.gamma2"), join="stack"))
    return rows


def key_table(s: Structure) -> list[KeyRow]:
    """Every parameter of the model described by ``s``, with its HF and original keys."""
    if s.head not in zoo.HEADS:
        raise ValueError(f"head={s.head!r} must be one of {tuple(zoo.HEADS)}")
    if s.head == "classification":
        base, hf = (s.model_type,), f"{s.model_type}."
    else:  # HF saves NatModel / NatBackbone without the model prefix; ours has none either
        base, hf = (), ""
    t_emb = base + ("embeddings",)
    rows = []
    for k in (0, 1):
        rows += _pair(t_emb + ("patch_embeddings", "projection", k),
                      f"{hf}embeddings.patch_embeddings.projection.{k}", f"patch_embed.proj.{k}",
                      "conv")
    rows += _pair(t_emb + ("norm",), f"{hf}embeddings.norm", "patch_embed.norm", "norm")
    for i, depth in enumerate(s.depths):
        for j in range(depth):
            rows += _layer_rows(s, base, hf, i, j)
        if i < len(s.depths) - 1:
            t = base + ("encoder", "levels", i, "downsample")
            h, o = f"{hf}encoder.levels.{i}.downsample", f"levels.{i}.downsample"
            rows += _pair(t + ("reduction",), f"{h}.reduction", f"{o}.reduction", "conv",
                          bias=False)
            rows += _pair(t + ("norm",), f"{h}.norm", f"{o}.norm", "norm")
    if s.head == "backbone":
        # HF-only LayerNorms per output stage; the original classification code has none.
        for name in s.backbone_features:
            rows += _pair(("hidden_states_norms", name), f"hidden_states_norms.{name}", None,
                          "norm")
    else:
        rows += _pair(base + ("layernorm",), f"{hf}layernorm", "norm", "norm")
    if s.head == "classification" and s.num_labels > 0:
        rows += _pair(("classifier",), "classifier", "head", "linear")
    return rows


# ------------------------------------------------------------------------------------------------
# Walking the table


def _joined(row: KeyRow, scheme: str, tensors: Mapping[str, np.ndarray]) -> np.ndarray | str:
    """The PyTorch-layout tensor of ``row`` from ``tensors``, or a shape-mismatch message."""
    keys = row.keys(scheme)
    parts = [np.asarray(tensors[k]) for k in keys]
    if len(parts) > 1:
        if len({p.shape for p in parts}) != 1:
            return " / ".join(f"{k} {list(p.shape)}" for k, p in zip(keys, parts)) + \
                " must have equal shapes"
        value = JOINS[row.join][0](parts)
    else:
        value = parts[0]
    ndim = LAYOUTS[row.layout].ndim
    if ndim is not None and value.ndim != ndim:
        return f"{'+'.join(keys)} {list(value.shape)} must be {ndim}-D ({row.layout})"
    return value


def to_ours(tensors: Mapping[str, np.ndarray], rows: list[KeyRow], scheme: str,
            expected: Mapping[Path, tuple[int, ...]], what: str) -> dict[Path, np.ndarray]:
    """Our parameters (flat ``{path: array}``) from a state dict in ``scheme``.

    Args:
      tensors: the source state dict (PyTorch layouts).
      rows: :func:`key_table` of the target model.
      scheme: "hf" or "original".
      expected: shape of every parameter of the target model (from ``nnx.eval_shape``).
      what: the model's name for error messages.

    Raises:
      KeyMismatchError: listing source keys nothing reads, parameters nothing fills and shape
        mismatches, all at once.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"{scheme=} must be one of {SCHEMES}")
    targets = {row.target for row in rows}
    assert targets == set(expected), (  # the table and the model disagree: a bug here
        sorted(map(str, targets ^ set(expected)))[:5])
    consumed: set[str] = set()
    missing, mismatched = [], []
    out: dict[Path, np.ndarray] = {}
    for row in rows:
        keys = row.keys(scheme)
        if not keys:
            missing.append(f"{'.'.join(map(str, row.target))} (no {scheme} counterpart)")
            continue
        absent = [k for k in keys if k not in tensors]
        consumed.update(k for k in keys if k in tensors)
        if absent:
            missing += absent
            continue
        value = _joined(row, scheme, tensors)
        if isinstance(value, str):
            mismatched.append(value)
            continue
        value = LAYOUTS[row.layout].to_ours(value)
        want = tuple(expected[row.target])
        if value.shape != want:
            torch_shape = list(LAYOUTS[row.layout].to_torch(np.empty(want, np.bool_)).shape)
            mismatched.append(f"{'+'.join(keys)} {list(LAYOUTS[row.layout].to_torch(value).shape)}"
                              f" expected {torch_shape}")
            continue
        out[row.target] = np.ascontiguousarray(value)
    unexpected = sorted(set(tensors) - consumed)
    if missing or unexpected or mismatched:
        raise KeyMismatchError(missing, unexpected, mismatched, what)
    return out


def from_ours(params: Mapping[Path, np.ndarray], rows: list[KeyRow],
              scheme: str = "hf") -> dict[str, np.ndarray]:
    """A PyTorch state dict in ``scheme`` from our flat parameters (every parameter is used)."""
    if set(params) != {row.target for row in rows}:
        raise ConversionError("parameters and key table differ: "
                              f"{sorted(map(str, set(params) ^ {r.target for r in rows}))[:5]}")
    out: dict[str, np.ndarray] = {}
    for row in rows:
        keys = row.keys(scheme)
        if not keys:
            raise ConversionError(f"{'.'.join(map(str, row.target))} has no {scheme} key")
        value = LAYOUTS[row.layout].to_torch(np.asarray(params[row.target]))
        parts = JOINS[row.join][1](value, len(keys)) if len(keys) > 1 else [value]
        for key, part in zip(keys, parts):
            out[key] = np.ascontiguousarray(part)
    return out


def translate(tensors: Mapping[str, np.ndarray], rows: list[KeyRow], src: str,
              dst: str) -> dict[str, np.ndarray]:
    """Rename a state dict between schemes (original <-> HF), splitting/joining fused tensors.

    Assumes :func:`to_ours` already checked ``tensors`` against ``rows``.
    """
    out: dict[str, np.ndarray] = {}
    for row in rows:
        value = _joined(row, src, tensors)
        assert not isinstance(value, str), value
        keys = row.keys(dst)
        parts = JOINS[row.join][1](value, len(keys)) if len(keys) > 1 else [value]
        out.update({k: np.ascontiguousarray(p) for k, p in zip(keys, parts)})
    return out


def flatten(tree: Mapping[Any, Any], prefix: Path = ()) -> dict[Path, Any]:
    """``{path: leaf}`` of a nested pure dict (``nnx.to_pure_dict``)."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[Any, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[Any, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


# ------------------------------------------------------------------------------------------------
# What a bare state dict is


@dataclasses.dataclass(frozen=True)
class Source:
    """How a state dict is named: ``scheme``, HF ``model_type`` (None if unknown) and head."""

    scheme: str
    model_type: str | None
    head: str


_PATCH_CONV0 = "embeddings.patch_embeddings.projection.0.weight"
_ORIGINAL_PATCH_CONV0 = "patch_embed.proj.0.weight"


def detect_source(keys: set[str] | Mapping[str, Any], where: str) -> Source:
    """Scheme, model family and head of a state dict, from a few exact keys.

    Raises ConversionError for anything that is not a NAT/DiNAT state dict.
    """
    keys = set(keys)
    if _ORIGINAL_PATCH_CONV0 in keys:
        return Source("original", None, "classification" if "head.weight" in keys else "base")
    for model_type in zoo.FAMILIES:
        if f"{model_type}.{_PATCH_CONV0}" in keys:
            return Source("hf", model_type, "classification")
    if _PATCH_CONV0 in keys:
        head = "base" if "layernorm.weight" in keys else "backbone"
        return Source("hf", None, head)
    if "patch_embed.proj.weight" in keys:  # one patch conv: DiNAT_s or isotropic NAT/DiNAT
        raise ConversionError(
            f"{where} looks like an original DiNAT_s or isotropic NAT/DiNAT checkpoint (a single "
            "patch-embedding conv); only the NAT/DiNAT models with the two-conv stem are "
            "supported")
    sample = ", ".join(sorted(keys)[:4])
    raise ConversionError(
        f"{where} is not a NAT/DiNAT checkpoint (wrong model family?): it has none of the keys "
        f"'{_ORIGINAL_PATCH_CONV0}' (original), 'nat.{_PATCH_CONV0}' / 'dinat.{_PATCH_CONV0}' "
        f"(HF); first keys: {sample}")


def infer_architecture(tensors: Mapping[str, np.ndarray], source: Source) -> dict[str, Any]:
    """What the shapes say: embed_dim, depths, num_heads, kernel_size, mlp_ratio, layer scale,
    qkv_bias, num_labels (and num_channels). Raises ConversionError where they contradict.

    NAT vs DiNAT and the dilations are not in here: they change no parameter.
    """
    head = "classification" if source.head == "classification" else "base"
    probe = Structure(model_type=source.model_type or "nat", depths=(), layer_scale=True,
                      head=head)
    base: Path = (probe.model_type,) if head == "classification" else ()
    hf = f"{probe.model_type}." if head == "classification" else ""
    outer = {row.target: row for row in key_table(probe)}  # embeddings, final norm, classifier

    def rows_of(i: int, j: int) -> dict[Path, KeyRow]:
        return {row.target: row for row in _layer_rows(probe, base, hf, i, j)}

    def shape(row: KeyRow, pick: int = 0) -> tuple[int, ...] | None:
        key = row.keys(source.scheme)[pick]
        return tuple(np.shape(tensors[key])) if key in tensors else None

    def has_layer(i: int, j: int) -> bool:
        return shape(rows_of(i, j)[_layer_path(base, i, j) + ("layernorm_before", "scale")]) \
            is not None

    depths: list[int] = []
    while has_layer(len(depths), 0):
        j = 0
        while has_layer(len(depths), j):
            j += 1
        depths.append(j)
    if not depths:
        raise ConversionError("cannot infer the architecture: no layer 0 of stage 0 found")
    patch = base + ("embeddings", "patch_embeddings", "projection")
    conv0 = shape(outer[patch + (0, "kernel")])
    conv1 = shape(outer[patch + (1, "kernel")])
    if conv0 is None or conv1 is None or len(conv0) != 4 or len(conv1) != 4:
        raise ConversionError("cannot infer the architecture: patch embedding convs missing or "
                              "not 4-D")
    embed_dim = conv1[0]
    heads, kernels, ratios, scales, biases = [], set(), set(), set(), set()
    for i, depth in enumerate(depths):
        width = embed_dim * 2 ** i
        stage_heads = set()
        for j in range(depth):
            rows, t = rows_of(i, j), _layer_path(base, i, j)
            rpb = shape(rows[t + ("attention", "rpb")])
            fc1 = shape(rows[t + ("mlp", "fc1", "kernel")])
            if rpb is None or fc1 is None or len(rpb) != 3:
                raise ConversionError(f"cannot infer the architecture: layer {j} of stage {i} "
                                      "lacks its rpb or MLP weights")
            stage_heads.add(rpb[0])
            kernels.add((rpb[1] + 1) // 2)
            ratios.add(fc1[0] / width)
            scales.add(shape(rows[t + ("layer_scale_parameters",)]) is not None)
            biases.add(shape(rows[t + ("attention", "qkv", "bias")]) is not None)
        if len(stage_heads) != 1:
            raise ConversionError(f"cannot infer the architecture: stage {i} mixes head counts "
                                  f"{sorted(stage_heads)}")
        heads.append(stage_heads.pop())
    for name, values in (("kernel sizes", kernels), ("MLP ratios", ratios),
                         ("layer scale use", scales), ("qkv bias use", biases)):
        if len(values) != 1:
            raise ConversionError(f"cannot infer the architecture: layers differ in {name} "
                                  f"{sorted(values)}")
    num_labels = 0
    if source.head == "classification":
        found = shape(outer[("classifier", "kernel")])
        num_labels = found[0] if found is not None else 0
    return dict(num_channels=conv0[1], embed_dim=embed_dim, depths=tuple(depths),
                num_heads=tuple(heads), kernel_size=kernels.pop(), mlp_ratio=ratios.pop(),
                layer_scale=scales.pop(), qkv_bias=biases.pop(), num_labels=num_labels)


def describe_architecture(arch: Mapping[str, Any]) -> str:
    """One-line summary of :func:`infer_architecture`'s result."""
    return (f"embed_dim={arch['embed_dim']}, depths={list(arch['depths'])}, "
            f"num_heads={list(arch['num_heads'])}, kernel_size={arch['kernel_size']}, "
            f"mlp_ratio={arch['mlp_ratio']:g}, layer scale={'yes' if arch['layer_scale'] else 'no'}"
            f", num_labels={arch['num_labels']}")
