"""NAT and DiNAT in Flax NNX, numerically equal to HuggingFace transformers 4.53.3.

Structure (of every published model, :mod:`nat_jax.zoo`): two 3x3 stride-2 convs (no
activation) + LayerNorm; stages of pre-norm layers ``x += drop_path(g1 * proj(NA(norm1(x))))``,
``x += drop_path(g2 * mlp(norm2(x)))`` with exact-GELU MLPs; a bias-free 3x3 stride-2 conv +
LayerNorm between stages; final LayerNorm, mean pool, linear head. DiNAT only changes the
per-layer dilation. Everything is channels-last (NHWC) inside.

Parameter tree (classifier; ``nat`` becomes ``dinat`` for DiNAT). Abbreviations: ``L`` =
``nat.encoder.levels.i.layers.j`` (ours and HF), ``B`` = ``levels.i.blocks.j`` (original),
``E`` = ``nat.embeddings``, ``P`` = ``E.patch_embeddings.projection``. Flax Linear kernels are
``[in, out]`` (torch ``weight.T``), conv kernels ``[kh, kw, in, out]`` (torch
``weight.transpose(2, 3, 1, 0)``), LayerNorm ``scale``/``bias`` = torch ``weight``/``bias``.

==========================================  ============================================
our path (``nnx.state(model, nnx.Param)``)  HF key
==========================================  ============================================
P.0.kernel, P.0.bias                        P.0.weight, P.0.bias
P.1.kernel, P.1.bias                        P.1.weight, P.1.bias
E.norm.scale/bias                           E.norm.weight/bias
L.layernorm_before.scale/bias               L.layernorm_before.weight/bias
L.attention.qkv.kernel [C, 3C]              concat(L.attention.self.{query,key,value}
                                            .weight, axis=0).T
L.attention.qkv.bias [3C]                   concat(L.attention.self.{query,key,value}.bias)
L.attention.rpb [heads, 2K-1, 2K-1]         L.attention.self.rpb (as is)
L.attention.proj.kernel/bias                L.attention.output.dense.weight.T/bias
L.layernorm_after.scale/bias                L.layernorm_after.weight/bias
L.mlp.fc1.kernel/bias                       L.intermediate.dense.weight.T/bias
L.mlp.fc2.kernel/bias                       L.output.dense.weight.T/bias
L.layer_scale_parameters [2, C]             L.layer_scale_parameters (only with layer scale)
nat.encoder.levels.i.downsample.reduction.  nat.encoder.levels.i.downsample.reduction.
kernel (no bias)                            weight
nat.encoder.levels.i.downsample.norm.*      nat.encoder.levels.i.downsample.norm.*
nat.layernorm.scale/bias                    nat.layernorm.weight/bias
classifier.kernel/bias                      classifier.weight.T/bias
==========================================  ============================================

Original (SHI-Labs) keys for the same tensors: ``patch_embed.proj.{0,1}``, ``patch_embed.norm``,
``B.norm1``, ``B.attn.qkv`` (already fused, same row order), ``B.attn.rpb``, ``B.attn.proj``,
``B.norm2``, ``B.mlp.fc1``, ``B.mlp.fc2``, ``B.gamma1``/``B.gamma2`` (stack to
``layer_scale_parameters``), ``levels.i.downsample.{reduction,norm}``, ``norm``, ``head``.

``NatModel`` / ``DinatModel`` have the same tree without the ``nat.`` prefix and without the
classifier. Backbones have ``embeddings``, ``encoder`` and ``hidden_states_norms.<name>.*``
(``<name>`` from ``out_features``: ``stem``, ``stage1``...; HF ``hidden_states_norms.<name>.*``);
there is no final ``layernorm``.
The qkv kernel's output columns are ``[q | k | v]``, each head-major (head h uses columns
``h*d:(h+1)*d`` of its block), matching HF's ``transpose_for_scores`` and the original reshape.
Dropout modules (present only for non-zero rates) hold ``nnx.RngState``, not parameters; each
layer's ``drop_path`` holds its rate as a ``DropPathRate`` variable (and a stream when the
model's drop-path rate is non-zero).

NNX conventions: modules take ``(config, options, ..., *, rngs)`` where ``config`` is the
architecture (:mod:`nat_jax.configs`) and :class:`BuildOptions` how it runs (compute and parameter
dtype, NA backend, rematerialization). Models are built in eval mode; ``model.train()`` /
``model.eval()`` switch dropout and drop path (module state, no ``deterministic`` argument). The
top-level call takes HF's ``output_hidden_states`` / ``output_attentions``; the layers whose
attention weights are returned are selected with ``nnx.view``, not with flags passed down.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from nat_jax import layers
from nat_jax.configs import DinatConfig, ModelConfig, NatConfig
from nat_jax.kernels import available_backends
from nat_jax.kernels.sharding import partition_axes
from nat_jax.outputs import BackboneOutput, ImageClassifierOutput, ModelOutput
from nat_jax.preprocess import EvalTransform

__all__ = [
    "BuildOptions", "DinatBackbone", "DinatForImageClassification", "DinatModel", "NatBackbone",
    "NatForImageClassification", "NatModel", "count_params",
]

_BACKBONE_NORM_EPS = 1e-5  # HF builds these with torch's default eps, not config.layer_norm_eps


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a model computes (not what it is): build-time arguments of every model class.

    Attributes:
      dtype: compute dtype of activations ("float32", "bfloat16", ...).
      param_dtype: dtype the parameters are stored in.
      na_backend: neighborhood-attention backend of every layer ("auto" or one of
        ``nat_jax.kernels.available_backends()``), for the fused op and for the unfused
        ``na2d_qk`` / ``na2d_av`` used when attention weights are returned or dropped out.
      remat: rematerialize each layer in the backward pass (``nnx.remat``): activation memory
        of one layer instead of all of them, for one more forward pass of each layer.
      context_axis: context parallelism: the mesh axis that the token rows (H) of the first
        ``context_stages`` stages are split over (each device holds ``H / axis size`` rows of
        every image and exchanges attention halos with its neighbours; see
        :mod:`nat_jax.kernels.context`). Takes effect when the model runs under a mesh with
        that axis (``jax.set_mesh``; the trainer's ``context`` axis); without one the model
        runs unsplit. None: off.
      context_stages: how many leading stages split their rows (the later, smaller grids are
        cheap to keep whole).
      ordered_backward: in the backward pass, each layer's parameter gradients are complete
        before the gradient moves on to the layer below (an optimization barrier on the
        layer's ``(parameter, input)`` cotangents). Under data parallelism XLA otherwise
        defers the weight-gradient matmuls to the one combined all-reduce at the end and keeps
        every layer's activations alive until then, which also defeats ``remat`` (a 6-layer
        MLP on 8 abstract H100s: 0.63 -> 0.50 GiB, with remat 0.57 -> 0.26 GiB, the one-device
        figures). Identity in the forward pass; with it the model has no forward-mode
        derivative (``jax.jvp``). The trainer turns it on.
      scan_layers: run each stage's repeated layers as one ``jax.lax.scan`` over their
        parameters stacked at trace time (groups of two layers where DiNAT alternates
        dilations), so XLA compiles one layer body per group instead of every layer. With
        ``remat`` it pays: DiNAT-B's train step on 8 abstract H100s compiles in 255 s instead
        of 354 s at the same 7.03 GiB per GPU (``benchmarks/remat.py --scan-layers``); without
        remat it saves no compile time and keeps the scan's stacked residuals (23.05 -> 30.96
        GiB). Same numbers and parameter layout (checkpoints and HF keys unchanged); drop path
        draws from each layer's own stream as unrolled. A layer whose structure differs from
        its group (the one returning attention weights) runs after the scan.
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    na_backend: str = "auto"
    remat: bool = False
    context_axis: str | None = None
    context_stages: int = 1
    ordered_backward: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                jnp.dtype(value)
            except TypeError:
                raise ValueError(f"{name}={value!r} is not a dtype name (e.g. 'float32', "
                                 "'bfloat16')") from None
            object.__setattr__(self, name, jnp.dtype(value).name)
        backends = ("auto",) + available_backends()
        if self.na_backend not in backends:
            raise ValueError(f"na_backend={self.na_backend!r} is not one of {backends}")
        if self.context_stages < 0:
            raise ValueError(f"context_stages={self.context_stages} must be >= 0")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


def _dtypes(options: BuildOptions) -> dict:
    return dict(dtype=options.compute_dtype, param_dtype=options.parameter_dtype)


def _init(config: ModelConfig):
    # HF's init: weights ~ N(0, initializer_range); the original's trunc_normal(.02) with its
    # +-2 absolute bounds is the same distribution in practice.
    return nnx.initializers.normal(stddev=config.initializer_range)


def _linear(config: ModelConfig, options: BuildOptions, din: int, dout: int, *,
            rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=_init(config), rngs=rngs,
                      **_dtypes(options))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_last(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32: ``(x - mean) / sqrt(var + eps) * scale + bias``
    with the two-pass variance ``E[(x - mean)^2]`` (torch's). ``x [..., C]``, ``scale, bias
    [C]`` -> float32 ``[..., C]``."""
    return _normalize_last_fwd(x, scale, bias, eps)[0]


