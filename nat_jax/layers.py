"""Flax NNX neighborhood-attention layers for any model: ``NeighborhoodAttention1D/2D/3D``.

Channels-last, like NATTEN's ``NeighborhoodAttention{1,2,3}D`` modules: ``x [batch, *spatial,
embed_dim] -> [batch, *spatial, embed_dim]`` (the output keeps the input's spatial shape, also
with stride). One fused ``qkv`` projection, neighborhood attention (:mod:`nat_jax.kernels`:
any backend, with RPB, dilation, causal and periodic axes, stride, grouped-query attention and
extra global tokens), then the output projection ``proj``. The NAT/DiNAT blocks
(:class:`nat_jax.modeling.NeighborhoodAttention`) are the 2-D layer with HF's parameter layout.

Example::

    layer = NeighborhoodAttention2D(128, 4, kernel_size=7, dilation=2, rngs=nnx.Rngs(0))
    y = layer(x)                                   # x, y: [B, H, W, 128]
    y = layer(x, additional_tokens=text)           # text: [B, L, 128], seen by every query
    y, weights = layer.attend(x)                   # weights when return_weights is set:
    layer.set_view(return_weights=True)            #   [B, H, W, heads, K*K (+ L)] float32
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from nat_jax import kernels
from nat_jax.kernels import context, merge
from nat_jax.kernels.params import BoolOrTuple, IntOrTuple, per_axis

_default_init = nnx.initializers.normal(stddev=0.02)


def mesh_has_axes(names) -> bool:
    """Whether the context mesh (``jax.set_mesh``) has every mesh axis in ``names``."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and all(n in mesh.axis_names for n in names)


