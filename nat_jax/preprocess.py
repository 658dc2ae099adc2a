"""Eval preprocessing (timm's transform, used for the published accuracies), labels, top-k.

``preprocess(images)``: resize the shorter side to ``floor(image_size / crop_pct)`` (bicubic,
256 for 224), center crop ``image_size``, scale to [0, 1], normalize with the ImageNet mean/std.
Returns NHWC float32, ready for the models.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "imagenet_labels", "predict", "preprocess", "to_rgb",
           "top_k"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (WordNet synonyms, as in HF)."""
    text = resources.files("nat_jax").joinpath("data/imagenet_labels.txt").read_text("utf-8")
    labels = tuple(line for line in text.splitlines() if line)
    assert len(labels) == 1000, len(labels)
    return labels


def to_rgb(image) -> np.ndarray:
    """Any image -> uint8 ``[H, W, 3]``: the one conversion of inference and training.

    Accepts a PIL image of any mode (L, LA, P, RGBA, CMYK, ...; 16-bit, 32-bit integer and
    float images are scaled so their peak is 255, clipped to [0, 255]) or a uint8 array
    ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (a 4th channel is alpha, dropped).
    """
    from PIL import Image
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # PIL's own RGB conversion clips these at 255 (a 16-bit image turns white).
            array = np.asarray(image, dtype=np.float32)
            peak = max(float(array.max()), 1.0) if array.size else 1.0
            array = np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8)
            image = Image.fromarray(array)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image dtype={array.dtype} must be uint8 (0..255); PIL images of "
                         "any mode are converted")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image shape={array.shape} must be [H, W] or [H, W, 1|3|4]")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[:, :, :3])


def _to_pil(image):
    from PIL import Image
    rgb = to_rgb(image)
    if 0 in rgb.shape:
        raise ValueError(f"image of shape {rgb.shape} is empty")
    return Image.fromarray(rgb)


def _resize_crop(image, image_size: int, crop_pct: float) -> np.ndarray:
    from PIL import Image
    scale_size = math.floor(image_size / crop_pct)
    w, h = image.size
    # torchvision Resize(int): shorter side -> scale_size, longer side truncated proportionally.
    if w <= h:
        new_w, new_h = scale_size, int(scale_size * h / w)
    else:
        new_w, new_h = int(scale_size * w / h), scale_size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, np.float32) / 255.0


def preprocess(images, image_size: int = 224, crop_pct: float = 0.875) -> np.ndarray:
    """timm eval transform for one image or a batch.

    Args:
      images: a PIL image (any mode, see :func:`to_rgb`), a uint8 array ``[H, W(, 1|3|4)]``, a
        uint8 batch ``[B, H, W, 3]``, or a non-empty list of those single images.
      image_size: output side (224; 384 for the large fine-tunes).
      crop_pct: resize the shorter side to ``floor(image_size / crop_pct)`` before the center
        crop (0.875 at 224; 1.0 for the 384 models).

    Returns:
      float32 ``[B, image_size, image_size, 3]`` normalized with the ImageNet mean/std.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images to preprocess")
    batch = np.stack([_resize_crop(_to_pil(im), image_size, crop_pct) for im in images])
    return (batch - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def top_k(logits, k: int = 5, labels: Sequence[str] | None = None
          ) -> list[list[tuple[int, str, float]]]:
    """Per row of ``logits [B, num_classes]``: the ``k`` best ``(index, label, probability)``.

    ``k >= 1``; a ``k`` above the number of classes gives all of them.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    if probs.ndim == 1:
        probs = probs[None]
    if labels is None:
        labels = imagenet_labels() if probs.shape[-1] == 1000 else None
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(i), labels[i] if labels is not None else f"LABEL_{i}", float(p[i]))
             for i in row] for row, p in zip(order, probs)]


@nnx.jit
def _logits(model, pixel_values):
    return model(pixel_values).logits


def predict(model, images, k: int = 5) -> list[list[tuple[int, str, float]]]:
    """Top-``k`` ``(index, label, probability)`` per image with a classifier model.

    ``images`` as for :func:`preprocess`, or an already preprocessed float ``[B, H, W, 3]``
    batch. The forward pass is jit-compiled once per model structure and input shape.
    """
    if k < 1:  # checked before the forward pass
        raise ValueError(f"k={k} must be >= 1")
    config = model.config
    if isinstance(images, (np.ndarray, jax.Array)) and images.ndim == 4 and \
            jnp.issubdtype(images.dtype, jnp.floating):
        pixels = images
    else:
        pixels = preprocess(images, config.image_size, config.crop_pct)
    return top_k(_logits(model, jnp.asarray(pixels)), k, config.label_names())
