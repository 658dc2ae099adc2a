"""Augmentation and input-pipeline tests: shapes, ranges, label sums, odd and corrupt images."""

import io
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nat_jax.train import augment, input_pipeline
from nat_jax.train.configs import get_config


def _image(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


# ------------------------------------------------------------------ host side

@pytest.mark.parametrize("hw", [(1, 1), (7, 300), (300, 7), (64, 48), (224, 224)])
def test_random_resized_crop_shape_and_range(rng, hw):
    image = _image(rng, *hw)
    for _ in range(5):
        out = augment.random_resized_crop(image, rng, 32)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_random_resized_crop_full_scale_keeps_content(rng):
    # scale 1 and ratio 1 on a square image: the crop is the whole image, resized to itself.
    image = _image(rng, 16, 16)
    out = augment.random_resized_crop(image, rng, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(out, image)


def test_hflip(rng):
    image = _image(rng, 5, 6)
    np.testing.assert_array_equal(augment.hflip(image, rng, 1.0), image[:, ::-1])
    np.testing.assert_array_equal(augment.hflip(image, rng, 0.0), image)


def test_randaugment_spec_and_every_op(rng):
    ra = augment.RandAugment.from_spec("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.num_layers) == (9.0, 0.5, 2)
    assert augment.RandAugment.from_spec("rand-m7-n3").num_layers == 3
    with pytest.raises(ValueError, match="randaugment"):
        augment.RandAugment.from_spec("auto-m9")
    image = _image(rng, 24, 20)
    pil = Image.fromarray(image)
    for name, op in augment.RAND_OPS.items():
        for m in (0.0, 9.0, 10.0):
            out = np.asarray(op(pil, m, rng))
            assert out.shape == image.shape and out.dtype == np.uint8, name
    outs = [ra(image, rng) for _ in range(20)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, image) for o in outs)


def test_center_crop_eval_transform(rng):
    out = augment.center_crop(_image(rng, 300, 400), 224, 0.875)
    assert out.shape == (224, 224, 3)
    # crop_pct 1 on a square image of the right size is the identity.
    image = _image(rng, 32, 32)
    np.testing.assert_array_equal(augment.center_crop(image, 32, 1.0), image)


def test_erasing_box_bounds(rng):
    boxes = np.stack([augment.erasing_box(rng, 32, 1.0) for _ in range(200)])
    top, left, h, w = boxes.T
    assert (h > 0).mean() > 0.9
    assert np.all(top + h <= 32) and np.all(left + w <= 32) and np.all(boxes >= 0)
    assert not augment.erasing_box(rng, 32, 0.0).any()


def test_to_rgb_modes(rng):
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    for array in (gray, gray[..., None], np.dstack([gray] * 3),
                  np.dstack([gray] * 3 + [np.full_like(gray, 255)])):
        out = augment.to_rgb(array)
        assert out.shape == (9, 7, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 1], gray)
    rgb = _image(rng, 9, 7)
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "I;16", "1"):
        pil = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
            Image.fromarray(gray.astype(np.uint16) * 200)
        out = augment.to_rgb(pil)
        assert out.shape == (9, 7, 3) and out.dtype == np.uint8, mode
    with pytest.raises(ValueError, match="dtype"):
        augment.to_rgb(gray.astype(np.float32))


