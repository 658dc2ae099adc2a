"""Reading PyTorch checkpoints without ever running code from them.

Accepted sources (see :func:`load_checkpoint`):

* a single file: ``.safetensors`` (preferred), or ``.pth`` / ``.pt`` / ``.bin`` read with
  ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which only rebuilds tensors and
  plain containers and refuses any other global (``os.system``, arbitrary classes, ...) *before*
  calling it;
* an HF model directory: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (or
  their sharded ``*.index.json`` forms).

A state dict may be flat or wrapped (``{"model": sd}``, ``{"state_dict": sd}``, as the original
SHI-Labs/timm training scripts save them), and DistributedDataParallel's ``module.`` prefix is
removed when every key carries it. All floating tensors come back as float32 numpy arrays (bf16 and
fp16 widen exactly); casting to the output dtype happens once, at the end of the conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Entries a training checkpoint wraps its weights in, most specific first. EMA copies are
# deliberately not picked: the published numbers are for the raw weights.
WRAPPER_KEYS = ("model", "state_dict", "module")
DDP_PREFIX = "module."
# Show a progress bar from this size on; small files load faster than a bar can draw.
PROGRESS_MIN_BYTES = 32 * 2**20


class ConversionError(Exception):
    """A bad input or a failed check; the CLI prints ``str(error)`` as one line and exits != 0."""


@dataclasses.dataclass
class Checkpoint:
    """Tensors of one checkpoint plus what was found beside them.

    Attributes:
      tensors: state-dict key -> numpy array (floating tensors as float32).
      hf_config: parsed ``config.json`` of an HF model directory, or None.
      files: the weight files read.
      config_path: where ``hf_config`` came from, or None.
      notes: human-readable remarks (wrapper used, entries ignored), shown in the summary.
    """

    tensors: dict[str, np.ndarray]
    hf_config: dict[str, Any] | None
    files: list[Path]
    config_path: Path | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Progress


@contextlib.contextmanager
def _progress(total_bytes: int, description: str, enabled: bool) -> Iterator[Any]:
    """Yields ``advance(nbytes)``; draws a transient rich bar on stderr for large inputs."""
    if not enabled or total_bytes < PROGRESS_MIN_BYTES:
        yield lambda nbytes: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total_bytes)
        yield lambda nbytes: bar.advance(task, nbytes)


# ------------------------------------------------------------------------------------------------
# Torch pickles


def _import_torch(path: Path):
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"reading {path.name} needs PyTorch (pip install "
                              "'nat-jax[convert]'), or convert the file to .safetensors first"
                              ) from e
    return torch


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor.numpy().copy()


def _refusal_reason(error: Exception) -> str:
    """The line of torch's weights-only error that names what was refused, if there is one."""
    for line in str(error).splitlines():
        line = line.strip()
        if line.startswith(("Unsupported global", "Unsupported operand", "Trying to call")):
            return line.rstrip(".")
    return "it holds objects other than tensors and plain containers"


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a ConversionError."""
    torch = _import_torch(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        # argparse.Namespace is what timm-style training scripts store as 'args' next to the
        # weights; rebuilding one only sets attributes, so it is safe to allow.
        # torch warns about pickle protocols on stderr; the CLI reports in one line instead.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise ConversionError(
                f"refusing to load {path}: {_refusal_reason(e)}; nat-jax only reads pickles with "
                "torch.load(weights_only=True) and never runs code from a checkpoint. Re-save the "
                "state dict (torch.save(model.state_dict(), ...)) or use .safetensors") from None
        raise ConversionError(f"cannot read {path}: not a valid PyTorch checkpoint "
                              f"(truncated or corrupt: {e})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError,
            AttributeError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"cannot read {path}: not a valid PyTorch checkpoint "
                              f"(truncated or corrupt: {first})") from None


def _is_tensor(value: Any) -> bool:
    import torch
    return isinstance(value, torch.Tensor)


def unwrap_state_dict(obj: Any, source: str) -> tuple[Mapping[str, Any], list[str]]:
    """The state dict inside a loaded checkpoint object, and notes on what was unwrapped.

    Accepts a flat ``{key: tensor}`` mapping or one nested under one of :data:`WRAPPER_KEYS`
    (repeatedly, e.g. ``{"model": {"module": sd}}``). Anything else is a ConversionError naming
    the top-level entries found.
    """
    notes: list[str] = []
    path: list[str] = []
    ignored: list[str] = []
    while True:
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{source}: expected a state dict (a mapping of names to "
                                  f"tensors), found {type(obj).__name__}")
        if obj and all(_is_tensor(v) for v in obj.values()):
            break
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            non_tensor = sorted(str(k) for k, v in obj.items() if not _is_tensor(v))[:8]
            raise ConversionError(
                f"{source}: no state dict found: entries {non_tensor} are not tensors and none of "
                f"{list(WRAPPER_KEYS)} holds one")
        ignored += sorted(".".join(path + [str(k)]) for k in obj if k != wrapper)
        path.append(wrapper)
        obj = obj[wrapper]
    if path:
        notes.append(f"using the '{'.'.join(path)}' entry"
                     + (f"; ignored {', '.join(ignored)}" if ignored else ""))
    keys = list(obj)
    if keys and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in keys):
        obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}
        notes.append(f"removed the '{DDP_PREFIX}' prefix")
    return obj, notes


def load_torch_file(path: Path, *, progress: bool = False) -> tuple[dict[str, np.ndarray],
                                                                     list[str]]:
    """Tensors of one ``.pth``/``.pt``/``.bin`` file (weights-only unpickling)."""
    obj = _torch_load(path)
    state, notes = unwrap_state_dict(obj, str(path))
    total = sum(int(v.numel()) * v.element_size() for v in state.values())
    out = {}
    with _progress(total, f"reading {path.name}", progress) as advance:
        for key, value in state.items():
            out[str(key)] = _torch_to_numpy(value)
            advance(int(value.numel()) * value.element_size())
    return out, notes


# ------------------------------------------------------------------------------------------------
# safetensors


def load_safetensors_file(path: Path, *, progress: bool = False) -> dict[str, np.ndarray]:
    """Tensors of one ``.safetensors`` file (no pickle involved)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:
        raise ConversionError("reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from e
    try:
        import torch  # noqa: F401  (bf16 tensors cannot be read as numpy without it)
        framework = "pt"
    except ImportError:
        framework = "np"
    out = {}
    try:
        with safe_open(str(path), framework=framework) as f:
            keys = list(f.keys())
            with _progress(path.stat().st_size, f"reading {path.name}", progress) as advance:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if framework == "pt":
                        arr = _torch_to_numpy(tensor)
                    else:
                        arr = np.asarray(tensor)
                        arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
                    out[key] = arr
                    advance(arr.nbytes)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"cannot read {path}: not a valid safetensors file "
                              f"(truncated or corrupt: {first})") from None
    return out


