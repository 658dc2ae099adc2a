"""Augmentation: per-image on the host (numpy + PIL, in grain workers), per-batch on device.

Host side (uint8 ``[H, W, 3]`` in, uint8 ``[S, S, 3]`` out, one ``np.random.Generator`` per
image so every image is reproducible from (seed, index)):
  :func:`to_rgb` (any PIL mode or uint8 array -> RGB; :func:`nat_jax.preprocess.to_rgb`, the
  same conversion inference uses), :func:`random_resized_crop`,
  :func:`hflip`, :class:`RandAugment` (timm's ``rand-m9-mstd0.5-inc1``), :func:`erasing_box`
  (only draws the box; the fill happens on device), :func:`center_crop` for eval.

Device side (inside the jitted train step): :func:`normalize`, :func:`random_erase` (pixel mode,
normal noise in normalized space as in timm), :func:`mixup_cutmix` with label smoothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from nat_jax.preprocess import to_rgb  # noqa: F401  (part of this module's host-side API)

_FILL = (124, 116, 104)  # timm: ImageNet mean in uint8, fill for rotated/sheared borders
_RANDOM_INTERP = (Image.BILINEAR, Image.BICUBIC)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision/timm RandomResizedCrop with random bilinear/bicubic interpolation.

    image: uint8 ``[H, W, 3]`` -> uint8 ``[size, size, 3]``.
    """
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # fall back to a center crop with the ratio clamped into range
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    crop = Image.fromarray(image[top:top + h, left:left + w])
    interp = _RANDOM_INTERP[int(rng.integers(len(_RANDOM_INTERP)))]
    return np.asarray(crop.resize((size, size), interp), dtype=np.uint8)