def _normalize_last_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    xhat = centered * inv
    out = xhat * scale.astype(xhat.dtype) + bias.astype(xhat.dtype)
    return out, (xhat, inv, scale, bias, jnp.zeros((0,), x.dtype))


def _normalize_last_bwd(eps, res, g):
    xhat, inv, scale, bias, x_dtype = res
    gs = g * scale.astype(g.dtype)
    dx = inv * (gs - jnp.mean(gs, axis=-1, keepdims=True)
                - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
    lead = tuple(range(g.ndim - 1))
    return (dx.astype(x_dtype.dtype), jnp.sum(g * xhat, axis=lead).astype(scale.dtype),
            jnp.sum(g, axis=lead).astype(bias.dtype))


_normalize_last.defvjp(_normalize_last_fwd, _normalize_last_bwd)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over the last axis (same parameters, statistics in float32, torch's
    two-pass variance) whose backward is written out: ``dx = (g - mean(g) - xhat mean(g xhat))
    / sigma`` with ``g = dy * scale``, instead of autodiff through the statistics. On XLA:CPU
    that made a NAT-Mini stage-1 LayerNorm + matmul block's forward + backward 18% faster
    (44.0 -> 36.2 ms, batch 16). Masks, other axes and the fast variance use Flax's code."""

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if (mask is not None or self.use_fast_variance or self.axis_name is not None
                or self.scale is None or self.bias is None
                or self.reduction_axes not in (-1, (-1,)) or self.feature_axes not in (-1, (-1,))):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]),
                                            dtype=self.dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        return _normalize_last(x, scale, bias, self.epsilon).astype(dtype)


