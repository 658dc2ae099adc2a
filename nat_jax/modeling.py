"""NAT and DiNAT in Flax NNX, numerically equal to HuggingFace transformers 4.53.3.

Structure (``shared/reference/checkpoints.md``): two 3x3 stride-2 convs (no activation) +
LayerNorm; stages of pre-norm layers ``x += drop_path(g1 * proj(NA(norm1(x))))``,
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
Dropout modules (present only for non-zero rates) hold ``nnx.RngState``, not parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nat_jax import kernels
from nat_jax.configs import DinatConfig, NatConfig, _BaseConfig
from nat_jax.outputs import BackboneOutput, ImageClassifierOutput, ModelOutput

__all__ = [
    "DinatBackbone", "DinatForImageClassification", "DinatModel", "NatBackbone",
    "NatForImageClassification", "NatModel", "build_model", "count_params",
]

_BACKBONE_NORM_EPS = 1e-5  # HF builds these with torch's default eps, not config.layer_norm_eps


def _dtypes(config: _BaseConfig) -> dict:
    return dict(dtype=config.compute_dtype, param_dtype=config.parameter_dtype)


def _init(config: _BaseConfig):
    # HF's init: weights ~ N(0, initializer_range); the original's trunc_normal(.02) with its
    # +-2 absolute bounds is the same distribution in practice.
    return nnx.initializers.normal(stddev=config.initializer_range)


def _linear(config: _BaseConfig, din: int, dout: int, *, rngs: nnx.Rngs,
            use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=_init(config), rngs=rngs,
                      **_dtypes(config))


def _layer_norm(config: _BaseConfig, dim: int, *, rngs: nnx.Rngs,
                eps: float | None = None) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2.
    return nnx.LayerNorm(dim, epsilon=config.layer_norm_eps if eps is None else eps,
                         use_fast_variance=False, rngs=rngs, **_dtypes(config))


def _conv3x3_s2(config: _BaseConfig, din: int, dout: int, *, rngs: nnx.Rngs,
                use_bias: bool) -> nnx.Conv:
    # Explicit (1, 1) padding as torch's padding=1; 'SAME' would pad (0, 1) on even inputs.
    return nnx.Conv(din, dout, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    use_bias=use_bias, kernel_init=_init(config), rngs=rngs, **_dtypes(config))


def _dropout(rate: float, *, rngs: nnx.Rngs, broadcast_dims: tuple[int, ...] = ()
             ) -> nnx.Dropout:
    # Only modules that can drop keep an RNG stream ("dropout", falling back to "default").
    return nnx.Dropout(rate, broadcast_dims=broadcast_dims, rngs=rngs if rate > 0 else None)


def _nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


# ------------------------------------------------------------------ building blocks


class PatchEmbeddings(nnx.Module):
    """Two 3x3 stride-2 convs (3 -> C/2 -> C), no activation: ``[B,H,W,3] -> [B,H/4,W/4,C]``."""

    def __init__(self, config: _BaseConfig, *, rngs: nnx.Rngs):
        c = config.embed_dim
        self.projection = nnx.List([
            _conv3x3_s2(config, config.num_channels, c // 2, rngs=rngs, use_bias=True),
            _conv3x3_s2(config, c // 2, c, rngs=rngs, use_bias=True),
        ])

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = pixel_values
        for conv in self.projection:
            x = conv(x)
        return x


class Embeddings(nnx.Module):
    """Patch embedding + LayerNorm + dropout (HF ``NatEmbeddings``)."""

    def __init__(self, config: _BaseConfig, *, rngs: nnx.Rngs):
        self.num_channels = config.num_channels
        self.patch_embeddings = PatchEmbeddings(config, rngs=rngs)
        self.norm = _layer_norm(config, config.embed_dim, rngs=rngs)
        self.dropout = _dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if (pixel_values.ndim != 4 or pixel_values.shape[-1] != self.num_channels
                or 0 in pixel_values.shape):  # empty inputs: NaN pooling or kernel errors
            raise ValueError(f"pixel_values.shape={tuple(pixel_values.shape)} must be "
                             f"[batch, height, width, {self.num_channels}] (NHWC), every size "
                             ">= 1")
        x = self.norm(self.patch_embeddings(pixel_values))
        return self.dropout(x, deterministic=deterministic)


class NeighborhoodAttention(nnx.Module):
    """Multi-head 2-D neighborhood attention with relative positional bias.

    ``qkv`` is one fused ``C -> 3C`` projection (HF's query/key/value concatenated), ``rpb`` is
    ``[heads, 2K-1, 2K-1]``, ``proj`` is the output projection (HF ``attention.output.dense``).
    """

    def __init__(self, config: _BaseConfig, dim: int, num_heads: int, dilation: int, *,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = config.kernel_size
        self.dilation = dilation
        self.backend = config.na_backend
        k = config.kernel_size
        self.qkv = _linear(config, dim, 3 * dim, rngs=rngs, use_bias=config.qkv_bias)
        self.rpb = nnx.Param(_init(config)(rngs.params(), (num_heads, 2 * k - 1, 2 * k - 1),
                                           config.parameter_dtype))
        self.attn_drop = _dropout(config.attention_probs_dropout_prob, rngs=rngs)
        self.proj = _linear(config, dim, dim, rngs=rngs)
        # HF applies attention_probs_dropout_prob after the output projection too.
        self.proj_drop = _dropout(config.attention_probs_dropout_prob, rngs=rngs)

    def __call__(self, x: jax.Array, *, output_attentions: bool = False,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, H, W, C]`` (H, W >= kernel*dilation) -> ``(out [B,H,W,C], weights | None)``.

        weights: ``[B, heads, H, W, K*K]`` float32 softmax (HF layout) when requested.
        """
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        rpb = self.rpb[...]
        drop_probs = not deterministic and self.attn_drop.rate > 0
        weights = None
        if output_attentions or drop_probs:
            logits = kernels.na2d_qk(q, k, self.kernel_size, dilation=self.dilation, rpb=rpb)
            probs = jax.nn.softmax(logits, axis=-1)
            weights = jnp.transpose(probs, (0, 3, 1, 2, 4)) if output_attentions else None
            probs = self.attn_drop(probs, deterministic=deterministic)
            out = kernels.na2d_av(probs.astype(v.dtype), v, self.kernel_size,
                                  dilation=self.dilation)
        else:
            out = kernels.na2d(q, k, v, self.kernel_size, dilation=self.dilation, rpb=rpb,
                               backend=self.backend)
        out = self.proj(out.reshape(b, h, w, c))
        return self.proj_drop(out, deterministic=deterministic), weights


class Mlp(nnx.Module):
    """``fc1 -> exact GELU -> fc2 -> dropout`` (HF ``intermediate`` / ``output``)."""

    def __init__(self, config: _BaseConfig, dim: int, *, rngs: nnx.Rngs):
        hidden = int(config.mlp_ratio * dim)
        self.fc1 = _linear(config, dim, hidden, rngs=rngs)
        self.fc2 = _linear(config, hidden, dim, rngs=rngs)
        self.drop = _dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.drop(self.fc2(x), deterministic=deterministic)


class NatLayer(nnx.Module):
    """Pre-norm NA layer with drop path and optional layer scale (HF ``NatLayer``/``DinatLayer``).

    Inputs smaller than ``kernel_size * dilation`` are zero-padded (bottom/right) after the
    LayerNorm and before ``qkv`` and cropped after attention, exactly as HF does: the padded
    tokens take part as keys/values equal to the qkv bias.
    """

    def __init__(self, config: _BaseConfig, dim: int, num_heads: int, dilation: int,
                 drop_path_rate: float, *, rngs: nnx.Rngs):
        self.window = config.kernel_size * dilation
        self.layernorm_before = _layer_norm(config, dim, rngs=rngs)
        self.attention = NeighborhoodAttention(config, dim, num_heads, dilation, rngs=rngs)
        self.layernorm_after = _layer_norm(config, dim, rngs=rngs)
        self.mlp = Mlp(config, dim, rngs=rngs)
        # Stochastic depth: one keep/drop decision per sample (mask broadcast over H, W, C).
        self.drop_path = _dropout(drop_path_rate, rngs=rngs, broadcast_dims=(1, 2, 3))
        if config.layer_scale_init_value > 0:
            self.layer_scale_parameters = nnx.Param(jnp.full(
                (2, dim), config.layer_scale_init_value, config.parameter_dtype))
        else:
            self.layer_scale_parameters = None

    def __call__(self, x: jax.Array, *, output_attentions: bool = False,
                 deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, H, W, C] -> (x [B, H, W, C], attention weights | None)``."""
        _, h, w, _ = x.shape
        y = self.layernorm_before(x)
        pad_h, pad_w = max(0, self.window - h), max(0, self.window - w)
        if pad_h or pad_w:
            y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        y, weights = self.attention(y, output_attentions=output_attentions,
                                    deterministic=deterministic)
        y = y[:, :h, :w]
        scale = self.layer_scale_parameters
        if scale is not None:
            y = scale[0].astype(y.dtype) * y
        x = x + self.drop_path(y, deterministic=deterministic)
        y = self.mlp(self.layernorm_after(x), deterministic=deterministic)
        if scale is not None:
            y = scale[1].astype(y.dtype) * y
        return x + self.drop_path(y, deterministic=deterministic), weights


class Downsampler(nnx.Module):
    """Bias-free 3x3 stride-2 conv ``C -> 2C`` then LayerNorm: ``[B,H,W,C] -> [B,H/2,W/2,2C]``."""

    def __init__(self, config: _BaseConfig, dim: int, *, rngs: nnx.Rngs):
        self.reduction = _conv3x3_s2(config, dim, 2 * dim, rngs=rngs, use_bias=False)
        self.norm = _layer_norm(config, 2 * dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.reduction(x))


class NatStage(nnx.Module):
    """``depth`` layers, then the downsampler (all stages but the last)."""

    def __init__(self, config: _BaseConfig, index: int, drop_path_rates: list[float], *,
                 rngs: nnx.Rngs):
        dim = config.stage_dims[index]
        dilations = config.layer_dilations[index]
        self.layers = nnx.List([
            NatLayer(config, dim, config.num_heads[index], dilations[j], drop_path_rates[j],
                     rngs=rngs)
            for j in range(config.depths[index])
        ])
        last = index == config.num_stages - 1
        self.downsample = None if last else Downsampler(config, dim, rngs=rngs)

    def __call__(self, x: jax.Array, *, output_attentions: bool = False,
                 deterministic: bool = True):
        """Returns ``(output, output_before_downsampling, last layer's weights | None)``."""
        weights = None
        for j, layer in enumerate(self.layers):
            # HF returns only the last layer's weights per stage; the others take the fused path.
            want = output_attentions and j == len(self.layers) - 1
            x, weights = layer(x, output_attentions=want, deterministic=deterministic)
        before = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, before, weights


class NatEncoder(nnx.Module):
    """All stages; drop-path rates rise linearly from 0 to ``drop_path_rate`` over all layers."""

    def __init__(self, config: _BaseConfig, *, rngs: nnx.Rngs):
        rates = np.linspace(0.0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = np.cumsum((0,) + tuple(config.depths)).tolist()
        self.levels = nnx.List([
            NatStage(config, i, rates[starts[i]:starts[i + 1]], rngs=rngs)
            for i in range(config.num_stages)
        ])

    def __call__(self, x: jax.Array, *, output_hidden_states: bool = False,
                 output_attentions: bool = False, deterministic: bool = True,
                 before_downsampling: bool = False):
        """Returns ``(last, hidden_states | None, attentions | None)``, channels-last."""
        hidden = [x]
        attentions = []
        for stage in self.levels:
            x, before, weights = stage(x, output_attentions=output_attentions,
                                       deterministic=deterministic)
            hidden.append(before if before_downsampling else x)
            attentions.append(weights)
        return (x, tuple(hidden) if output_hidden_states else None,
                tuple(attentions) if output_attentions else None)


def _check_config(obj, config) -> None:
    if not isinstance(config, obj.config_class):
        raise ValueError(f"{type(obj).__name__} needs a {obj.config_class.__name__}, got "
                         f"{type(config).__name__}")


# ------------------------------------------------------------------ public models


class NatModel(nnx.Module):
    """Bare NAT: embeddings, encoder, final LayerNorm and mean pooling.

    Call: ``model(pixel_values [B,H,W,3], output_hidden_states=False, output_attentions=False,
    deterministic=True) -> ModelOutput`` (see :mod:`nat_jax.outputs` for the layouts).
    ``deterministic=False`` enables dropout / drop path, drawing from the ``rngs`` given at
    construction ("dropout" stream, else "default").
    """

    config_class = NatConfig

    def __init__(self, config: _BaseConfig, *, rngs: nnx.Rngs):
        _check_config(self, config)
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.encoder = NatEncoder(config, rngs=rngs)
        self.layernorm = _layer_norm(config, config.hidden_size, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False,
                 output_attentions: bool = False, deterministic: bool = True) -> ModelOutput:
        x = self.embeddings(pixel_values.astype(self.config.compute_dtype),
                            deterministic=deterministic)
        x, hidden, attentions = self.encoder(
            x, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            deterministic=deterministic)
        x = self.layernorm(x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        return ModelOutput(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden,
            reshaped_hidden_states=None if hidden is None else tuple(map(_nchw, hidden)),
            attentions=attentions)


class NatForImageClassification(nnx.Module):
    """NAT with a linear head on the pooled features; logits are float32 ``[B, num_labels]``."""

    config_class = NatConfig
    base_name = "nat"

    def __init__(self, config: _BaseConfig, *, rngs: nnx.Rngs):
        _check_config(self, config)
        self.config = config
        setattr(self, self.base_name, _BASE_MODELS[type(self)](config, rngs=rngs))
        self.classifier = (_linear(config, config.hidden_size, config.num_labels, rngs=rngs)
                           if config.num_labels > 0 else None)

    @property
    def base_model(self) -> NatModel:
        return getattr(self, self.base_name)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False,
                 output_attentions: bool = False,
                 deterministic: bool = True) -> ImageClassifierOutput:
        out = self.base_model(pixel_values, output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions, deterministic=deterministic)
        pooled = out.pooler_output
        logits = pooled if self.classifier is None else self.classifier(pooled)
        return ImageClassifierOutput(
            logits=logits.astype(jnp.float32), pooler_output=pooled,
            hidden_states=out.hidden_states, reshaped_hidden_states=out.reshaped_hidden_states,
            attentions=out.attentions)


class NatBackbone(nnx.Module):
    """NAT feature extractor: per requested stage (``config.out_features``), the stage output
    before downsampling through its own LayerNorm, NCHW (HF ``NatBackbone``).

    ``channels`` and ``strides`` give each feature map's width and stride w.r.t. the input.
    """

    config_class = NatConfig

    def __init__(self, config: _BaseConfig, *, rngs: nnx.Rngs):
        _check_config(self, config)
        self.config = config
        self.out_features, self.out_indices = config.backbone_stages()
        widths = (config.embed_dim,) + config.stage_dims
        self.num_features = widths
        self.channels = tuple(widths[i] for i in self.out_indices)
        self.strides = tuple(4 * 2 ** max(i - 1, 0) for i in self.out_indices)
        self.embeddings = Embeddings(config, rngs=rngs)
        self.encoder = NatEncoder(config, rngs=rngs)
        self.hidden_states_norms = nnx.Dict({
            name: _layer_norm(config, widths[i], rngs=rngs, eps=_BACKBONE_NORM_EPS)
            for name, i in zip(self.out_features, self.out_indices)
        })

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False,
                 output_attentions: bool = False, deterministic: bool = True) -> BackboneOutput:
        x = self.embeddings(pixel_values.astype(self.config.compute_dtype),
                            deterministic=deterministic)
        _, hidden, attentions = self.encoder(
            x, output_hidden_states=True, output_attentions=output_attentions,
            deterministic=deterministic, before_downsampling=True)
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
    base_name = "dinat"


class DinatBackbone(NatBackbone):
    """DiNAT feature extractor; see :class:`NatBackbone`."""

    config_class = DinatConfig


_BASE_MODELS = {NatForImageClassification: NatModel, DinatForImageClassification: DinatModel}


def build_model(config: _BaseConfig, *, rngs: nnx.Rngs, head: str = "classification"):
    """The model for ``config``: ``head`` is "classification" (default), "base" or "backbone"."""
    from nat_jax.configs import model_class_for
    return model_class_for(config, head)(config, rngs=rngs)


def count_params(model_or_state) -> int:
    """Number of parameters (``nnx.Param`` entries) of a module or an (abstract) state."""
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
