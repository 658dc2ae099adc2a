"""The two NATTEN functions transformers' NAT/DiNAT call, written with plain torch ops.

transformers 4.53.3 ``NatForImageClassification`` / ``DinatForImageClassification`` import
``natten2dqkrpb`` and ``natten2dav`` from ``natten.functional`` (NATTEN's pre-0.20 API). No NATTEN
release that installs today still has them (0.20 removed RPB and these entry points), so running
the PyTorch model for ``nat-jax convert --verify`` (and in the tests) needs a stand-in. These are
gathers driven by the same window tables our JAX kernels use (:mod:`nat_jax.kernels.windows`),
heads-first like the old API:

* ``natten2dqkrpb(query, key, rpb, kernel_size, dilation)``: ``query``/``key`` ``[B, heads, H, W,
  d]`` (query already scaled), ``rpb`` ``[heads, 2K-1, 2K-1]`` -> logits ``[B, heads, H, W, K*K]``,
  window slots row-major (``ki * K + kj``).
* ``natten2dav(attn, value, kernel_size, dilation)``: ``attn`` ``[B, heads, H, W, K*K]``, ``value``
  ``[B, heads, H, W, d]`` -> ``[B, heads, H, W, d]``.

:func:`install` puts them into ``natten.functional`` (only where missing) so that transformers'
modules can be imported afterwards; :func:`import_hf_classes` does that and returns the classes;
:func:`bound` makes transformers' modeling module call these two for the duration of a block
(``convert --verify`` runs the PyTorch model inside it, so it is checked against these
functions even if something else, e.g. a test's own stand-in, was installed first).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nat_jax import zoo
from nat_jax.kernels.windows import neighbor_indices, rpb_indices


def _tables(height: int, width: int, kernel_size: int, dilation: int):
    """Key row/col indices ``[H, K]`` / ``[W, K]`` and RPB row/col indices of the same shapes."""
    for name, length in (("height", height), ("width", width)):
        if kernel_size * dilation > length:
            raise ValueError(f"{kernel_size=} * {dilation=} must be <= {name} ({length}); "
                             "transformers pads inputs smaller than the window before calling")
    rows, _ = neighbor_indices(height, kernel_size, 1, dilation, False)
    cols, _ = neighbor_indices(width, kernel_size, 1, dilation, False)
    rpb_rows = rpb_indices(height, kernel_size, dilation)
    rpb_cols = rpb_indices(width, kernel_size, dilation)
    as_long = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return as_long(rows), as_long(cols), as_long(rpb_rows), as_long(rpb_cols)


def _gather_windows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x [B, h, H, W, d]`` -> ``[B, h, H, W, K, K, d]``: each query's window of keys."""
    # rows[:, None, :, None] and cols[None, :, None, :] broadcast to [H, W, K, K].
    return x[:, :, rows[:, None, :, None], cols[None, :, None, :], :]


def natten2dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None,
                  kernel_size: int, dilation: int) -> torch.Tensor:
    """Neighborhood logits ``[B, heads, H, W, K*K]`` (q.k plus the relative positional bias)."""
    batch, heads, height, width, _ = query.shape
    rows, cols, rpb_rows, rpb_cols = _tables(height, width, kernel_size, dilation)
    keys = _gather_windows(key, rows, cols)  # [B, h, H, W, K, K, d]
    logits = torch.einsum("bhxyd,bhxyijd->bhxyij", query, keys)
    if rpb is not None:
        bias = rpb[:, rpb_rows[:, None, :, None], rpb_cols[None, :, None, :]]  # [h, H, W, K, K]
        logits = logits + bias.unsqueeze(0).to(logits.dtype)
    return logits.reshape(batch, heads, height, width, kernel_size * kernel_size)


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int,
               dilation: int) -> torch.Tensor:
    """Attention-weighted sum of each query's window of values, ``[B, heads, H, W, d]``."""
    batch, heads, height, width, _ = value.shape
    rows, cols, _, _ = _tables(height, width, kernel_size, dilation)
    values = _gather_windows(value, rows, cols)  # [B, h, H, W, K, K, d]
    weights = attn.reshape(batch, heads, height, width, kernel_size, kernel_size)
    return torch.einsum("bhxyij,bhxyijd->bhxyd", weights.to(values.dtype), values)


_FUNCTIONS = {"natten2dqkrpb": natten2dqkrpb, "natten2dav": natten2dav}


def install() -> None:
    """Put :func:`natten2dqkrpb` / :func:`natten2dav` into ``natten.functional`` if it lacks them.

    Must run before transformers' ``modeling_nat`` / ``modeling_dinat`` are first imported (they
    import the two names at module import time). Raises ImportError if NATTEN is not installed:
    transformers refuses to build NAT/DiNAT without it (``requires_backends``).
    """
    functional = importlib.import_module("natten.functional")
    for name, fn in _FUNCTIONS.items():
        if not hasattr(functional, name):
            setattr(functional, name, fn)


def _modeling(model_type: str):
    install()
    name = zoo.family(model_type).hf_modeling
    return sys.modules.get(name) or importlib.import_module(name)


def import_hf_classes(model_type: str, head: str = "classification") -> tuple[Any, Any]:
    """``(ConfigClass, ModelClass)`` of transformers for ``"nat"``/``"dinat"`` and ``head``
    ("classification", "base" or "backbone").

    Installs the stand-in NATTEN functions first. If the modeling module had already been
    imported without them (transformers then binds stubs that raise), it is pointed at ours; an
    implementation someone else installed earlier is left in place (see :func:`bound`).
    """
    family = zoo.family(model_type)
    name = family.class_name(head)
    modeling = _modeling(model_type)
    for fn_name, fn in _FUNCTIONS.items():
        if getattr(modeling, fn_name).__module__ == modeling.__name__:  # transformers' stub
            setattr(modeling, fn_name, fn)
    # HF's config classes carry our names (NatConfig, DinatConfig), as the model classes do.
    config_cls = getattr(importlib.import_module(family.hf_configuration),
                         family.config_class.__name__)
    return config_cls, getattr(modeling, name)


@contextlib.contextmanager
def bound(model_type: str) -> Iterator[None]:
    """Inside the block, transformers' NAT/DiNAT modeling module calls this module's
    :func:`natten2dqkrpb` / :func:`natten2dav`; whatever it called before is restored after."""
    modeling = _modeling(model_type)
    saved = {name: getattr(modeling, name) for name in _FUNCTIONS}
    for name, fn in _FUNCTIONS.items():
        setattr(modeling, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)
