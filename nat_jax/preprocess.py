"""The eval transform (timm's, used for the published accuracies), labels, top-k and predict.

One implementation, used by inference (:func:`preprocess`, :func:`predict`) and by training's
evaluation (:mod:`nat_jax.train.input_pipeline`), so training's reported top-1 and ``predict``
see the same pixels:

* :func:`center_crop`: resize the shorter side to ``floor(image_size / crop_pct)`` (bicubic;
  the longer side ``int(size * long / short)``, truncated, as torchvision's ``Resize(int)``),
  then crop the centre ``image_size`` square (offsets ``int(round((side - image_size) / 2))``,
  as torchvision's ``CenterCrop``). uint8 in, uint8 out.
* :func:`normalize`: ``(x / 255 - mean) / std`` on a uint8 batch (host or device).

:class:`EvalTransform` bundles the settings of one published checkpoint (image size, crop,
mean/std); models carry theirs as ``model.eval_transform``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "center_crop", "imagenet_labels",
           "label_names", "normalize", "predict", "preprocess", "to_rgb", "top_k"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (WordNet synonyms, as in HF)."""
    text = resources.files("nat_jax").joinpath("data/imagenet_labels.txt").read_text("utf-8")
    labels = tuple(line for line in text.splitlines() if line)
    assert len(labels) == 1000, len(labels)
    return labels


def label_names(config) -> list[str]:
    """Class names of a model config: ``id2label`` if set, the ImageNet-1k names for 1000
    classes (every published checkpoint), else ``LABEL_i`` (HF's default names)."""
    if config.id2label is not None:
        return [config.id2label[i] for i in range(config.num_labels)]
    if config.num_labels == 1000:
        return list(imagenet_labels())
    return [f"LABEL_{i}" for i in range(config.num_labels)]


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


def center_crop(image: np.ndarray, image_size: int, crop_pct: float = 0.875) -> np.ndarray:
    """timm's eval resize + centre crop: uint8 ``[H, W, 3]`` -> uint8 ``[S, S, 3]``, S =
    ``image_size``.

    The shorter side becomes ``floor(image_size / crop_pct)`` (bicubic), the longer side
    ``int(scale_size * long / short)``; the crop starts at ``int(round((side - S) / 2))``.
    """
    from PIL import Image
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    if 0 in image.shape:
        raise ValueError(f"image of shape {image.shape} is empty")
    scale_size = math.floor(image_size / crop_pct)
    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = scale_size, int(scale_size * height / width)
    else:
        new_w, new_h = int(scale_size * width / height), scale_size
    pil = Image.fromarray(image)
    if (new_w, new_h) != (width, height):  # torchvision returns an image of that size as is
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return np.asarray(pil.crop((left, top, left + image_size, top + image_size)), np.uint8)


def normalize(images_bhwc, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype=jnp.float32) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> ``(x / 255 - mean) / std`` in ``dtype`` (jit-friendly)."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((jnp.asarray(images_bhwc).astype(jnp.float32) - mean) / std).astype(dtype)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Eval preprocessing of one checkpoint: :func:`center_crop` to ``image_size`` with
    ``crop_pct``, then :func:`normalize` with ``mean`` / ``std``. Frozen and hashable (models
    keep it as static data)."""

    image_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size} must be >= 1")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct={self.crop_pct} must be in (0, 1]")

    def crop(self, image) -> np.ndarray:
        """One image (anything :func:`to_rgb` takes) -> uint8 ``[S, S, 3]``."""
        return center_crop(to_rgb(image), self.image_size, self.crop_pct)

    def __call__(self, images) -> np.ndarray:
        """Images (see :func:`preprocess`) -> float32 ``[B, S, S, 3]``."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images to preprocess")
        batch = np.stack([self.crop(image) for image in images])
        return np.asarray(normalize(batch, self.mean, self.std))


def preprocess(images, image_size: int = 224, crop_pct: float = 0.875) -> np.ndarray:
    """timm eval transform for one image or a batch (ImageNet mean/std).

    Args:
      images: a PIL image (any mode, see :func:`to_rgb`), a uint8 array ``[H, W(, 1|3|4)]``, a
        uint8 batch ``[B, H, W, 3]``, or a non-empty list of those single images.
      image_size: output side (224; 384 for the large fine-tunes).
      crop_pct: resize the shorter side to ``floor(image_size / crop_pct)`` before the center
        crop (0.875 at 224; 1.0 for the 384 models).

    Returns:
      float32 ``[B, image_size, image_size, 3]`` normalized with the ImageNet mean/std.
    """
    return EvalTransform(image_size, crop_pct)(images)


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

    ``images`` as for :func:`preprocess` (transformed with ``model.eval_transform``), or an
    already preprocessed float ``[B, H, W, 3]`` batch. The forward pass is jit-compiled once per
    model structure and input shape.
    """
    if k < 1:  # checked before the forward pass
        raise ValueError(f"k={k} must be >= 1")
    if isinstance(images, (np.ndarray, jax.Array)) and images.ndim == 4 and \
            jnp.issubdtype(images.dtype, jnp.floating):
        pixels = images
    else:
        pixels = model.eval_transform(images)
    return top_k(_logits(model, jnp.asarray(pixels)), k, label_names(model.config))