def hflip(image: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """Mirrors ``[H, W, C]`` left-right with probability ``prob``."""
    if prob > 0 and rng.random() < prob:
        return np.ascontiguousarray(image[:, ::-1])
    return image


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize so the shorter side is ``size`` (uint8 ``[H, W, 3]``)."""
    height, width = image.shape[:2]
    if min(height, width) == size:
        return image
    scale = size / min(height, width)
    new = (max(size, int(round(width * scale))), max(size, int(round(height * scale))))
    return np.asarray(Image.fromarray(image).resize(new, Image.BICUBIC), dtype=np.uint8)


def center_crop(image: np.ndarray, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """timm eval transform: resize shorter side to ``int(size / crop_pct)``, center crop ``size``.

    image: uint8 ``[H, W, 3]`` -> uint8 ``[size, size, 3]``.
    """
    image = resize_shorter(image, int(math.floor(size / crop_pct)))
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def erasing_box(rng: np.random.Generator, size: int, prob: float,
                area: tuple[float, float] = (0.02, 1 / 3),
                log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))
                ) -> np.ndarray:
    """timm RandomErasing's box for a ``size`` x ``size`` image: int32 ``[top, left, h, w]``.

    ``h == w == 0`` means no erasing (probability ``1 - prob``, or no box fitted in 10 tries).
    """
    if prob <= 0 or rng.random() >= prob:
        return np.zeros(4, np.int32)
    for _ in range(10):
        target = size * size * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < size and 0 < w < size:
            top = int(rng.integers(0, size - h + 1))
            left = int(rng.integers(0, size - w + 1))
            return np.array([top, left, h, w], np.int32)
    return np.zeros(4, np.int32)


# RandAugment ops. Each takes (PIL image, magnitude in [0, 10], rng) and returns a PIL image.
# Magnitude mappings are timm's "increasing" variants (inc1): larger magnitude = stronger.

def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix, rng) -> Image.Image:
    interp = _RANDOM_INTERP[int(rng.integers(len(_RANDOM_INTERP)))]
    return img.transform(img.size, Image.AFFINE, matrix, resample=interp, fillcolor=_FILL)


def _rotate(img, m, rng):
    interp = _RANDOM_INTERP[int(rng.integers(len(_RANDOM_INTERP)))]
    return img.rotate(_signed(m / 10 * 30.0, rng), resample=interp, fillcolor=_FILL)


def _shear_x(img, m, rng):
    return _affine(img, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0), rng)


def _shear_y(img, m, rng):
    return _affine(img, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0), rng)


def _translate_x(img, m, rng):
    return _affine(img, (1, 0, _signed(m / 10 * 0.45, rng) * img.size[0], 0, 1, 0), rng)


def _translate_y(img, m, rng):
    return _affine(img, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * img.size[1]), rng)


def _posterize(img, m, rng):
    return ImageOps.posterize(img, max(1, 4 - int(m / 10 * 4)))


def _solarize(img, m, rng):
    return ImageOps.solarize(img, 256 - int(m / 10 * 256))


def _solarize_add(img, m, rng):
    add = int(m / 10 * 110)
    array = np.asarray(img, dtype=np.int16)
    array = np.where(array < 128, np.minimum(array + add, 255), array)
    return Image.fromarray(array.astype(np.uint8))


def _enhance(kind):
    def op(img, m, rng):
        return kind(img).enhance(1.0 + _signed(m / 10 * 0.9, rng))
    return op


RAND_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


@dataclass(frozen=True)
class RandAugment:
    """timm RandAugment from a spec such as ``"rand-m9-mstd0.5-inc1"``.

    ``num_layers`` ops drawn uniformly per image, each applied with probability ``prob``;
    magnitude ``m`` jittered by a normal of std ``mstd`` per op and clipped to [0, 10].
    Only the increasing op set (``inc1``) is implemented, which is what the recipe uses.
    """

    magnitude: float = 9.0
    magnitude_std: float = 0.5
    num_layers: int = 2
    prob: float = 0.5

    @classmethod
    def from_spec(cls, spec: str) -> "RandAugment":
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"randaugment {spec=!r} must start with 'rand-'")
        kwargs = {}
        for part in parts[1:]:
            key, value = re.match(r"([a-z]+)([\d.]+)$", part).groups()
            if key == "m":
                kwargs["magnitude"] = float(value)
            elif key == "mstd":
                kwargs["magnitude_std"] = float(value)
            elif key == "n":
                kwargs["num_layers"] = int(value)
            elif key == "p":
                kwargs["prob"] = float(value)
            elif key == "inc":
                if value != "1":
                    raise ValueError(f"randaugment {spec=!r}: only inc1 is supported")
            else:
                raise ValueError(f"randaugment {spec=!r}: unknown part {part!r}")
        return cls(**kwargs)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 ``[H, W, 3]`` -> uint8 ``[H, W, 3]``."""
        names = list(RAND_OPS)
        img = Image.fromarray(image)
        for index in rng.choice(len(names), self.num_layers, replace=True):
            if rng.random() >= self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = float(np.clip(rng.normal(m, self.magnitude_std), 0.0, 10.0))
            img = RAND_OPS[names[index]](img, m, rng)
        return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------

def normalize(images_bhwc: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> ``(x / 255 - mean) / std`` in ``dtype``."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return ((images_bhwc.astype(jnp.float32) - mean) / std).astype(dtype)


def random_erase(images_bhwc: jax.Array, boxes_b4: jax.Array, key: jax.Array) -> jax.Array:
    """Fills each image's box ``[top, left, h, w]`` with standard-normal noise (timm pixel mode).

    Applied after :func:`normalize`, so the noise lives in normalized space. ``h == 0`` = no-op.
    """
    _, height, width, _ = images_bhwc.shape
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top, left, h, w = (boxes_b4[:, i, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    noise = jax.random.normal(key, images_bhwc.shape, images_bhwc.dtype)
    return jnp.where(inside[..., None], noise, images_bhwc)


def smooth_one_hot(labels_b: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels -> float32 ``[B, num_classes]`` targets, each row summing to 1."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels_b, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def mixup_cutmix(images_bhwc: jax.Array, labels_b: jax.Array, key: jax.Array, *,
                 num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """timm Mixup in batch mode: one lambda per batch, the partner is the reversed batch.

    With probability ``mix_prob`` the batch is mixed; then CutMix (probability ``switch_prob``
    when both alphas are positive) pastes one box from the partner and lambda becomes the kept
    area fraction, or Mixup blends the whole images. Returns the images and float32 soft targets
    ``[B, num_classes]`` (rows sum to 1). With both alphas 0 only label smoothing applies.
    """
    targets = smooth_one_hot(labels_b, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images_bhwc, targets
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
    _, height, width, _ = images_bhwc.shape
    partner_images = images_bhwc[::-1]
    partner_targets = targets[::-1]

    if cutmix_alpha > 0 and mixup_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))

    # CutMix box with area (1 - lam_cut), clipped at the borders; lambda corrected to the area.
    cut_h = (height * jnp.sqrt(1.0 - lam_cut)).astype(jnp.int32)
    cut_w = (width * jnp.sqrt(1.0 - lam_cut)).astype(jnp.int32)
    cy = jax.random.randint(k_box, (), 0, height)
    cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)

    apply = jax.random.uniform(k_apply) < mix_prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
    cut_images = jnp.where(box[None, :, :, None], partner_images, images_bhwc)
    mix_images = (lam * images_bhwc.astype(jnp.float32)
                  + (1.0 - lam) * partner_images.astype(jnp.float32)).astype(images_bhwc.dtype)
    mixed = jnp.where(apply & use_cutmix, cut_images, mix_images)
    mixed = jnp.where(apply, mixed, images_bhwc)
    return mixed, lam * targets + (1.0 - lam) * partner_targets