def _encode(array, fmt, mode=None):
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_corrupt_grayscale_cmyk(rng):
    rgb = _image(rng, 12, 10)
    good = {
        "jpeg_rgb": _encode(rgb, "JPEG"),
        "png_gray": _encode(rgb, "PNG", "L"),
        "jpeg_cmyk": _encode(rgb, "JPEG", "CMYK"),
        "png_rgba": _encode(rgb, "PNG", "RGBA"),
        "gif_palette": _encode(rgb, "GIF", "P"),
    }
    for name, data in good.items():
        out = input_pipeline.decode({"image": data, "label": 3})
        assert out["image"].shape == (12, 10, 3) and out["label"] == 3, name
    truncated = good["jpeg_rgb"][: len(good["jpeg_rgb"]) // 3]
    for bad in (b"not an image", b"", truncated):
        with pytest.raises(input_pipeline.UnreadableImageError, match="x.jpg"):
            input_pipeline.decode({"image": bad, "label": 0, "name": "x.jpg"})


def test_image_folder_pipeline_skips_corrupt_images(rng, tmp_path, caplog):
    """A folder with grayscale, CMYK and corrupt files trains without crashing."""
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{i}.jpg").write_bytes(_encode(_image(rng, 20 + i, 30), "JPEG"))
            (d / "gray.png").write_bytes(_encode(_image(rng, 16, 16), "PNG", "L"))
            (d / "cmyk.jpg").write_bytes(_encode(_image(rng, 16, 16), "JPEG", "CMYK"))
            (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
            (d / "notes.txt").write_text("ignored: not an image extension")
    config = get_config("nat_mini")
    config.update(dataset="image_folder", data_dir=str(tmp_path), image_size=16,
                  global_batch_size=4, num_workers=0, num_classes=-1, eval_split="val")
    source = input_pipeline.make_source(config, "train")
    assert source.class_names == ["cat", "dog"] and len(source) == 12
    assert input_pipeline.num_classes_of(source) == 2
    with caplog.at_level(logging.WARNING, logger="nat_jax.train.input_pipeline"):
        it = iter(input_pipeline.train_dataset(config, source))
        batches = [next(it) for _ in range(6)]
        evals = list(input_pipeline.eval_batches(config,
                                                 input_pipeline.make_source(config, "val")))
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8
        assert b["label"].shape == (4,) and set(b["label"]) <= {0, 1}
        assert b["erase"].shape == (4, 4)
    assert sum(int(b["mask"].sum()) for b in evals) == 10  # 12 files, 2 corrupt
    assert any("skipping unreadable image" in r.message for r in caplog.records)


def _image_folder(root, rng, layout: dict[str, list[str]], per_class: int = 2):
    """``root/<split>/<class>/<i>.png`` for each split's class list."""
    for split, classes in layout.items():
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i}.png").write_bytes(_encode(_image(rng, 8, 8), "PNG"))


def test_image_folder_labels_come_from_the_training_split(rng, tmp_path):
    """A validation split lacking a class keeps the training labels; an unknown class is an
    error; an explicit class list in the config fixes the order."""
    _image_folder(tmp_path, rng, {"train": ["cat", "dog", "fish"], "val": ["dog", "fish"],
                                  "test": ["cat", "bird"]})
    config = get_config("nat_mini")
    config.update(dataset="image_folder", data_dir=str(tmp_path), eval_split="val")
    train = input_pipeline.make_source(config, "train")
    val = input_pipeline.make_source(config, "val")
    assert train.class_names == val.class_names == ["cat", "dog", "fish"]
    assert sorted(set(train.labels)) == [0, 1, 2]
    labels = {path.split(os.sep)[-2]: label for path, label in zip(val.paths, val.labels)}
    assert labels == {"dog": 1, "fish": 2}
    with pytest.raises(ValueError, match="bird are not among the 3 training classes"):
        input_pipeline.make_source(config, "test")

    config.class_names = ("fish", "dog", "cat", "bird")
    val = input_pipeline.make_source(config, "val")
    labels = {path.split(os.sep)[-2]: label for path, label in zip(val.paths, val.labels)}
    assert labels == {"dog": 1, "fish": 0}
    test = input_pipeline.make_source(config, "test")
    assert sorted(set(test.labels)) == [2, 3]


def test_unreadable_files_are_skipped_and_warned_once_each(rng, tmp_path, caplog):
    """A broken symlink and a corrupt file: training batches stay full (the next readable image
    takes the place), and over three epochs (decoded in two worker processes) and two eval
    passes (in this process) each bad file is warned about exactly once, counted per file."""
    _image_folder(tmp_path, rng, {"train": ["cat", "dog"], "val": ["cat", "dog"]}, per_class=3)
    (tmp_path / "train" / "cat" / "link.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "val" / "dog" / "link.png").symlink_to(tmp_path / "missing.png")
    config = get_config("nat_mini")
    config.update(dataset="image_folder", data_dir=str(tmp_path), image_size=16,
                  global_batch_size=4, num_workers=2, eval_split="val")
    source = input_pipeline.make_source(config, "train")
    assert len(source) == 8  # 6 readable + 2 bad
    it = iter(input_pipeline.train_dataset(config, source))
    batches = [next(it) for _ in range(6)]  # 24 examples: 3 epochs
    it.close()
    unreadable = input_pipeline.UnreadableFiles()
    with caplog.at_level(logging.WARNING, logger="nat_jax.train.input_pipeline"):
        batches = [unreadable.take(b) for b in batches]
        config.num_workers = 0  # evaluation in this process (worker start-up is slow)
        val = input_pipeline.make_source(config, "val")
        evals = [list(input_pipeline.eval_batches(config, val, unreadable=unreadable))
                 for _ in range(2)]
    for b in batches:
        assert sorted(b) == ["erase", "image", "label"] and b["image"].shape == (4, 16, 16, 3)
    assert [sum(int(b["mask"].sum()) for b in e) for e in evals] == [6, 6]
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    bad = ["train/cat/link.jpg", "train/dog/broken.jpg", "val/dog/link.png"]
    assert sorted(unreadable.files) == sorted(str(tmp_path / b) for b in bad)
    assert len(warnings) == 3, warnings
    for name in bad:
        assert sum(name in w for w in warnings) == 1, (name, warnings)
    assert [w.split("; ")[-1] for w in warnings] == [
        f"{n} unreadable file(s) so far" for n in (1, 2, 3)]
    assert "FileNotFoundError" in unreadable.files[str(tmp_path / bad[0])]


def test_train_dataset_is_deterministic_and_resumable():
    config = get_config("digits")
    config.global_batch_size = 8
    source = input_pipeline.DigitsSource("train", image_size=config.image_size)
    first = iter(input_pipeline.train_dataset(config, source))
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = next(first)
    again = iter(input_pipeline.train_dataset(config, source))
    again.set_state(state)
    got = next(again)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_worker_processes_resume():
    """With grain worker processes the iterator state still resumes exactly."""
    config = get_config("digits")
    config.update(global_batch_size=8, num_workers=2)
    source = input_pipeline.DigitsSource("train", image_size=config.image_size)
    first = iter(input_pipeline.train_dataset(config, source))
    batches = [next(first) for _ in range(3)]
    state = first.get_state()
    expected = next(first)
    first.close()
    again = iter(input_pipeline.train_dataset(config, source))
    again.set_state(state)
    got = next(again)
    again.close()
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])


