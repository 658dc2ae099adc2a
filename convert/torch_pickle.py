"""PyTorch's checkpoint files read without torch, by an unpickler that can only rebuild tensors.

``torch.save`` writes a pickle whose tensors refer to raw storages stored beside it: in a zip
archive (``archive/data.pkl`` + ``archive/data/<key>``, torch >= 1.6) or, in the legacy format,
as pickles followed by the raw storages in one stream. :func:`load` reads both and returns the
pickled object with every tensor as a numpy array (bfloat16 via ``ml_dtypes``), so converting
weights needs neither torch nor trust in the file.

The unpickler resolves only the globals in :data:`ALLOWED` (an allow-list: ordered dicts, the
tensor/parameter rebuild functions, storage types, ``torch.Size`` and dtypes as plain values,
``argparse.Namespace`` that training scripts store beside the weights); any other global (a
function to call, a class to build) is refused before anything is called, with
:class:`RefusedGlobal` naming it. The rebuild functions are ours: they slice the storage with
numpy and never touch torch.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

__all__ = ["ALLOWED", "RefusedGlobal", "load"]

# torch storage type name -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool", "double", "float", "half", "long", "int", "short")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED` (it could run code): nothing ran."""


class CorruptCheckpoint(ValueError):
    """The file is not a readable PyTorch checkpoint (truncated, inconsistent, unknown)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands for ``torch.FloatStorage`` etc.: only its element dtype is used."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    """A pickled ``torch.float16`` (etc.), kept as its name."""

    name: str


@dataclasses.dataclass
class _Storage:
    """One storage: elements of ``dtype``, read on first use by ``read(nbytes)``."""

    dtype: np.dtype
    numel: int
    read: Callable[[int], bytes]
    big_endian: bool = False
    _array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            nbytes = self.numel * self.dtype.itemsize
            raw = self.read(nbytes)
            if len(raw) < nbytes:
                raise CorruptCheckpoint(f"a storage holds {len(raw)} bytes, its tensor "
                                        f"needs {nbytes}")
            if self.big_endian and self.dtype.itemsize > 1:
                unsigned = np.frombuffer(raw, f">u{self.dtype.itemsize}", self.numel)
                self._array = unsigned.astype(f"<u{self.dtype.itemsize}").view(self.dtype)
            else:
                self._array = np.frombuffer(raw, self.dtype, self.numel)
        return self._array


def _rebuild_tensor(storage: _Storage, storage_offset: int, size, stride, *_unused
                    ) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` (and v1): a strided view of the storage, copied."""
    if not isinstance(storage, _Storage):
        raise CorruptCheckpoint("a tensor refers to something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    data = storage.array()
    if len(size) != len(stride) or min(size + stride + (storage_offset,), default=0) < 0:
        raise CorruptCheckpoint(f"tensor size {size} / stride {stride} are inconsistent")
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise CorruptCheckpoint(f"a tensor of size {size} reaches element {last} of a storage "
                                f"of {data.size}")
    view = np.lib.stride_tricks.as_strided(data[storage_offset:], shape=size,
                                           strides=tuple(s * data.itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad=None, backward_hooks=None, *state):
    """``torch._utils._rebuild_parameter[_with_state]``: the parameter's data."""
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: only for plain tensors and parameters."""
    if new_type not in (_TENSOR, _PARAMETER):
        raise RefusedGlobal(f"Unsupported tensor subclass {new_type!r}")
    return func(*args)


def _size(dims=()) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def _namespace(*args, **kwargs) -> argparse.Namespace:
    return argparse.Namespace(**kwargs)


_TENSOR, _PARAMETER = object(), object()  # markers for torch.Tensor / torch.nn.Parameter

# (module, name) -> what the unpickler gets instead of importing it. Nothing else resolves.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "Size"): _size,
    ("argparse", "Namespace"): argparse.Namespace,  # timm-style scripts store their args
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **{("torch", name): TorchDtype(name) for name in _DTYPE_NAMES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED`; storages come from ``storage(pid)``."""

    def __init__(self, file: IO[bytes], storage: Callable[[tuple], _Storage] | None = None):
        super().__init__(file)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"Unsupported global: GLOBAL {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None:
            raise CorruptCheckpoint("a storage reference outside a PyTorch checkpoint")
        return self._storage(pid)


def _storage_type(value: Any) -> np.dtype:
    if not isinstance(value, _StorageType):
        raise CorruptCheckpoint(f"unknown storage type {value!r}")
    return value.dtype


# ------------------------------------------------------------------ zip format (torch >= 1.6)


def _load_zip(archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise CorruptCheckpoint(f"a PyTorch zip holds one data.pkl, this one {len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    order = prefix + "byteorder"
    big = order in names and archive.read(order).strip() == b"big"
    storages: dict[str, _Storage] = {}

    def storage(pid: tuple) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptCheckpoint(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CorruptCheckpoint(f"storage {member} is missing")
            storages[key] = _Storage(_storage_type(kind), int(numel),
                                     lambda nbytes, m=member: archive.read(m), big)
        return storages[key]

    with archive.open(pickles[0]) as f:
        return _Unpickler(f, storage).load()


# ------------------------------------------------------------------ legacy format (torch < 1.6)


def _load_legacy(f: IO[bytes]) -> Any:
    """``torch.save(..., _use_new_zipfile_serialization=False)``: magic number, protocol and
    system info pickles, the object pickle, the storage keys, then each storage as an int64
    element count followed by its bytes, in key order."""
    magic = _Unpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise CorruptCheckpoint("not a PyTorch checkpoint (no zip archive and no legacy magic "
                                "number)")
    if _Unpickler(f).load() != _LEGACY_PROTOCOL:
        raise CorruptCheckpoint("unsupported legacy protocol version")
    info = _Unpickler(f).load()
    if not isinstance(info, dict) or not info.get("little_endian", True):
        raise CorruptCheckpoint("legacy big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    chunks: dict[str, bytes] = {}

    def storage(pid: tuple) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CorruptCheckpoint(f"unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel, view = pid
        if view is not None:
            raise CorruptCheckpoint("legacy storage views are not supported")
        key = str(key)
        if key not in storages:
            storages[key] = _Storage(_storage_type(kind), int(numel),
                                     lambda nbytes, k=key: chunks.get(k, b""))
        return storages[key]

    # Tensors are rebuilt while the object pickle loads, before the storages' bytes (which come
    # after it) are read: rebuild lazily, once the bytes are in.
    pending: list[tuple[Any, tuple]] = []

    def deferred(*args):
        cell = _Deferred()
        pending.append((cell, args))
        return cell

    unpickler = _Unpickler(f, storage)
    unpickler.find_class = lambda module, name: (  # type: ignore[method-assign]
        deferred if ALLOWED.get((module, name)) is _rebuild_tensor
        else _Unpickler.find_class(unpickler, module, name))
    obj = unpickler.load()
    keys = _Unpickler(f).load()
    if not isinstance(keys, list):
        raise CorruptCheckpoint("legacy storage key list is missing")
    for key in map(str, keys):
        if key not in storages:
            raise CorruptCheckpoint(f"legacy storage {key} is not referenced")
        count = np.frombuffer(_read_exactly(f, 8), "<i8")[0]
        nbytes = int(count) * storages[key].dtype.itemsize
        chunks[key] = _read_exactly(f, nbytes)
    for cell, args in pending:
        cell.value = _rebuild_tensor(*args)
    return _resolve(obj)


class _Deferred:
    value: Any = None


def _resolve(obj: Any) -> Any:
    """``obj`` with every :class:`_Deferred` replaced by its tensor (containers rebuilt)."""
    if isinstance(obj, _Deferred):
        return obj.value
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _resolve(v) for k, v in vars(obj).items()})
    return obj


def _read_exactly(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptCheckpoint(f"file ends {n - len(data)} bytes early")
    return data


# ------------------------------------------------------------------ entry point


def load(path: str | Path) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays.

    Raises:
      RefusedGlobal: the pickle names a global outside :data:`ALLOWED` (nothing was called).
      CorruptCheckpoint: the file is truncated, inconsistent or not a PyTorch checkpoint.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return _load_zip(archive)
        with open(path, "rb") as f:
            return _load_legacy(io.BufferedReader(f))
    except (RefusedGlobal, CorruptCheckpoint):
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError,
            TypeError, IndexError, AttributeError, OverflowError, MemoryError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorruptCheckpoint(first or type(e).__name__) from None
