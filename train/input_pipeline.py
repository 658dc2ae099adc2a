"""Input pipeline: random-access sources -> grain (worker processes) -> per-host numpy batches.

Sources (all random access, records ``{"image": ..., "label": int}``, or ``{"file": path,
"label": int}`` for image folders):
  * ``tfds.data_source(name, split=..., data_dir=...)``: prepared ArrayRecord files (ImageNet:
    ``imagenet2012``); decoded by tfds, TensorFlow is not imported.
  * :class:`ImageFolderSource`: ``root/<split>/<class>/*.jpg``. The class list comes from the
    training split's folders (or ``config.class_names``) and every split is mapped through it,
    so a validation split that lacks a class keeps the training labels.
  * :class:`DigitsSource`: scikit-learn's bundled 8x8 digits, upsampled (the demo).

Training: every host describes the same global stream (shuffled, repeated, decoded and augmented
per global index), whose step ``s`` is examples ``[s * B, (s + 1) * B)``; host ``i`` of ``n``
computes only rows ``[i * B / n, (i + 1) * B / n)`` of each global batch, and the trainer
assembles the global batch with ``jax.make_array_from_process_local_data``. So the global batch
of every step is the same whatever the number of hosts. Train batches are uint8 images
``[b, S, S, 3]``, int32 labels ``[b]`` and int32 erasing boxes ``[b, 4]``; normalization, erasing
and mixup run on device. Evaluation: host ``i`` reads ``[i::n]`` of the split (the metrics are
sums, so how the split is divided does not matter). Grayscale, palette, alpha and CMYK images are
converted to RGB.

Unreadable images (corrupt, truncated, broken links) are skipped: in training the next readable
record of the stream takes the place of an unreadable one (a function of the global index only,
so independent of the host count), in evaluation it is dropped. Batches carry the unreadable
files' names to the consuming process, where :class:`UnreadableFiles` warns once per file
(decoding runs in grain worker processes, which would each warn again).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from nat_jax.train import augment
from nat_jax.train.errors import UserInputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

def image_folder_classes(root: str, split: str) -> list[str]:
    """Sorted class-folder names of ``root/<split>``."""
    split_dir = os.path.join(os.path.expanduser(root), split)
    if not os.path.isdir(split_dir):
        raise UserInputError(f"image folder split={split!r}: {split_dir} is not a directory")
    names = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not names:
        raise UserInputError(f"image folder {split_dir} has no class sub-folders")
    return names


class ImageFolderSource:
    """``root/<split>/<class_name>/<image>`` as a grain random-access source.

    ``class_names`` fixes the label of every class (its index in the list; default: this split's
    own sorted folders). Pass the training split's list for every split, so a split that lacks
    a class still labels the others as training did; a folder not in the list is an error.
    Records hold the file path and the class index; the file is read and decoded later, in the
    workers (:func:`decode`).
    """

    def __init__(self, root: str, split: str, class_names: Sequence[str] | None = None):
        split_dir = os.path.join(os.path.expanduser(root), split)
        folders = image_folder_classes(root, split)
        self.class_names = list(folders if class_names is None else class_names)
        if len(set(self.class_names)) != len(self.class_names):
            raise UserInputError(f"class_names={self.class_names} has duplicates")
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise UserInputError(f"image folder {split_dir}: class folder(s) {', '.join(unknown)} "
                             f"are not among the {len(self.class_names)} training classes "
                             f"({', '.join(self.class_names[:10])}"
                             f"{', ...' if len(self.class_names) > 10 else ''})")
        self.paths: list[str] = []
        self.labels: list[int] = []
        for name in folders:
            class_dir = os.path.join(split_dir, name)
            label = self.class_names.index(name)
            for file in sorted(os.listdir(class_dir)):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    self.paths.append(os.path.join(class_dir, file))
                    self.labels.append(label)
        if not self.paths:
            raise UserInputError(f"image folder {split_dir} has no images ({IMAGE_EXTENSIONS})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Only the path: reading happens in decode(), where an unreadable file is skipped.
        return {"file": self.paths[index], "label": self.labels[index]}


class DigitsSource:
    """scikit-learn's 1797 handwritten digits (8x8, 17 gray levels) as uint8 RGB images.

    A fixed stratified 80/20 split gives ``train`` (1437) and ``validation`` (360). Images are
    upsampled with bilinear interpolation to ``image_size`` x ``image_size``.
    """

    def __init__(self, split: str, image_size: int = 32):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "validation"):
            raise UserInputError(f"digits split={split!r} must be 'train' or 'validation'")
        digits = load_digits()
        indices = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(indices, test_size=0.2, random_state=0,
                                              stratify=digits.target)
        chosen = np.sort(train_idx if split == "train" else val_idx)
        small = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = np.stack([
            np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
            for im in small])[..., None].repeat(3, axis=-1)
        self.labels = digits.target[chosen].astype(np.int32)
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}


def make_source(config, split: str):
    """The random-access source named by ``config.dataset`` for ``split``."""
    if config.dataset == "digits":
        return DigitsSource(split, image_size=config.image_size)
    if config.dataset == "image_folder":
        if not config.data_dir:
            raise UserInputError("dataset='image_folder' needs config.data_dir (the folder root)")
        classes = list(config.class_names) or image_folder_classes(config.data_dir,
                                                                   config.train_split)
        return ImageFolderSource(config.data_dir, split, classes)
    import tensorflow_datasets as tfds  # lazy: heavy import, only for tfds datasets

    return tfds.data_source(config.dataset, split=split, data_dir=config.data_dir)


def num_classes_of(source) -> int | None:
    """Number of classes a source knows about (None when it does not say)."""
    names = getattr(source, "class_names", None)
    if names is not None:
        return len(names)
    info = getattr(source, "dataset_info", None)
    try:
        return int(info.features["label"].num_classes)
    except (AttributeError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Per-record transforms (module-level classes so grain can pickle them into worker processes)
# ---------------------------------------------------------------------------------------------

class UnreadableImageError(ValueError):
    """An image that cannot be read or decoded (the pipeline skips it)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"unreadable image {name} ({reason})")
        self.name, self.reason = name, reason

    @property
    def entry(self) -> str:
        """``name<TAB>reason``: how batches carry it to :class:`UnreadableFiles`."""
        return f"{self.name}\t{self.reason}"


