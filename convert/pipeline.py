"""PyTorch checkpoint -> nat-jax checkpoint (:func:`convert`) and back (:func:`export`).

``convert``: read (safely) -> say what the state dict is (scheme, family, head) -> settle the
config (config.json, else ``--arch``, checked against what the shapes say) -> map every tensor
through :mod:`nat_jax.convert.keymap` (complete consumption, shape check per tensor) -> optionally
run the HF PyTorch model on the same input and compare -> write with ``save_pretrained`` (a
temporary sibling renamed into place, so OUT appears complete or not at all).

``export``: ``load_pretrained`` -> the same key table backwards -> HF ``config.json`` +
``model.safetensors`` in a temporary sibling directory, renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nat_jax import configs
from nat_jax.convert import hf_config, keymap
from nat_jax.convert.loading import (Checkpoint, ConversionError, load_checkpoint,
                                     read_hf_config)
from nat_jax.pretrained import abstract_model, atomic_directory, unwritable_reason

DTYPES = ("float32", "bfloat16")
# Max |ours - PyTorch| allowed by --verify, relative to max(1, max |PyTorch output|).
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# Fields compared between a config and what the weights say (see keymap.infer_architecture).
_INFERRED_FIELDS = ("num_channels", "embed_dim", "depths", "num_heads", "kernel_size",
                    "mlp_ratio", "layer_scale", "qkv_bias")


@dataclasses.dataclass
class Result:
    """What :func:`convert` / :func:`export` did (the CLI prints it as a table)."""

    out: Path
    config: Any
    head: str
    arch: str  # matching preset name(s), or "custom"
    source_format: str  # "HF", "original (SHI-Labs)", "nat-jax"
    num_params: int
    dtype: str
    seconds: float
    verify_diff: float | None = None
    verify_tolerance: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Config resolution


def _preset(name: str) -> configs._BaseConfig:
    try:
        return configs.get(name)
    except ValueError:
        raise ConversionError(f"--arch {name!r} is not a preset; choose one of "
                              f"{', '.join(configs.list_presets())}") from None


def _config_arch(config: configs._BaseConfig) -> dict[str, Any]:
    """The part of ``config``'s architecture that the weights' shapes also tell."""
    arch = hf_config.architecture_of(config)
    return {field: arch[field] for field in _INFERRED_FIELDS}


def _presets_matching_weights(inferred: dict[str, Any]) -> list[str]:
    return [name for name in configs.list_presets()
            if all(_config_arch(configs.get(name))[f] == inferred[f] for f in _INFERRED_FIELDS)]


def resolve_config(ckpt: Checkpoint, source: keymap.Source, arch: str | None,
                   where: str) -> tuple[configs._BaseConfig, list[str]]:
    """The config to build, from config.json or ``--arch``, checked against the weights.

    Returns ``(config, notes)``. Raises ConversionError when there is neither config.json nor
    ``--arch`` (saying what the weights do tell and which presets fit), for a config of the other
    model family, and for any architecture field that contradicts the weights.
    """
    try:
        inferred: dict[str, Any] | None = keymap.infer_architecture(ckpt.tensors, source)
    except ConversionError as e:
        if ckpt.hf_config is None and arch is None:
            raise ConversionError(f"{where} has no config.json, so pass --arch PRESET (or "
                                  f"--config FILE); also, {e}") from None
        # With a config given, the key map check below reports every inconsistency at once.
        inferred = None
    notes: list[str] = []
    if ckpt.hf_config is not None:
        config = hf_config.config_from_hf(ckpt.hf_config, str(ckpt.config_path))
        origin = f"{ckpt.config_path}"
        if arch is not None:
            diffs = hf_config.architecture_differences(_preset(arch), config)
            if diffs:
                raise ConversionError(f"--arch {arch} disagrees with {origin} "
                                      f"({'; '.join(diffs)}); drop --arch or fix config.json")
    elif arch is not None:
        config, origin = _preset(arch), f"--arch {arch}"
    else:
        fits = _presets_matching_weights(inferred)
        family = f"; the keys say {source.model_type.upper()}" if source.model_type else ""
        raise ConversionError(
            f"{where} has no config.json, so pass --arch PRESET (or --config FILE): NAT vs "
            f"DiNAT and the dilations cannot be read off the weights{family}. The weights say "
            f"{keymap.describe_architecture(inferred)}; presets that fit: "
            f"{', '.join(fits) if fits else 'none (write a config.json)'}")
    if source.model_type is not None and source.model_type != config.model_type:
        raise ConversionError(
            f"wrong model family: the weights are {source.model_type.upper()} "
            f"('{source.model_type}.' keys) but {origin} describes a {config.model_type.upper()}"
            " model")
    if inferred is None:
        return config, notes
    have = _config_arch(config)
    diffs = [f"{f}: {have[f]} vs weights {inferred[f]}" for f in _INFERRED_FIELDS
             if have[f] != inferred[f]]
    if diffs:
        raise ConversionError(f"{origin} does not match the weights: {'; '.join(diffs)}")
    if source.head == "classification" and inferred["num_labels"] != config.num_labels:
        if ckpt.hf_config is not None:
            raise ConversionError(f"{origin}: num_labels={config.num_labels} but the classifier "
                                  f"has {inferred['num_labels']} rows")
        notes.append(f"num_labels {config.num_labels} -> {inferred['num_labels']} (from the "
                     "classifier weights)")
        config = dataclasses.replace(config, num_labels=inferred["num_labels"], id2label=None)
    return config, notes


# ------------------------------------------------------------------------------------------------
# Building our model from arrays


def build_with_params(config: configs._BaseConfig, head: str, params: dict[keymap.Path, Any]):
    """Our module with exactly ``params`` (flat, our layout), without random initialization."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract, rest = abstract_model(config, head)
    dtype = config.parameter_dtype
    nnx.replace_by_pure_dict(abstract, keymap.unflatten(
        {path: jnp.asarray(value, dtype) for path, value in params.items()}))
    return nnx.merge(graphdef, abstract, rest)


