"""Model outputs: pytree dataclasses with HuggingFace's field names.

Layouts (JAX convention is channels-last; ``reshaped_*`` and ``feature_maps`` are NCHW as in HF):

- ``last_hidden_state``: ``[B, h, w, C]`` after the final LayerNorm.
- ``pooler_output``: ``[B, C]``, mean over all tokens of ``last_hidden_state``.
- ``hidden_states``: tuple, embeddings output then every stage's output (after its downsampler),
  each ``[B, h_i, w_i, C_i]``; the last is before the final LayerNorm.
- ``reshaped_hidden_states``: the same tensors as ``[B, C_i, h_i, w_i]``.
- ``attentions``: one per stage (its LAST layer, as HF returns), ``[B, heads, H, W, K*K]``
  softmax weights, window flattened row-major; H, W are the padded sizes for small inputs.
- ``logits``: ``[B, num_labels]`` (float32 also for bf16 compute).
- ``feature_maps`` (backbones): per requested stage, the stage output before downsampling, put
  through that stage's LayerNorm, ``[B, C_i, h_i, w_i]``.
"""

from __future__ import annotations

import jax
from flax import struct

__all__ = ["BackboneOutput", "ImageClassifierOutput", "ModelOutput"]

Tuple = tuple[jax.Array, ...] | None


@struct.dataclass
class ModelOutput:
    """Output of ``NatModel`` / ``DinatModel``."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: Tuple = None
    reshaped_hidden_states: Tuple = None
    attentions: Tuple = None


@struct.dataclass
class ImageClassifierOutput:
    """Output of ``NatForImageClassification`` / ``DinatForImageClassification``."""

    logits: jax.Array
    pooler_output: jax.Array | None = None
    hidden_states: Tuple = None
    reshaped_hidden_states: Tuple = None
    attentions: Tuple = None


@struct.dataclass
class BackboneOutput:
    """Output of ``NatBackbone`` / ``DinatBackbone``."""

    feature_maps: tuple[jax.Array, ...]
    hidden_states: Tuple = None
    attentions: Tuple = None