def decode(record: dict[str, Any]) -> dict[str, Any]:
    """Raw record -> ``{"image": uint8 [H, W, 3], "label": int}``.

    ``record`` holds ``image`` (encoded bytes or a decoded array) or ``file`` (a path to read).
    Raises :class:`UnreadableImageError` for anything that cannot be read or decoded.
    """
    name = record.get("file", record.get("name", "?"))
    try:
        image = record["image"] if "file" not in record else _read_file(record["file"])
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as pil:
                pil.load()
                image = augment.to_rgb(pil)
        else:
            image = augment.to_rgb(image)
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"empty image of shape {image.shape}")
    except Exception as e:  # noqa: BLE001 - any read/decode failure means "skip this image"
        raise UnreadableImageError(str(name), f"{type(e).__name__}: {e}") from None
    return {"image": image, "label": int(record["label"])}


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class UnreadableFiles:
    """Warns once per unreadable file and counts distinct files, in the consuming process.

    Decoding runs in grain worker processes, which cannot share what they have already
    reported; so the batches carry the names (``unreadable``) and this object, in the process
    that takes the batches, warns the first time it sees each file (not every epoch, and not
    once per worker).
    """

    def __init__(self):
        self.files: dict[str, str] = {}  # name -> reason

    def report(self, entries: str) -> None:
        """Notes ``name<TAB>reason`` lines (one per unreadable file)."""
        for entry in entries.splitlines():
            name, _, reason = entry.partition("\t")
            if name in self.files:
                continue
            self.files[name] = reason
            log.warning("skipping unreadable image %s (%s); %d unreadable file(s) so far",
                        name, reason, len(self.files))

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Removes ``batch["unreadable"]`` (if any) and reports its entries; returns ``batch``."""
        for entries in np.ravel(batch.pop("unreadable", ())):
            if entries:
                self.report(str(entries))
        return batch


class ReadableRecords(grain.MapDataset):
    """Decoded records of ``parent``; an unreadable record is replaced by the next readable one.

    The replacement depends only on the index (the next indices of the same stream), so every
    host computes the same element for the same global index. ``example["unreadable"]`` lists
    the skipped files (``name<TAB>reason`` lines; empty if none).
    """

    MAX_CONSECUTIVE = 100  # more unreadable records in a row than this means a broken dataset

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "ReadableRecords"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        skipped = []
        for i in range(index, min(index + self.MAX_CONSECUTIVE, len(self._parent))):
            try:
                example = decode(self._parent[i])
            except UnreadableImageError as e:
                skipped.append(e.entry)
                continue
            example["unreadable"] = "\n".join(skipped)
            return example
        raise ValueError(f"{len(skipped)} unreadable images in a row from index {index}; "
                         f"the first: {skipped[0] if skipped else '?'}")


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop -> flip -> RandAugment, and an erasing box (filled on device)."""

    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    randaugment: str
    erasing: float

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = augment.random_resized_crop(example["image"], rng, self.image_size,
                                            self.crop_scale, self.crop_ratio)
        image = augment.hflip(image, rng, self.hflip)
        if self.randaugment:
            image = augment.RandAugment.from_spec(self.randaugment)(image, rng)
        return {"image": image, "label": np.int32(example["label"]),
                "erase": augment.erasing_box(rng, self.image_size, self.erasing),
                "unreadable": example.get("unreadable", "")}