# ------------------------------------------------------------------------------------------------
# Files and directories


def _readable(path: Path) -> Path:
    """``path`` if this process may open it for reading; else a ConversionError saying why
    (the readers below would report a permission problem as a corrupt file)."""
    try:
        with open(path, "rb"):
            return path
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None


def _load_weight_file(path: Path, progress: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    _readable(path)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return load_safetensors_file(path, progress=progress), []
    if suffix in TORCH_SUFFIXES:
        return load_torch_file(path, progress=progress)
    raise ConversionError(f"{path}: unsupported file type '{path.suffix}'; expected one of "
                          f"{', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))} or an HF model "
                          "directory")


def _load_index(index: Path, progress: bool) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Sharded HF weights: ``*.index.json`` maps each key to its shard file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"cannot read {index}: not a valid weight index ({e})") from None
    shards = sorted({index.parent / name for name in weight_map.values()})
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        if not shard.is_file():
            raise ConversionError(f"{index}: shard {shard.name} is missing")
        part, _ = _load_weight_file(shard, progress)
        tensors.update(part)
    return tensors, shards


def read_hf_config(path: Path) -> dict[str, Any]:
    """Parsed ``config.json``; a ConversionError if it is unreadable or not a JSON object."""
    _readable(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return config


def load_checkpoint(src: str | Path, *, progress: bool = False) -> Checkpoint:
    """Read a checkpoint file or an HF model directory.

    Args:
      src: ``.safetensors``/``.pth``/``.pt``/``.bin`` file, or a directory holding
        ``config.json`` and one of :data:`HF_WEIGHT_FILES` (safetensors preferred). A single file
        named like an HF weight file also picks up a ``config.json`` next to it.
      progress: draw a progress bar on stderr for large files.

    Returns:
      The :class:`Checkpoint`. Raises ConversionError for anything unreadable or unsafe.
    """
    src = Path(src)
    config_path = None
    try:  # a directory we may not search raises PermissionError here, not "missing"
        if not src.exists():
            raise ConversionError(f"SRC {src} does not exist")
        if src.is_dir():
            found = [src / name for name in HF_WEIGHT_FILES if (src / name).is_file()]
            if not found:
                raise ConversionError(f"{src} is a directory without weights: expected one "
                                      f"of {', '.join(HF_WEIGHT_FILES)}")
            weights = found[0]
            config_path = src / "config.json" if (src / "config.json").is_file() else None
        else:
            weights = src
            beside = src.parent / "config.json"
            if src.name in HF_WEIGHT_FILES and beside.is_file():
                config_path = beside
    except OSError as e:
        raise ConversionError(f"cannot read SRC {src}: {e.strerror or e}") from None
    notes: list[str] = []
    if weights.name.endswith(".index.json"):
        tensors, files = _load_index(weights, progress)
    else:
        tensors, notes = _load_weight_file(weights, progress)
        files = [weights]
    if not tensors:
        raise ConversionError(f"{weights}: the checkpoint holds no tensors")
    hf_config = read_hf_config(config_path) if config_path is not None else None
    return Checkpoint(tensors=tensors, hf_config=hf_config, files=files,
                      config_path=config_path, notes=notes)