def expected_shapes(config: configs._BaseConfig, head: str) -> dict[keymap.Path, tuple[int, ...]]:
    """Shape of every parameter of our model (abstract evaluation, nothing allocated)."""
    from flax import nnx

    cls = configs.model_class_for(config, head)
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return {path: tuple(leaf.shape) for path, leaf in keymap.flatten(state).items()}


def _arch_name(config: configs._BaseConfig) -> str:
    names = hf_config.matching_presets(config)
    return ", ".join(names) if names else f"custom {config.model_type}"


# ------------------------------------------------------------------------------------------------
# --verify


def _torch_output(model: Any, head: str, pixels_nchw: Any) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(pixels_nchw)
    if head == "classification":
        return out.logits.numpy()
    if head == "base":
        return out.last_hidden_state.numpy()
    return np.concatenate([f.numpy().ravel() for f in out.feature_maps])


def _our_output(model: Any, head: str, pixels_nhwc: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp
    from flax import nnx

    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pixels_nhwc))
    if head == "classification":
        return np.asarray(out.logits, np.float32)
    if head == "base":
        return np.asarray(out.last_hidden_state, np.float32)
    return np.concatenate([np.asarray(f, np.float32).ravel() for f in out.feature_maps])


def verify_against_torch(model: Any, config: configs._BaseConfig, head: str,
                         hf_state: dict[str, np.ndarray], size: int,
                         seed: int = 0) -> tuple[float, float]:
    """Run transformers' model with ``hf_state`` and ours on one random image.

    Returns ``(max_abs_diff, scale)`` with ``scale = max(1, max |PyTorch output|)``. The PyTorch
    model runs in float32 with the stand-in NATTEN functions of :mod:`torch_natten`. Raises
    ConversionError if either output holds a NaN or inf.
    """
    try:
        import torch

        from nat_jax.convert import torch_natten
        config_cls, model_cls = torch_natten.import_hf_classes(config.model_type, head)
    except ImportError as e:
        raise ConversionError(f"--verify needs torch, transformers 4.53.x and natten installed "
                              f"({e})") from None
    hf = hf_config.config_to_hf(config, head)
    hf.pop("architectures")
    hf.pop("model_type")
    torch_model = model_cls(config_cls(**hf)).eval()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in hf_state.items()}
    try:
        torch_model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"--verify: transformers rejected the weights: "
                              f"{str(e).splitlines()[0]}") from None
    pixels = np.random.default_rng(seed).standard_normal((1, size, size, config.num_channels))
    pixels = pixels.astype(np.float32)
    theirs = _torch_output(torch_model, head, torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    ours = _our_output(model, head, pixels)
    if ours.shape != theirs.shape:
        raise ConversionError(f"--verify: output shapes differ: ours {ours.shape}, "
                              f"PyTorch {theirs.shape}")
    # NaN compares false with everything, so a difference check alone would pass NaN outputs.
    bad = {name: int(np.size(x) - np.count_nonzero(np.isfinite(x)))
           for name, x in (("ours", ours), ("PyTorch", theirs))}
    if any(bad.values()):
        raise ConversionError(
            f"--verify failed: non-finite outputs (NaN/inf: {bad['ours']} of {ours.size} in "
            f"ours, {bad['PyTorch']} of {theirs.size} in PyTorch's); the weights hold "
            "non-finite values or the model overflows")
    return float(np.max(np.abs(ours - theirs))), float(max(1.0, np.max(np.abs(theirs))))


# ------------------------------------------------------------------------------------------------
# Public API


@contextlib.contextmanager
def _phase(message: str, enabled: bool) -> Iterator[None]:
    """A transient spinner on stderr while a slow step runs (building, verifying, writing)."""
    if not enabled:
        yield
        return
    from rich.console import Console
    with Console(stderr=True).status(message):
        yield


def _check_out(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """OUT is absent (or may be replaced) and can be created: no file in place of a parent
    directory, and a writable parent."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass {flag} to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")
    # OUT is written as a temporary sibling renamed into place: its parent must be writable.
    reason = unwritable_reason(out.absolute().parent)
    if reason is not None:
        raise ConversionError(f"cannot write {out}: {reason}")


def _check_apart(out: Path, out_name: str, inputs: dict[str, Path | None]) -> None:
    """OUT must not be, contain or lie inside an input: writing OUT (``--overwrite`` replaces
    it) would delete the input, or the input directory would get our output mixed in."""
    target = out.resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        source = path.resolve()
        if target == source or target in source.parents:
            relation = "is" if target == source else "contains"
            raise ConversionError(f"{out_name} {out} {relation} {name} {path}: writing it "
                                  f"would delete the input; choose another {out_name}")
        if source in target.parents and source.is_dir():
            raise ConversionError(f"{out_name} {out} lies inside {name} {path}; choose an "
                                  f"{out_name} outside it")


def convert(src: str | Path, out: str | Path, arch: str | None = None, dtype: str = "float32",
            verify: bool = False, overwrite: bool = False, *, config: str | Path | None = None,
            progress: bool = False, verify_size: int | None = None,
            tolerance: float | None = None) -> Result:
    """Convert a PyTorch NAT/DiNAT checkpoint into a nat-jax checkpoint directory.

    Args:
      src: HF model directory (config.json + model.safetensors / pytorch_model.bin) or one
        ``.safetensors``/``.pth``/``.pt``/``.bin`` file, HF or original SHI-Labs keys.
      out: directory to create; :func:`nat_jax.load_pretrained` reads it.
      arch: preset name (``nat_mini`` ... ``dinat_large_384_k11``); needed without config.json.
      config: a config JSON file (HF ``config.json`` or a nat-jax one) to use instead of the one in
        SRC: for custom architectures stored without a config.
      dtype: "float32" or "bfloat16" (parameters and the saved config's compute dtype).
      verify: run the HF PyTorch model on a random image and compare outputs; a difference above
        ``tolerance * max(1, max |PyTorch output|)`` raises ConversionError (nothing written).
      overwrite: replace an existing ``out`` (never one that is, contains or lies inside
        ``src`` or ``config``: that is refused).
      progress: progress bar for large files and a spinner for slow steps, on stderr.
      verify_size: image side for ``verify`` (default: the config's ``image_size``); >= 1.
      tolerance: for ``verify`` (default :data:`DEFAULT_TOLERANCE` per dtype); finite, >= 0.
        Non-finite outputs on either side always fail ``verify``.

    Returns:
      A :class:`Result`. Every bad input raises ConversionError, with ``out`` left absent.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    if verify_size is not None and verify_size < 1:
        raise ConversionError(f"--verify-size {verify_size}: the image side must be >= 1")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConversionError(f"--tolerance {tolerance}: must be a finite number >= 0")
    src, out = Path(src), Path(out)
    _check_apart(out, "OUT", {"SRC": src, "--config": None if config is None else Path(config)})
    _check_out(out, overwrite)
    ckpt = load_checkpoint(src, progress=progress)
    if config is not None:
        config_path = Path(config)
        if not config_path.is_file():
            raise ConversionError(f"--config {config_path} is not a file")
        ckpt.hf_config, ckpt.config_path = read_hf_config(config_path), config_path
    where = str(ckpt.files[0]) if len(ckpt.files) == 1 else str(src)
    source = keymap.detect_source(ckpt.tensors, where)
    resolved, notes = resolve_config(ckpt, source, arch, where)
    config = dataclasses.replace(resolved, dtype=dtype, param_dtype=dtype)
    head = source.head
    rows = keymap.key_table(keymap.Structure.from_config(config, head))
    name = _arch_name(config)
    with _phase(f"mapping {len(ckpt.tensors)} tensors to {name}", progress):
        params = keymap.to_ours(ckpt.tensors, rows, source.scheme,
                                expected_shapes(config, head), f"{name} ({head})")
        model = build_with_params(config, head, params)
    result = Result(out=out, config=config, head=head, arch=name,
                    source_format="HF" if source.scheme == "hf" else "original (SHI-Labs)",
                    num_params=int(sum(v.size for v in params.values())), dtype=dtype,
                    seconds=0.0, notes=ckpt.notes + notes)
    if verify:
        hf_state = ckpt.tensors if source.scheme == "hf" else \
            keymap.translate(ckpt.tensors, rows, "original", "hf")
        size = config.image_size if verify_size is None else verify_size
        tol = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
        with _phase(f"verifying against transformers at {size}x{size}", progress):
            try:
                diff, scale = verify_against_torch(model, config, head, hf_state, size)
            except ConversionError as e:
                raise ConversionError(f"{e}; nothing written to {out}") from None
        result.verify_diff, result.verify_tolerance = diff / scale, tol
        if not diff <= tol * scale:
            raise ConversionError(f"--verify failed: max |ours - PyTorch| = {diff:.3g} "
                                  f"(relative {diff / scale:.3g}) exceeds tolerance {tol:g}; "
                                  f"nothing written to {out}")
    from nat_jax.pretrained import save_pretrained
    try:
        with _phase(f"writing {out}", progress):
            save_pretrained(model, out, overwrite=overwrite)
    except FileExistsError:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it") from None
    result.seconds = time.perf_counter() - start
    return result


def _read_nat_jax(ckpt: Path):
    from nat_jax.pretrained import load_config, load_pretrained
    if not (ckpt / "config.json").is_file() or not (ckpt / "params").is_dir():
        raise ConversionError(f"{ckpt} is not a nat-jax checkpoint (expected config.json and "
                              "params/ written by save_pretrained or nat-jax convert)")
    try:
        config, head = load_config(ckpt)
        model = load_pretrained(ckpt)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"cannot read nat-jax checkpoint {ckpt}: {first}") from None
    return config, head, model


def export(ckpt: str | Path, out_dir: str | Path, format: str = "hf",
           overwrite: bool = False) -> Result:
    """Write a nat-jax checkpoint as an HF model directory (config.json + model.safetensors).

    transformers 4.53.x ``NatForImageClassification`` / ``DinatForImageClassification`` (or
    ``*Model`` / ``*Backbone``, following the checkpoint's head) load the result with
    ``from_pretrained(out_dir)``. Parameters are written as float32.
    """
    import jax
    from flax import nnx
    from safetensors.numpy import save_file

    start = time.perf_counter()
    if format != "hf":
        raise ConversionError(f"--format {format!r}: only 'hf' is supported")
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    _check_apart(out_dir, "OUT_DIR", {"CKPT": ckpt})
    _check_out(out_dir, overwrite)
    if not ckpt.is_dir():
        raise ConversionError(f"CKPT {ckpt} is not a directory written by nat-jax convert / "
                              "save_pretrained")
    config, head, model = _read_nat_jax(ckpt)
    params = {path: np.asarray(jax.device_get(v), np.float32) for path, v in
              keymap.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    rows = keymap.key_table(keymap.Structure.from_config(config, head))
    state = keymap.from_ours(params, rows, "hf")
    out_dir = out_dir.absolute()
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config.config_to_hf(config, head),
                                                    indent=2))
        # transformers refuses safetensors files without the "format" metadata entry.
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Result(out=out_dir, config=config, head=head, arch=_arch_name(config),
                  source_format="nat-jax", num_params=int(sum(v.size for v in params.values())),
                  dtype="float32", seconds=time.perf_counter() - start)