@dataclass(frozen=True)
class EvalTransform:
    """Resize shorter side to ``image_size / crop_pct`` (bicubic), center crop ``image_size``."""

    image_size: int
    crop_pct: float

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        return {"image": augment.center_crop(example["image"], self.image_size, self.crop_pct),
                "label": np.int32(example["label"])}


@dataclass(frozen=True)
class _DecodeForEval:
    """Record -> eval example, or ``{"unreadable": entry}`` for a file that cannot be read."""

    transform: EvalTransform

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.transform(decode(record))
        except UnreadableImageError as e:
            return {"unreadable": e.entry}


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

def _in_worker_processes(ds: grain.IterDataset, config) -> grain.IterDataset:
    """Runs everything upstream of ``ds`` in ``config.num_workers`` grain worker processes."""
    from absl import flags

    # grain reads absl flags when it starts workers; without absl.app nobody parsed them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.prefetch_buffer))


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"{global_batch_size=} must be divisible by the number of hosts "
                         f"({process_count})")
    return global_batch_size // process_count


def train_dataset(config, source, *, process_index: int = 0, process_count: int = 1
                  ) -> grain.IterDataset:
    """Infinite, shuffled (reshuffled every epoch), augmented batches of this host's rows.

    Every host describes the same global stream; host ``process_index`` of ``process_count``
    yields rows ``[i * b, (i + 1) * b)`` (``b = global_batch_size / process_count``) of each
    global batch, so the global batch of a step does not depend on the number of hosts.
    Deterministic given ``config.seed``: the same seed gives the same batches, and the
    iterator's state (``get_state``/``set_state``, saved in checkpoints) resumes exactly.
    Batches carry ``unreadable`` (see :class:`UnreadableFiles`).
    """
    aug = config.aug
    transform = TrainTransform(
        image_size=config.image_size, crop_scale=tuple(aug.crop_scale),
        crop_ratio=tuple(aug.crop_ratio), hflip=aug.hflip, randaugment=aug.randaugment,
        erasing=aug.random_erasing)
    batch = per_host_batch_size(config.global_batch_size, process_count)
    stream = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat(None)
    # Batch j of size b is global rows [j*b, (j+1)*b); taking every process_count-th batch from
    # process_index on gives this host its block of each global batch (computing only it).
    ds = (ReadableRecords(stream)
          .random_map(transform, seed=config.seed + 1)   # seeded by the global index
          .batch(batch, drop_remainder=True)[process_index::process_count]
          .to_iter_dataset())
    if config.num_workers > 0:
        ds = _in_worker_processes(ds, config)
    return ds


def eval_batches(config, source, *, process_index: int = 0, process_count: int = 1,
                 unreadable: UnreadableFiles | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``source``: padded per-host batches with a ``mask`` (1 = real example).

    Every host yields the same number of batches (padding with empty ones), as the sharded
    eval step needs. Unreadable images are dropped and reported to ``unreadable`` (a fresh
    :class:`UnreadableFiles` if None), which warns once per file.
    """
    unreadable = UnreadableFiles() if unreadable is None else unreadable
    batch = per_host_batch_size(config.global_batch_size, process_count)
    per_host = -(-len(source) // process_count)
    num_batches = -(-per_host // batch)
    transform = EvalTransform(config.image_size, config.aug.eval_crop_pct)
    ds = (grain.MapDataset.source(source)[process_index::process_count]
          .map(_DecodeForEval(transform))
          .to_iter_dataset())
    if config.num_workers > 0:
        ds = _in_worker_processes(ds, config)
    it = iter(ds)
    shape = (config.image_size, config.image_size, 3)
    for _ in range(num_batches):
        images = np.zeros((batch, *shape), np.uint8)
        labels = np.zeros((batch,), np.int32)
        mask = np.zeros((batch,), np.bool_)
        i = 0
        while i < batch:
            example = next(it, None)
            if example is None:
                break
            if "unreadable" in example:
                unreadable.report(example["unreadable"])
                continue
            images[i], labels[i], mask[i] = example["image"], example["label"], True
            i += 1
        yield {"image": images, "label": labels, "mask": mask}