class NeighborhoodAttention(nnx.Module):
    """Multi-head neighborhood attention over ``rank`` spatial axes (the 1/2/3-D classes fix
    the rank).

    Args:
      embed_dim: channels in and out; ``num_heads`` divides it (``head_dim = embed_dim //
        num_heads``).
      num_heads: query heads.
      kernel_size, stride, dilation, is_causal, is_periodic: per axis or one for all, as for
        :func:`nat_jax.na2d` (windows follow NATTEN exactly).
      num_kv_heads: key/value heads (grouped-query attention; default ``num_heads``); must
        divide ``num_heads``. ``qkv`` then projects to ``(num_heads + 2 * num_kv_heads) *
        head_dim`` channels.
      qkv_bias, proj_bias: biases of the projections.
      rpb: learn a relative positional bias ``[num_heads, 2K-1, ...]`` (odd kernels, stride 1,
        no causal axis).
      scale: logit scale (default ``head_dim ** -0.5``).
      attn_drop, proj_drop: dropout on the attention weights (runs the unfused
        ``qk``/``av`` pieces while active) and on the output; active in ``model.train()``.
      backend: NA backend (``"auto"`` or one of ``nat_jax.kernels.available_backends()``).
      spatial_axes: context parallelism, one entry per spatial axis (a mesh axis name, a tuple
        of names, or None), as :func:`nat_jax.na2d`'s: under a context mesh that has these
        axes (``jax.set_mesh``) each device computes its rows and exchanges halos; without one
        the layer runs unsplit. The unfused path (attention weights, attention dropout) is left
        to XLA's partitioner.
      dtype, param_dtype: computation and parameter dtypes.
      kernel_init, rpb_init: initializers of the projections' kernels and of the RPB.
      rngs: ``nnx.Rngs`` (``params``; ``dropout`` when a dropout rate is > 0).
    """

    rank: int = 0

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple, *,
                 stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                 is_causal: BoolOrTuple = False, is_periodic: BoolOrTuple = False,
                 num_kv_heads: int | None = None, qkv_bias: bool = True,
                 proj_bias: bool = True, rpb: bool = False, scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto",
                 spatial_axes: Sequence[str | tuple[str, ...] | None] | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init: Callable = _default_init, rpb_init: Callable = _default_init,
                 rngs: nnx.Rngs):
        rank = self.rank
        if rank not in (1, 2, 3):
            raise TypeError("use NeighborhoodAttention1D, 2D or 3D")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if backend not in ("auto",) + kernels.available_backends():
            raise ValueError(f"backend={backend!r} is not one of "
                             f"{('auto',) + kernels.available_backends()}")
        self.kernel_size = per_axis("kernel_size", kernel_size, rank, int)
        self.stride = per_axis("stride", stride, rank, int)
        self.dilation = per_axis("dilation", dilation, rank, int)
        self.is_causal = per_axis("is_causal", is_causal, rank, bool)
        self.is_periodic = per_axis("is_periodic", is_periodic, rank, bool)
        if rpb and (any(k % 2 == 0 for k in self.kernel_size) or any(s != 1 for s in self.stride)
                    or any(self.is_causal)):
            raise ValueError(f"rpb=True needs odd kernels, stride 1 and no causal axis (got "
                             f"kernel_size={self.kernel_size}, stride={self.stride}, "
                             f"is_causal={self.is_causal})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.scale = scale
        self.backend = backend
        if spatial_axes is not None and len(spatial_axes) != rank:
            raise ValueError(f"spatial_axes={spatial_axes!r} must have one entry per spatial "
                             f"axis ({rank})")
        self.spatial_axes = None if spatial_axes is None else tuple(spatial_axes)
        self.return_weights = False
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.qkv = nnx.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim,
                              use_bias=qkv_bias, kernel_init=kernel_init, rngs=rngs, **dtypes)
        self.rpb = (nnx.Param(rpb_init(rngs.params(),
                                       (num_heads, *(2 * k - 1 for k in self.kernel_size)),
                                       param_dtype)) if rpb else None)
        # Built in eval mode (model.train() turns them on); only a dropout that can drop keeps
        # an RNG stream.
        self.attn_drop = nnx.Dropout(attn_drop, deterministic=True,
                                     rngs=rngs if attn_drop > 0 else None)
        self.proj = nnx.Linear(embed_dim, embed_dim, use_bias=proj_bias,
                               kernel_init=kernel_init, rngs=rngs, **dtypes)
        self.proj_drop = nnx.Dropout(proj_drop, deterministic=True,
                                     rngs=rngs if proj_drop > 0 else None)

    def set_view(self, return_weights: bool | None = None) -> None:
        """``nnx.view(module, return_weights=True)``: :meth:`attend` also returns the softmax
        weights."""
        if return_weights is not None:
            self.return_weights = return_weights

    def _split(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        y = self.qkv(x)
        q = y[..., :h * d].reshape(*x.shape[:-1], h, d)
        k = y[..., h * d:(h + hk) * d].reshape(*x.shape[:-1], hk, d)
        v = y[..., (h + hk) * d:].reshape(*x.shape[:-1], hk, d)
        return q, k, v

    def attend(self, x: jax.Array, additional_tokens: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
        """``x [batch, *spatial, embed_dim]`` (each axis ``>= kernel * dilation``) ->
        ``(out [batch, *spatial, embed_dim], weights | None)``.

        ``additional_tokens [batch, L, embed_dim]``: extra tokens projected by the same
        ``qkv`` (their query part unused) that every query attends to besides its
        neighborhood, in one softmax. ``weights`` (with ``return_weights``): float32 ``[batch,
        *spatial, heads, prod(kernel_size) (+ L)]``, window slots first (row-major, as
        ``na*_qk``), then the extra tokens.
        """
        rank = self.rank
        if x.ndim != rank + 2:
            raise ValueError(f"x.shape={tuple(x.shape)}: expected [batch, {rank} spatial axes, "
                             "embed_dim]")
        q, k, v = self._split(x)
        ek = ev = None
        if additional_tokens is not None:
            if additional_tokens.ndim != 3 or additional_tokens.shape[0] != x.shape[0] \
                    or additional_tokens.shape[-1] != x.shape[-1]:
                raise ValueError(f"additional_tokens.shape={tuple(additional_tokens.shape)} "
                                 f"must be [batch={x.shape[0]}, L, embed_dim={x.shape[-1]}]")
            _, ek, ev = self._split(additional_tokens)
        rpb = None if self.rpb is None else self.rpb[...]
        window = dict(stride=self.stride, dilation=self.dilation, is_causal=self.is_causal,
                      is_periodic=self.is_periodic)
        drop = not self.attn_drop.deterministic and self.attn_drop.rate > 0
        weights = None
        if self.return_weights or drop:
            out, weights = self._unfused(q, k, v, ek, ev, rpb, window)
        else:
            out = kernels.neighborhood_attention(
                q, k, v, self.kernel_size, scale=self.scale, rpb=rpb, backend=self.backend,
                additional_keys=ek, additional_values=ev, spatial_axes=self._split_over(),
                **window)
        out = self.proj(out.reshape(*x.shape[:-1], -1))
        return self.proj_drop(out), weights if self.return_weights else None

    def _split_over(self):
        """``spatial_axes`` when the context mesh has those axes, else None (unsplit)."""
        axes = self.spatial_axes
        if axes is None:
            return None
        return axes if mesh_has_axes(context.mesh_axis_names(axes)) else None

    def _unfused(self, q, k, v, ek, ev, rpb, window):
        """Softmax weights materialized (``[..., heads, W (+ L)]``), dropout applied to them."""
        rank = self.rank
        qk = getattr(kernels, f"na{rank}d_qk")
        av = getattr(kernels, f"na{rank}d_av")
        logits = qk(q, k, self.kernel_size, scale=self.scale, rpb=rpb, backend=self.backend,
                    **window)
        w = logits.shape[-1]
        if ek is not None:
            scale = self.head_dim ** -0.5 if self.scale is None else self.scale
            logits = jnp.concatenate([logits, merge.extra_logits(q, ek, scale)], -1)
        probs = jax.nn.softmax(logits, axis=-1)
        dropped = self.attn_drop(probs)
        out = av(dropped[..., :w].astype(v.dtype), v, self.kernel_size, backend=self.backend,
                 **window)
        if ek is not None:
            out = out + merge.extra_weighted_sum(dropped[..., w:], ev).astype(out.dtype)
        return out, probs

    def __call__(self, x: jax.Array, additional_tokens: jax.Array | None = None) -> jax.Array:
        """``x [batch, *spatial, embed_dim] -> [batch, *spatial, embed_dim]``; see
        :meth:`attend`."""
        return self.attend(x, additional_tokens)[0]

    def flops(self, x_shape: tuple[int, ...], additional_tokens: int = 0) -> int:
        """Forward FLOPs for an input of ``x_shape``: the projections plus the attention by
        NATTEN's convention (:func:`nat_jax.kernels.na_flops`, plus ``additional_tokens`` keys
        per query)."""
        b, *spatial, c = x_shape
        tokens = b * math.prod(spatial)
        qkv = 2 * tokens * c * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        extra = 2 * b * additional_tokens * c * 2 * self.num_kv_heads * self.head_dim
        attn = kernels.na_flops(b, self.num_heads, tuple(spatial), self.kernel_size,
                                self.head_dim, additional_tokens=additional_tokens)
        return qkv + extra + attn + 2 * tokens * c * c


class NeighborhoodAttention1D(NeighborhoodAttention):
    """1-D neighborhood attention layer: ``[batch, L, embed_dim]``. See
    :class:`NeighborhoodAttention` for the arguments."""

    rank = 1


class NeighborhoodAttention2D(NeighborhoodAttention):
    """2-D neighborhood attention layer: ``[batch, H, W, embed_dim]``. See
    :class:`NeighborhoodAttention` for the arguments."""

    rank = 2


class NeighborhoodAttention3D(NeighborhoodAttention):
    """3-D neighborhood attention layer: ``[batch, X, Y, Z, embed_dim]``. See
    :class:`NeighborhoodAttention` for the arguments."""

    rank = 3
