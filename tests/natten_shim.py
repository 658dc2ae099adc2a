"""NATTEN's old ``natten2dqkrpb`` / ``natten2dav`` for HuggingFace NAT/DiNAT, in plain torch.

transformers 4.53.3 imports these two from ``natten.functional``; no installable natten has them
any more (0.20 removed RPB). They are rebuilt here directly from NATTEN's rules (windows shifted
inwards at the borders, dilation groups, bias ``rpb[h, K-1 + key_g - query_g]`` per axis),
independently of ``nat_jax.kernels``, so the parity tests compare two separate implementations.
``test_hf_parity.py`` binds them into transformers' NAT/DiNAT modeling modules for each test.

Layout (old NATTEN, heads-first): query/key/value ``[B, heads, H, W, d]``, attention
``[B, heads, H, W, K*K]`` with the window flattened row-major.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=None)
def axis_windows(length: int, kernel: int, dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query index: its K key indices ``[L, K]`` and RPB offsets ``[L, K]`` (stride 1)."""
    if kernel * dilation > length:
        raise ValueError(f"kernel_size*dilation={kernel * dilation} > length {length}")
    left, right = kernel // 2, kernel // 2 + (kernel % 2 - 1)
    keys = np.empty((length, kernel), np.int64)
    rel = np.empty((length, kernel), np.int64)
    for i in range(length):
        g, ic = i % dilation, i // dilation
        lg = length // dilation + (1 if g < length % dilation else 0)
        leader = min(ic, lg - 1)
        start = max(leader - left, 0) + (leader + right >= lg) * (lg - right - leader - 1)
        kg = start + np.arange(kernel)
        keys[i] = g + kg * dilation
        rel[i] = (kernel - 1) + kg - ic
    return keys, rel


def _gather(x: torch.Tensor, kernel: int, dilation: int) -> torch.Tensor:
    """``[B, h, H, W, d] -> [B, h, H, W, K, K, d]``: each query's neighborhood."""
    height, width = x.shape[2], x.shape[3]
    kh, _ = axis_windows(height, kernel, dilation)
    kw, _ = axis_windows(width, kernel, dilation)
    rows = torch.from_numpy(kh)[:, None, :, None]
    cols = torch.from_numpy(kw)[None, :, None, :]
    return x[:, :, rows, cols]


def natten2dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None,
                  kernel_size: int, dilation: int) -> torch.Tensor:
    """Logits ``q . k + rpb`` over each neighborhood: ``[B, heads, H, W, K*K]``."""
    b, h, height, width, _ = query.shape
    k = _gather(key, kernel_size, dilation)
    logits = torch.einsum("bnxyd,bnxyijd->bnxyij", query, k)
    if rpb is not None:
        _, rh = axis_windows(height, kernel_size, dilation)
        _, rw = axis_windows(width, kernel_size, dilation)
        rows, cols = torch.from_numpy(rh), torch.from_numpy(rw)
        bias = rpb[:, rows[:, None, :, None], cols[None, :, None, :]]
        logits = logits + bias[None]
    return logits.reshape(b, h, height, width, kernel_size * kernel_size)


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int,
               dilation: int) -> torch.Tensor:
    """Weighted sum of each neighborhood's values: ``[B, heads, H, W, d]``."""
    b, h, height, width, _ = attn.shape
    v = _gather(value, kernel_size, dilation)
    a = attn.reshape(b, h, height, width, kernel_size, kernel_size)
    return torch.einsum("bnxyij,bnxyijd->bnxyd", a, v)
