"""The FLOP count of a NAT/DiNAT model, from its configuration alone.

Convention (NATTEN's and the usual vision-model one): a multiply-add is 2 FLOPs; counted are the
convolutions and matmuls (patch embedding, qkv, attention output projection, MLP, downsamplers,
classifier) and neighborhood attention by NATTEN's formula, ``4 * tokens * prod(K) * dim`` per
layer (``QK^T`` plus ``AV``); normalizations, activations, softmax and biases are not. A layer
whose map is smaller than ``kernel_size * dilation`` attends on the zero-padded map, as the model
does (HF's rule), and its qkv, attention and projection are counted at that size.

A training step counts the forward's dense FLOPs 3x (backward = 2x forward) and its NA FLOPs
3.5x (NATTEN's convention: backward = 2.5x forward).
"""

from __future__ import annotations

from nat_jax.kernels import na_flops


def _conv3x3_s2(size: int) -> int:
    """Output size of the models' 3x3, stride-2, padding-1 convolutions."""
    return (size - 1) // 2 + 1


def model_flops(config, batch: int = 1, image_size: int = 224) -> dict[str, int]:
    """FLOPs of ``config``'s classification model on ``batch`` images of ``image_size`` pixels
    square.

    Returns ``{"dense", "na", "forward", "train_step"}``: the forward's convolution/matmul and
    NA parts, their sum, and a training step's total (``3 * dense + 3.5 * na``).
    """
    size = image_size
    c = config.embed_dim
    half = _conv3x3_s2(size)
    x = _conv3x3_s2(half)
    dense = 2 * 9 * config.num_channels * (c // 2) * half * half + 2 * 9 * (c // 2) * c * x * x
    na = 0
    k = config.kernel_size
    for i, (dim, heads) in enumerate(zip(config.stage_dims, config.num_heads)):
        hidden = int(dim * config.mlp_ratio)
        for dilation in config.layer_dilations[i]:
            side = max(x, k * dilation)
            dense += 2 * side * side * dim * 4 * dim  # qkv (3 dim) + output projection (dim)
            na += na_flops(1, heads, (side, side), (k, k), dim // heads)
            dense += 2 * x * x * dim * hidden * 2  # MLP
        if i < config.num_stages - 1:
            x = _conv3x3_s2(x)
            dense += 2 * 9 * dim * 2 * dim * x * x  # downsampler
    if config.num_labels > 0:
        dense += 2 * config.hidden_size * config.num_labels
    dense, na = batch * dense, batch * na
    return {"dense": dense, "na": na, "forward": dense + na,
            "train_step": 3 * dense + int(3.5 * na)}