def _layer_norm(config: ModelConfig, options: BuildOptions, dim: int, *, rngs: nnx.Rngs,
                eps: float | None = None) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2.
    return LayerNorm(dim, epsilon=config.layer_norm_eps if eps is None else eps,
                     use_fast_variance=False, rngs=rngs, **_dtypes(options))


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides, padding, *, precision,
                 preferred_element_type) -> jax.Array:
    """A 2-D NHWC/HWIO convolution (no dilation, one group) as one matmul over its patches:
    ``x [B,H,W,C]``, ``kernel [kh,kw,C,O]``, explicit ``padding ((t,b),(l,r))`` ->
    ``[B,Ho,Wo,O]``. The patches are concatenated channel-last in the kernel's ``(dy, dx, c)``
    order, so ``kernel.reshape(kh*kw*C, O)`` is the matrix.

    Strided slices would be shorter, but their gradient is an interior-padded pad, which
    XLA:CPU ran at ~190 ms per step for NAT-Mini's second stem conv. Instead the padded input
    is reshaped to ``[B, Hq, sh, Wq, sw, C]`` (row ``dy + sh*i`` is ``[dy//sh + i, dy%sh]``),
    and every patch is a unit-stride slice of that, whose gradient is a plain pad."""
    kh, kw, c, o = kernel.shape
    b, h, w, _ = x.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    hq, wq = ho + (kh - 1) // sh, wo + (kw - 1) // sw
    # lax.pad crops where the rows past the last window are unused (negative high padding).
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (pt, sh * hq - h - pt, 0), (pl, sw * wq - w - pl, 0), (0, 0, 0)))
    xs = xp.reshape(b, hq, sh, wq, sw, c)
    cols = [xs[:, dy // sh:dy // sh + ho, dy % sh, dx // sw:dx // sw + wo, dx % sw, :]
            for dy in range(kh) for dx in range(kw)]
    return jax.lax.dot_general(jnp.concatenate(cols, axis=-1), kernel.reshape(kh * kw * c, o),
                               (((3,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None, preferred_element_type=None, **kwargs):
    """``lax.conv_general_dilated`` for ``nnx.Conv``, except that a plain 2-D convolution lowered
    for CPU runs as :func:`_im2col_conv`. XLA:CPU's convolution gradients are slow: forward +
    backward of NAT-Mini's 3x3 stride-2 convs at batch 16 took 92 / 46 / 20 / 16 ms as
    convolutions, 53 / 32 / 21 / 13 ms as im2col matmuls (C = 32 / 64 / 128 / 256). GPU and TPU
    keep the convolution (``lax.platform_dependent`` picks per lowering platform)."""
    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type, **kwargs)

    plain = (lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
             and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
             and dimension_numbers == jax.lax.conv_dimension_numbers(
                 lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
             and kwargs.get("out_sharding") is None
             # Patches of fewer than 16 channels (the RGB stem) move too little per slice: there
             # the convolution was faster (15 vs 55 ms for the stem's first conv).
             and lhs.shape[-1] >= 16)
    if not plain:
        return conv(lhs, rhs)
    cpu = functools.partial(_im2col_conv, strides=tuple(window_strides),
                            padding=tuple(map(tuple, padding)), precision=precision,
                            preferred_element_type=preferred_element_type)
    return jax.lax.platform_dependent(lhs, rhs, cpu=cpu, default=conv)


def _conv3x3_s2(config: ModelConfig, options: BuildOptions, din: int, dout: int, *,
                rngs: nnx.Rngs, use_bias: bool) -> nnx.Conv:
    # Explicit (1, 1) padding as torch's padding=1; 'SAME' would pad (0, 1) on even inputs.
    return nnx.Conv(din, dout, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    use_bias=use_bias, kernel_init=_init(config), rngs=rngs,
                    conv_general_dilated=_conv_general_dilated, **_dtypes(options))


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU written as torch writes it, ``x / 2 * (1 + erf(x / sqrt(2)))``; any shape.

    ``jax.nn.gelu(approximate=False)`` computes the same function through ``erfc``, which
    XLA:CPU evaluates more slowly: this form made a NAT-Mini stage-1 MLP block's forward +
    backward 18% faster on CPU. For very negative inputs (where GELU is below ~1e-3) it keeps
    torch's absolute rather than ``erfc``'s relative accuracy."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))


def _dropout(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    # Built in eval mode (model.train() turns it on). Only modules that can drop keep an RNG
    # stream ("dropout", falling back to "default").
    return nnx.Dropout(rate, deterministic=True, rngs=rngs if rate > 0 else None)


class DropPathRate(nnx.Variable):
    """A layer's drop-path probability, held as data (not a static attribute) so layers with
    different rates share one structure and can be scanned; not a parameter."""


class DropPath(nnx.Module):
    """Stochastic depth (timm ``DropPath``): in train mode each sample's residual branch is
    dropped with probability ``rate`` and kept ones are scaled by ``1 / (1 - rate)``; identity in
    eval mode. ``x [B, ...] -> [B, ...]``.

    ``rate`` is a :class:`DropPathRate` variable and every instance of a model whose largest
    rate is positive draws from its own "dropout" stream (forked, as ``nnx.Dropout`` does), even
    at rate 0; a model without drop path (``enabled=False``) holds no stream at all.
    """

    def __init__(self, rate: float, *, enabled: bool, rngs: nnx.Rngs):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate {rate} must be in [0, 1)")
        self.rate = DropPathRate(jnp.asarray(rate, jnp.float32))
        self.deterministic = True  # built in eval mode; model.train() turns it on
        self.rngs = rngs["dropout"].fork() if enabled else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rngs is None:
            return x
        keep = 1.0 - self.rate[...]
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def _nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


# ------------------------------------------------------------------ building blocks


class PatchEmbeddings(nnx.Module):
    """Two 3x3 stride-2 convs (3 -> C/2 -> C), no activation: ``[B,H,W,3] -> [B,H/4,W/4,C]``."""

    def __init__(self, config: ModelConfig, options: BuildOptions, *, rngs: nnx.Rngs):
        c = config.embed_dim
        self.projection = nnx.List([
            _conv3x3_s2(config, options, config.num_channels, c // 2, rngs=rngs, use_bias=True),
            _conv3x3_s2(config, options, c // 2, c, rngs=rngs, use_bias=True),
        ])

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = pixel_values
        for conv in self.projection:
            x = conv(x)
        return x


class Embeddings(nnx.Module):
    """Patch embedding + LayerNorm + dropout (HF ``NatEmbeddings``)."""

    def __init__(self, config: ModelConfig, options: BuildOptions, *, rngs: nnx.Rngs):
        self.num_channels = config.num_channels
        self.patch_embeddings = PatchEmbeddings(config, options, rngs=rngs)
        self.norm = _layer_norm(config, options, config.embed_dim, rngs=rngs)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        if (pixel_values.ndim != 4 or pixel_values.shape[-1] != self.num_channels
                or 0 in pixel_values.shape):  # empty inputs: NaN pooling or kernel errors
            raise ValueError(f"pixel_values.shape={tuple(pixel_values.shape)} must be "
                             f"[batch, height, width, {self.num_channels}] (NHWC), every size "
                             ">= 1")
        return self.dropout(self.norm(self.patch_embeddings(pixel_values)))


class NeighborhoodAttention(layers.NeighborhoodAttention2D):
    """Multi-head 2-D neighborhood attention with relative positional bias: the generic
    :class:`nat_jax.layers.NeighborhoodAttention2D` built from a model config.

    ``qkv`` is one fused ``C -> 3C`` projection (HF's query/key/value concatenated), ``rpb`` is
    ``[heads, 2K-1, 2K-1]``, ``proj`` is the output projection (HF ``attention.output.dense``).
    ``return_weights`` (module state, set through ``nnx.view``) makes the call return the
    softmax weights too; they and attention dropout need the unfused ``na2d_qk`` / ``na2d_av``,
    which run on the same ``na_backend`` as the fused op.
    """

    def __init__(self, config: ModelConfig, options: BuildOptions, dim: int, num_heads: int,
                 dilation: int, *, split_rows: bool = False, rngs: nnx.Rngs):
        # HF applies attention_probs_dropout_prob to the weights and after the projection.
        super().__init__(dim, num_heads, config.kernel_size, dilation=dilation,
                         qkv_bias=config.qkv_bias, rpb=True,
                         attn_drop=config.attention_probs_dropout_prob,
                         proj_drop=config.attention_probs_dropout_prob,
                         backend=options.na_backend, kernel_init=_init(config),
                         rpb_init=_init(config),
                         spatial_axes=(options.context_axis, None) if split_rows else None,
                         rngs=rngs, **_dtypes(options))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, H, W, C]`` (H, W >= kernel*dilation) -> ``(out [B,H,W,C], weights | None)``.

        weights: ``[B, heads, H, W, K*K]`` float32 softmax (HF layout) when ``return_weights``.
        """
        out, weights = self.attend(x)
        return out, None if weights is None else jnp.transpose(weights, (0, 3, 1, 2, 4))


class Mlp(nnx.Module):
    """``fc1 -> exact GELU -> fc2 -> dropout`` (HF ``intermediate`` / ``output``)."""

    def __init__(self, config: ModelConfig, options: BuildOptions, dim: int, *,
                 rngs: nnx.Rngs):
        hidden = int(config.mlp_ratio * dim)
        self.fc1 = _linear(config, options, dim, hidden, rngs=rngs)
        self.fc2 = _linear(config, options, hidden, dim, rngs=rngs)
        self.drop = _dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(self.fc1(x))
        return self.drop(self.fc2(x))


class NatLayer(nnx.Module):
    """Pre-norm NA layer with drop path and optional layer scale (HF ``NatLayer``/``DinatLayer``).

    Inputs smaller than ``kernel_size * dilation`` are zero-padded (bottom/right) after the
    LayerNorm and before ``qkv`` and cropped after attention, exactly as HF does: the padded
    tokens take part as keys/values equal to the qkv bias.
    """

    def __init__(self, config: ModelConfig, options: BuildOptions, dim: int, num_heads: int,
                 dilation: int, drop_path_rate: float, *, split_rows: bool = False,
                 rngs: nnx.Rngs):
        self.window = config.kernel_size * dilation
        self.ordered_backward = options.ordered_backward
        self.layernorm_before = _layer_norm(config, options, dim, rngs=rngs)
        self.attention = NeighborhoodAttention(config, options, dim, num_heads, dilation,
                                               split_rows=split_rows, rngs=rngs)
        self.layernorm_after = _layer_norm(config, options, dim, rngs=rngs)
        self.mlp = Mlp(config, options, dim, rngs=rngs)
        self.drop_path = DropPath(drop_path_rate, enabled=config.drop_path_rate > 0, rngs=rngs)
        if config.layer_scale_init_value > 0:
            self.layer_scale_parameters = nnx.Param(jnp.full(
                (2, dim), config.layer_scale_init_value, options.parameter_dtype))
        else:
            self.layer_scale_parameters = None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, H, W, C] -> (x [B, H, W, C], attention weights | None)``."""
        _, h, w, _ = x.shape
        y = self.layernorm_before(x)
        pad_h, pad_w = max(0, self.window - h), max(0, self.window - w)
        if pad_h or pad_w:
            y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        y, weights = self.attention(y)
        y = y[:, :h, :w]
        scale = self.layer_scale_parameters
        if scale is not None:
            y = scale[0].astype(y.dtype) * y
        x = x + self.drop_path(y)
        y = self.mlp(self.layernorm_after(x))
        if scale is not None:
            y = scale[1].astype(y.dtype) * y
        return x + self.drop_path(y), weights


class Downsampler(nnx.Module):
    """Bias-free 3x3 stride-2 conv ``C -> 2C`` then LayerNorm: ``[B,H,W,C] -> [B,H/2,W/2,2C]``."""

    def __init__(self, config: ModelConfig, options: BuildOptions, dim: int, *,
                 rngs: nnx.Rngs):
        self.reduction = _conv3x3_s2(config, options, dim, 2 * dim, rngs=rngs, use_bias=False)
        self.norm = _layer_norm(config, options, 2 * dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.reduction(x))


@jax.custom_vjp
def _gradients_in_order(params, x):
    return params, x


def _gradients_in_order_fwd(params, x):
    return (params, x), None


def _gradients_in_order_bwd(_, cotangents):
    # The input's cotangent leaves only together with the parameters' (see ordered_backward).
    return jax.lax.optimization_barrier(cotangents)


_gradients_in_order.defvjp(_gradients_in_order_fwd, _gradients_in_order_bwd)


def _apply_layer(layer: NatLayer, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    if not layer.ordered_backward:
        return layer(x)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    params, x = _gradients_in_order(params, x)
    tied = nnx.merge(graphdef, params, rest)
    out = tied(x)
    # RNG counts advance as without the tie. Where merge shares the non-parameter variables
    # (flax 0.12) they already have; writing them back would then fail for a model whose state
    # was created outside the current trace (a jitted function closing over it).
    state = nnx.state(tied, nnx.Not(nnx.Param))
    leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    ours = jax.tree.leaves(nnx.state(layer, nnx.Not(nnx.Param)),
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
    if any(a is not b for a, b in zip(leaves, ours)):
        nnx.update(layer, state)
    return out


# The backward pass recomputes the layer from its input: only layer inputs stay in memory.
_apply_layer_remat = nnx.remat(_apply_layer)


class NatStage(nnx.Module):
    """``depth`` layers, then the downsampler (all stages but the last)."""

    def __init__(self, config: ModelConfig, options: BuildOptions, index: int,
                 drop_path_rates: list[float], *, rngs: nnx.Rngs):
        dim = config.stage_dims[index]
        dilations = config.layer_dilations[index]
        self.remat = options.remat
        # Layers repeat with this period (DiNAT alternates two dilations; NAT has one).
        self.scan_period = next(p for p in range(1, len(dilations) + 1)
                                if all(d == dilations[i % p] for i, d in enumerate(dilations)))
        self.scan_layers = options.scan_layers
        split = options.context_axis is not None and index < options.context_stages
        self.context_axis = options.context_axis if split else None
        # The last split stage hands whole rows to the next one (after downsampling: 4x fewer).
        self.join_rows = split and index + 1 == options.context_stages
        self.layers = nnx.List([
            NatLayer(config, options, dim, config.num_heads[index], dilations[j],
                     drop_path_rates[j], split_rows=split, rngs=rngs)
            for j in range(config.depths[index])
        ])
        last = index == config.num_stages - 1
        self.downsample = None if last else Downsampler(config, options, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Returns ``(output, output_before_downsampling, last layer's weights | None)``."""
        apply = _apply_layer_remat if self.remat else _apply_layer
        weights = None
        split = self.context_axis is not None and layers.mesh_has_axes((self.context_axis,))
        if split:
            # The whole stage (norms and MLPs too, not only attention) keeps its rows split.
            x = _split_rows(x, self.context_axis)
        todo = list(self.layers)
        if self.scan_layers:
            x, todo = _scan_layers(apply, todo, self.scan_period, x)
        for layer in todo:
            x, weights = apply(layer, x)
        before = x
        if self.downsample is not None:
            x = self.downsample(x)
        if split and self.join_rows:
            x = _split_rows(x, None, exclude=self.context_axis)
        return x, before, weights


def _scan_layers(apply, layers_: list[NatLayer], period: int, x: jax.Array
                 ) -> tuple[jax.Array, list[NatLayer]]:
    """Runs the leading layers of ``layers_`` as a scan over groups of ``period`` layers and
    returns ``(x, the layers left to run)``.

    Group ``g`` is ``layers_[g*period:(g+1)*period]``. Each position in the group has one
    structure (graphdef) across groups; the state of its layers (parameters, drop-path rate,
    RNG streams) is stacked at trace time and sliced per step, so gradients reach every
    layer's own parameters and the streams advance per layer as unrolled. Scanning stops at the
    first layer whose structure differs (e.g. the one viewed to return attention weights).
    """
    splits = [nnx.split(layer) for layer in layers_]
    graphdefs = [g for g, _ in splits[:period]]
    same = 0
    while same < len(splits) and splits[same][0] == graphdefs[same % period]:
        same += 1
    groups = same // period
    if groups < 2:
        return x, layers_

    def stacked(j):
        return jax.tree.map(lambda *a: jnp.stack(a),
                            *(splits[g * period + j][1] for g in range(groups)))

    def body(x, group_states):
        states = []
        for graphdef, state in zip(graphdefs, group_states):
            layer = nnx.merge(graphdef, state)
            x, weights = apply(layer, x)
            assert weights is None, "a layer returning weights must not be scanned"
            states.append(nnx.state(layer, nnx.Not(nnx.Param)))
        return x, tuple(states)

    x, after = jax.lax.scan(body, x, tuple(stacked(j) for j in range(period)))
    # The streams' counts advanced inside the scan: hand each layer its own back.
    for g in range(groups):
        for j in range(period):
            nnx.update(layers_[g * period + j], jax.tree.map(lambda a: a[g], after[j]))
    return x, layers_[groups * period:]


def _split_rows(x: jax.Array, rows: str | None, exclude: str | None = None) -> jax.Array:
    """``x [B, H, W, C]`` constrained to its batch split over the context mesh's axes (but
    ``rows`` / ``exclude``) and its rows over ``rows`` (None: whole rows). Stated exactly
    rather than left to propagation: left open, XLA's partitioner gathered the global batch
    for the downsampler's weight gradient."""
    mesh = jax.sharding.get_abstract_mesh()
    skip = tuple(a for a in (rows, exclude) if a is not None)
    batch, _ = partition_axes(mesh, x.shape[0], 1, exclude=skip)
    spec_batch = None if not batch else (batch[0] if len(batch) == 1 else batch)
    return jax.lax.with_sharding_constraint(x, P(spec_batch, rows, None, None))


class NatEncoder(nnx.Module):
    """All stages; drop-path rates rise linearly from 0 to ``drop_path_rate`` over all layers."""

    def __init__(self, config: ModelConfig, options: BuildOptions, *, rngs: nnx.Rngs):
        rates = np.linspace(0.0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = np.cumsum((0,) + tuple(config.depths)).tolist()
        self.levels = nnx.List([
            NatStage(config, options, i, rates[starts[i]:starts[i + 1]], rngs=rngs)
            for i in range(config.num_stages)
        ])

    def __call__(self, x: jax.Array, output_attentions: bool = False):
        """``x [B, h, w, C]`` (embeddings) -> ``(last, after, before, attentions | None)``:
        ``after``/``before`` are ``(x, *stage outputs after / before downsampling)``.

        ``output_attentions`` (the top-level flag, HF's): each stage's last layer also returns
        its attention weights (as HF returns them), through an ``nnx.view`` of those layers.
        """
        encoder = self
        if output_attentions:
            last = {("levels", i, "layers", len(stage.layers) - 1, "attention")
                    for i, stage in enumerate(self.levels)}
            encoder = nnx.view(self, only=lambda path, _: tuple(path) in last,
                               return_weights=True)
        after, before, attentions = [x], [x], []
        for stage in encoder.levels:
            x, pre, weights = stage(x)
            after.append(x)
            before.append(pre)
            attentions.append(weights)
        return x, tuple(after), tuple(before), tuple(attentions) if output_attentions else None


def _check_config(obj, config) -> None:
    if not isinstance(config, obj.config_class):
        raise ValueError(f"{type(obj).__name__} needs a {obj.config_class.__name__}, got "
                         f"{type(config).__name__}")


class _Model(nnx.Module):
    """What every public model has: its config, build options and eval transform, and the
    parameters the optimizer must not decay."""

    config_class: type[ModelConfig] = ModelConfig
    config: ModelConfig
    options: BuildOptions
    eval_transform: EvalTransform

    def _setup(self, config: ModelConfig, options: BuildOptions,
               eval_transform: EvalTransform | None) -> None:
        _check_config(self, config)
        self.config = config
        self.options = options
        self.eval_transform = eval_transform or EvalTransform()

    def no_weight_decay(self) -> frozenset[tuple[str | int, ...]]:
        """Paths (as in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) of the parameters
        that take no weight decay besides biases and norms: relative position biases and layer
        scales (1-D ``gamma1``/``gamma2`` in the original code, stacked here)."""
        out = set()
        for path, node in nnx.iter_graph(self):
            if isinstance(node, NeighborhoodAttention):
                out.add(tuple(path) + ("rpb",))
            elif isinstance(node, NatLayer) and node.layer_scale_parameters is not None:
                out.add(tuple(path) + ("layer_scale_parameters",))
        return frozenset(out)


def _options_from(arguments: dict) -> BuildOptions:
    """The :class:`BuildOptions` among a model constructor's arguments (its ``locals()``): each
    constructor lists the options in its signature, for users, and builds them here once."""
    return BuildOptions(**{f.name: arguments[f.name] for f in dataclasses.fields(BuildOptions)})


_BUILD_DOC = """
    Args:
      config: the architecture (``{config}``).
      rngs: parameter initialization ("params" stream, else "default") and, for models with
        dropout or drop path, their streams ("dropout", else "default").
      dtype, param_dtype, na_backend, remat, context_axis, context_stages, ordered_backward,
        scan_layers: see :class:`BuildOptions`.
      eval_transform: the eval preprocessing :func:`nat_jax.predict` applies (default: 224
        px, crop 0.875, ImageNet mean/std); checkpoints carry theirs.
"""


# ------------------------------------------------------------------ public models


class NatModel(_Model):
    """Bare NAT: embeddings, encoder, final LayerNorm and mean pooling.

    Call: ``model(pixel_values [B,H,W,3], output_hidden_states=False, output_attentions=False)
    -> ModelOutput`` (see :mod:`nat_jax.outputs` for the layouts). Built in eval mode;
    ``model.train()`` enables dropout / drop path, drawing from the ``rngs`` given at
    construction.
    """

    config_class = NatConfig

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: str = "float32",
                 param_dtype: str = "float32", na_backend: str = "auto", remat: bool = False,
                 context_axis: str | None = None, context_stages: int = 1,
                 ordered_backward: bool = False, scan_layers: bool = False,
                 eval_transform: EvalTransform | None = None):
        self._setup(config, _options_from(locals()), eval_transform)
        options = self.options
        self.embeddings = Embeddings(config, options, rngs=rngs)
        self.encoder = NatEncoder(config, options, rngs=rngs)
        self.layernorm = _layer_norm(config, options, config.hidden_size, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> ModelOutput:
        x = self.embeddings(pixel_values.astype(self.options.compute_dtype))
        x, hidden, _, attentions = self.encoder(x, output_attentions)
        x = self.layernorm(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        hidden = hidden if output_hidden_states else None
        return ModelOutput(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden,
            reshaped_hidden_states=None if hidden is None else tuple(map(_nchw, hidden)),
            attentions=attentions)


class NatForImageClassification(_Model):
    """NAT with a linear head on the pooled features; logits are float32 ``[B, num_labels]``.

    The base model is the attribute named after ``config.model_type`` (``nat`` / ``dinat``, as
    in HF), also reachable as ``base_model``.
    """

    config_class = NatConfig
    base_class = NatModel

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: str = "float32",
                 param_dtype: str = "float32", na_backend: str = "auto", remat: bool = False,
                 context_axis: str | None = None, context_stages: int = 1,
                 ordered_backward: bool = False, scan_layers: bool = False,
                 eval_transform: EvalTransform | None = None):
        self._setup(config, _options_from(locals()), eval_transform)
        setattr(self, config.model_type, self.base_class(
            config, rngs=rngs, eval_transform=eval_transform,
            **dataclasses.asdict(self.options)))
        self.classifier = (_linear(config, self.options, config.hidden_size, config.num_labels,
                                   rngs=rngs) if config.num_labels > 0 else None)

    @property
    def base_model(self) -> NatModel:
        return getattr(self, self.config.model_type)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> ImageClassifierOutput:
        out = self.base_model(pixel_values, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions)
        pooled = out.pooler_output
        logits = pooled if self.classifier is None else self.classifier(pooled)
        return ImageClassifierOutput(
            logits=logits.astype(jnp.float32), pooler_output=pooled,
            hidden_states=out.hidden_states, reshaped_hidden_states=out.reshaped_hidden_states,
            attentions=out.attentions)


class NatBackbone(_Model):
    """NAT feature extractor: per requested stage (``config.out_features``), the stage output
    before downsampling through its own LayerNorm, NCHW (HF ``NatBackbone``).

    ``channels`` and ``strides`` give each feature map's width and stride w.r.t. the input.
    """

    config_class = NatConfig

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: str = "float32",
                 param_dtype: str = "float32", na_backend: str = "auto", remat: bool = False,
                 context_axis: str | None = None, context_stages: int = 1,
                 ordered_backward: bool = False, scan_layers: bool = False,
                 eval_transform: EvalTransform | None = None):
        self._setup(config, _options_from(locals()), eval_transform)
        options = self.options
        self.out_features, self.out_indices = config.backbone_stages()
        widths = (config.embed_dim,) + config.stage_dims
        self.num_features = widths
        self.channels = tuple(widths[i] for i in self.out_indices)
        self.strides = tuple(4 * 2 ** max(i - 1, 0) for i in self.out_indices)
        self.embeddings = Embeddings(config, options, rngs=rngs)
        self.encoder = NatEncoder(config, options, rngs=rngs)
        self.hidden_states_norms = nnx.Dict({
            name: _layer_norm(config, options, widths[i], rngs=rngs, eps=_BACKBONE_NORM_EPS)
            for name, i in zip(self.out_features, self.out_indices)
        })

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> BackboneOutput:
        x = self.embeddings(pixel_values.astype(self.options.compute_dtype))
        _, _, hidden, attentions = self.encoder(x, output_attentions)
        maps = tuple(_nchw(self.hidden_states_norms[name](hidden[i]))
                     for name, i in zip(self.out_features, self.out_indices))
        return BackboneOutput(feature_maps=maps,
                              hidden_states=hidden if output_hidden_states else None,
                              attentions=attentions)


class DinatModel(NatModel):
    """Bare DiNAT (per-layer dilations from ``DinatConfig.dilations``); see :class:`NatModel`."""

    config_class = DinatConfig


class DinatForImageClassification(NatForImageClassification):
    """DiNAT classifier; see :class:`NatForImageClassification`."""

    config_class = DinatConfig
    base_class = DinatModel


class DinatBackbone(NatBackbone):
    """DiNAT feature extractor; see :class:`NatBackbone`."""

    config_class = DinatConfig


for _cls in (NatModel, NatForImageClassification, NatBackbone):
    _cls.__init__.__doc__ = _BUILD_DOC.format(config="NatConfig; DinatConfig for Dinat*")


def count_params(model_or_state) -> int:
    """Number of parameters (``nnx.Param`` entries) of a module or an (abstract) state."""
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