def test_digits_source():
    train = input_pipeline.DigitsSource("train", image_size=32)
    val = input_pipeline.DigitsSource("validation", image_size=32)
    assert len(train) + len(val) == 1797 and len(val) == 360
    example = train[0]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert sorted(set(val.labels.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="split"):
        input_pipeline.DigitsSource("test")


# ------------------------------------------------------------------ device side

def test_normalize_and_random_erase(rng):
    images = jnp.asarray(_image(rng, 16, 8).reshape(2, 8, 8, 3))
    x = augment.normalize(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.dtype == jnp.float32 and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    boxes = jnp.asarray([[1, 2, 3, 4], [0, 0, 0, 0]], jnp.int32)
    erased = np.asarray(augment.random_erase(x, boxes, jax.random.key(0)))
    inside = np.zeros((2, 8, 8), bool)
    inside[0, 1:4, 2:6] = True
    np.testing.assert_array_equal(erased[~inside], np.asarray(x)[~inside])
    assert not np.allclose(erased[inside], np.asarray(x)[inside])


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets_sum_to_one(rng, mixup, cutmix):
    images = jnp.asarray(rng.normal(size=(6, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 6), jnp.int32)
    for seed in range(8):
        mixed, targets = augment.mixup_cutmix(
            images, labels, jax.random.key(seed), num_classes=10, mixup_alpha=mixup,
            cutmix_alpha=cutmix, label_smoothing=0.1)
        assert mixed.shape == images.shape and targets.shape == (6, 10)
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
        assert float(targets.min()) >= 0.0
        if cutmix > 0 and mixup == 0:
            # every pixel comes from the image itself or its partner (the reversed batch)
            own = np.isclose(mixed, images) | np.isclose(mixed, images[::-1])
            assert own.all()
    if mixup == cutmix == 0:
        np.testing.assert_array_equal(mixed, images)
        np.testing.assert_allclose(targets, augment.smooth_one_hot(labels, 10, 0.1))


def test_cutmix_lambda_matches_pasted_area(rng):
    images = jnp.zeros((2, 16, 16, 1)).at[1].set(1.0)
    labels = jnp.asarray([0, 1])
    for seed in range(10):
        mixed, targets = augment.mixup_cutmix(images, labels, jax.random.key(seed),
                                              num_classes=2, mixup_alpha=0.0, cutmix_alpha=1.0,
                                              label_smoothing=0.0)
        pasted = float(mixed[0].mean())  # fraction of image 0 replaced by image 1
        np.testing.assert_allclose(float(targets[0, 1]), pasted, atol=1e-6)
