"""Training loop tests on 8 virtual CPU devices: configs, optimizer, sharding, mock ImageNet.

The resume / preemption tests live in test_train_resume.py.
"""

import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
import numpy as np
import pytest

import nat_jax
from nat_jax.train import configs, sharding, trainer
from nat_jax.train.configs import get_config
from nat_jax.train.errors import UserInputError

import tensorflow_datasets as tfds  # noqa: E402  (train extra: fail, never skip)


def tiny_config(name: str = "nat_mini", **updates) -> ml_collections.ConfigDict:
    """A real config with its model shrunk to two 1-layer stages and a 4-step schedule."""
    c = get_config(name)
    c.model_overrides = ml_collections.ConfigDict(dict(
        embed_dim=16, depths=(1, 1), num_heads=(1, 2), kernel_size=3, drop_path_rate=0.1))
    if name.startswith("dinat"):
        c.model_overrides.dilations = ((2,), (1,))
    c.compute_dtype = "float32"
    c.image_size = 32
    c.global_batch_size = 16
    c.num_workers = 0
    c.num_epochs, c.num_train_steps = -1, 4
    c.warmup_epochs, c.warmup_steps = -1, 1
    c.cooldown_epochs, c.cooldown_steps = -1, 0
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.progress_bar = False
    c.update(updates)
    return c


def fixed_batch(rng, batch=16, size=32, num_classes=10):
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, batch).astype(np.int32),
            "erase": np.zeros((batch, 4), np.int32)}


def no_aug(c):
    c.aug.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, random_erasing=0.0)
    return c


# ------------------------------------------------------------------ configs and optimizer

def test_every_config_resolves_to_a_model():
    for name in configs.CONFIGS:
        c = get_config(name)
        model_cfg = trainer.model_config(c, c.num_classes)  # validates the overrides
        assert model_cfg.num_labels == c.num_classes
        assert c.model == name or name == "digits"
        options = trainer.build_options(c)  # valid build options and eval transform
        # Abstract (no weights drawn): builds every module, checks every option.
        model = nnx.eval_shape(lambda: nat_jax.build_model(model_cfg, rngs=nnx.Rngs(0),
                                                           **options))
        assert model.eval_transform.image_size == c.image_size
        assert model.options.dtype == trainer.compute_dtype(c)
    with pytest.raises(ValueError, match="config name="):
        get_config("nat_huge")


def test_compute_dtype_auto_is_float32_on_cpu_and_bfloat16_on_accelerators():
    """The ImageNet configs' "auto" compute dtype: bfloat16 where it pays (GPU, TPU, abstract
    devices of a deviceless compile included), float32 on CPU; a named dtype always wins."""
    c = get_config("nat_mini")
    assert c.compute_dtype == "auto"
    assert trainer.compute_dtype(c, "cpu") == "float32"
    assert trainer.compute_dtype(c) == "float32"  # this host
    for platform in ("tpu", "gpu", "cuda"):
        assert trainer.compute_dtype(c, platform) == "bfloat16"
        assert trainer.build_options(c, platform)["dtype"] == "bfloat16"
    assert trainer.build_options(c)["dtype"] == "float32"
    assert trainer.StepConfig.from_config(c, 10, "tpu").compute_dtype == "bfloat16"
    c.compute_dtype = "bfloat16"
    assert trainer.compute_dtype(c, "cpu") == "bfloat16"


def test_overrides_coerce_types_and_reject_unknown_fields():
    c = get_config("nat_mini")
    configs.apply_overrides(c, {"learning_rate": "5e-4", "global_batch_size": "256",
                                "aug.hflip": "0", "aug.crop_scale": "(0.5, 1.0)",
                                "progress_bar": "false", "data_dir": "/data",
                                "model_overrides.drop_path_rate": "0.05"})
    assert c.learning_rate == 5e-4 and c.global_batch_size == 256 and c.aug.hflip == 0.0
    assert c.aug.crop_scale == (0.5, 1.0) and c.progress_bar is False and c.data_dir == "/data"
    assert c.model_overrides.drop_path_rate == 0.05
    with pytest.raises(ValueError, match="no field 'learning_rat'"):
        configs.apply_overrides(c, {"learning_rat": "1"})
    with pytest.raises(ValueError, match="global_batch_size"):
        configs.apply_overrides(c, {"global_batch_size": "many"})
    configs.apply_overrides(c, {"aug.crop_ratio": "(1, 2)", "num_train_steps": "1e3",
                                "model_overrides.depths": "(1, 1, 1)"})
    assert c.aug.crop_ratio == (1.0, 2.0) and c.num_train_steps == 1000
    assert c.model_overrides.depths == (1, 1, 1)


def test_xla_options_reach_the_compiled_steps():
    """config.xla_options (any option name, typed from its text) are the compiler options of
    the jitted train and eval steps: an option XLA does not know fails their compile by name."""
    c = tiny_config()
    configs.apply_overrides(c, {"xla_options.xla_gpu_enable_triton_gemm": "false",
                                "xla_options.xla_gpu_autotune_level": "0"})
    assert dict(c.xla_options) == {"xla_gpu_enable_triton_gemm": False,
                                   "xla_gpu_autotune_level": 0}
    c.xla_options = ml_collections.ConfigDict({"not_an_xla_option": 1})
    mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
    steps = trainer.build_steps(c, mesh, 10, total_steps=4, warmup_steps=1)
    label = steps.batch["label"]
    eval_batch = {"image": steps.batch["image"], "label": label,
                  "mask": jax.ShapeDtypeStruct(label.shape, jnp.bool_, sharding=label.sharding)}
    for fn, args in ((steps.step_fn, (steps.state, steps.batch, steps.rest)),
                     (steps.eval_fn, (steps.state.params, eval_batch, steps.rest))):
        lowered = fn.trace(*args).lower()
        with pytest.raises(Exception, match="not_an_xla_option"):
            lowered.compile()


@pytest.mark.parametrize("override,problem", [
    ("aug.crop_scale=0.5", "expected a tuple like (0.7, 1.0), got '0.5'"),
    ("aug.crop_scale=(0.5,)", "expected 2 values like (0.7, 1.0), got 1"),
    ("aug.mean=('a', 'b', 'c')", "expected numbers like (0.5, 0.5, 0.5)"),
    ("model_overrides.depths=2", "expected a tuple like (2, 2), got '2'"),
    ("num_train_steps=1.5", "expected an integer, got '1.5'"),
    ("learning_rate=fast", "expected a number, got 'fast'"),
    ("progress_bar=maybe", "expected a boolean"),
    ("learning_rat=1", "no field 'learning_rat' (known: aug, b1"),
    ("aug.hflip.x=1", "aug.hflip is not a group of fields"),
])
def test_bad_overrides_are_one_line_errors(tmp_path, capsys, override, problem):
    """Through the CLI: exit 1, one line naming the override and the problem, nothing written
    (a scalar for a tuple field used to become a 1-tuple silently)."""
    from nat_jax.cli import main

    code = main(["train", "--config", "digits", "--workdir", str(tmp_path / "w"),
                 f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"config override {override.split('=')[0]}" in err and problem in err, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("setting,problem", [
    ("--config.global_batch_size=0", "global_batch_size=0 must be >= 1"),  # ZeroDivisionError
    ("--config.global_batch_size=-8", "global_batch_size=-8 must be >= 1"),
    ("--config.log_every_steps=0", "log_every_steps=0 must be >= 1"),
    ("--config.global_batch_size=12", "global_batch_size=12 must be divisible by the number "
                                      "of devices (8)"),
    ("--config.fsdp=3", "fsdp=3 must be -1 or a positive divisor of the device count 8"),
])
def test_settings_that_cannot_run_are_one_line_errors(tmp_path, capsys, setting, problem):
    from nat_jax.cli import main

    code = main(["train", "--config", "digits", "--workdir", str(tmp_path / "w"), setting,
                 "--config.progress_bar=false"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert problem in err, err


def test_workdir_under_a_file_is_one_line_error(tmp_path, capsys):
    from nat_jax.cli import main

    (tmp_path / "file").write_text("not a directory")
    for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
        code = main(["train", "--config", "digits", "--workdir", str(workdir)])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1, err
        assert f"cannot use --workdir {workdir}: {tmp_path / 'file'} is a file" in err, err
    assert (tmp_path / "file").read_text() == "not a directory"


def test_unwritable_workdir_is_one_line_error(tmp_path):
    """A workdir the process may not write (permission bits, obeyed even by root here)."""
    from permissions import nat_jax_cli

    workdir = tmp_path / "read_only"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        proc = nat_jax_cli("train", "--config", "digits", "--workdir", workdir)
    finally:
        workdir.chmod(0o755)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"cannot use --workdir {workdir}: cannot write in {workdir} (Permission denied)" in err
    assert os.listdir(workdir) == []


def test_cli_parses_config_overrides():
    from nat_jax.cli import build_parser

    argv = ["train", "--config", "digits", "--workdir", "w", "--config.learning_rate=5e-4",
            "--config.aug.hflip", "0.5"]
    args = build_parser(argv).parse_args(argv)
    assert args.config == "digits" and args.workdir == "w"
    assert args.config_overrides == {"learning_rate": "5e-4", "aug.hflip": "0.5"}


def test_durations_steps_or_epochs(caplog):
    c = get_config("nat_mini")
    total, warmup, cooldown = trainer.resolve_durations(c, steps_per_epoch=1251)
    assert (total, warmup, cooldown) == (310 * 1251, 20 * 1251, 10 * 1251)
    # A step count given alone wins over the recipe's epochs (logged); the 20-epoch warmup and
    # the 10-epoch cooldown are longer than the 6-step run: clamped, with a warning each.
    c.num_train_steps = 6
    with caplog.at_level(logging.INFO, logger="nat_jax.train.trainer"):
        assert trainer.resolve_durations(c, steps_per_epoch=4) == (12, 6, 6)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "num_train_steps=6 takes precedence over num_epochs=300 (1200 steps" in text
    assert "warmup of 80 steps is longer than the run (6 steps): clamped to 6" in text
    assert "cooldown of 40 steps is longer than the run (6 steps): clamped to 6" in text
    assert [r.levelname for r in caplog.records if "clamped" in r.getMessage()] == ["WARNING"] * 2
    c.warmup_steps, c.cooldown_steps = 2, 0
    assert trainer.resolve_durations(c, steps_per_epoch=4) == (6, 2, 0)
    c.num_train_steps = c.num_epochs = -1
    with pytest.raises(UserInputError, match="num_train_steps and num_epochs are both -1"):
        trainer.resolve_durations(c, 10)
    c.num_train_steps = 0
    with pytest.raises(UserInputError, match="the run has 0 steps"):
        trainer.resolve_durations(c, 10)


def test_schedule_follows_the_recipe():
    c = get_config("nat_mini")
    schedule = trainer.make_schedule(c, total_steps=1000, warmup_steps=100, cooldown_steps=50)
    np.testing.assert_allclose(float(schedule(0)), 1e-6, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(950)), 5e-6, rtol=1e-4)
    np.testing.assert_allclose(float(schedule(999)), 5e-6, rtol=1e-4)
    mid = float(schedule(525))  # half way through the cosine part
    np.testing.assert_allclose(mid, 5e-6 + (1e-3 - 5e-6) / 2, rtol=1e-3)


def test_weight_decay_follows_the_model(rng):
    """The optimizer decays >= 2-D weights except what model.no_weight_decay() lists: RPB and
    the layer scales (1-D gamma1/gamma2 in the original recipe; stacked [2, C] here, which the
    old name-matching mask decayed). One AdamW step on zero gradients shows it: only decayed
    parameters move."""
    c = tiny_config("nat_small")
    c.model_overrides.layer_scale_init_value = 0.5
    c.grad_clip_norm = 0.0
    steps = trainer.build_steps(c, sharding.make_mesh(), 10, total_steps=10, warmup_steps=0)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), steps.state.params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = steps.tx.update(zeros, steps.tx.init(params), params)
    moved = {jax.tree_util.keystr(p): bool(jnp.any(u != 0))
             for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    for key, did in moved.items():
        decays = key.endswith("['kernel']")
        assert did == decays, key
    assert any(k.endswith("['rpb']") for k in moved)
    assert any(k.endswith("['layer_scale_parameters']") for k in moved)


def test_param_sharding_rule():
    mesh = sharding.make_mesh(fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1}
    assert sharding.param_spec((512, 1000), 4, 0) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.param_spec((64,), 4, 2 ** 18) == jax.sharding.PartitionSpec()
    assert sharding.param_spec((3, 5), 4, 0) == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="fsdp=3"):
        sharding.make_mesh(fsdp=3)


# ------------------------------------------------------------------ train steps

def _setup(c, mesh, num_classes=10, total=10):
    return trainer.setup_training(c, mesh, num_classes, total_steps=total, warmup_steps=0)


def test_sharded_steps_match_single_device_and_loss_decreases(rng):
    """Same init, same fixed batch: the 8-device steps (data parallel, and data x fsdp with
    parameters and optimizer state split over 4 devices) equal the 1-device steps, and the
    loss keeps going down over a few more steps."""
    c = no_aug(tiny_config(fsdp_min_size=0, learning_rate=5e-3))
    c.aug.random_erasing = 0.25  # on-device erasing of one box, same on every mesh
    batch = fixed_batch(rng)
    batch["erase"][0] = (2, 3, 5, 6)
    meshes = {"single": sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]),
              "data": sharding.make_mesh(fsdp=1), "fsdp": sharding.make_mesh(fsdp=4)}
    results = {}
    for name, mesh in meshes.items():
        run = _setup(c, mesh, total=100)
        state, losses = run.state, []
        steps = 10 if name == "single" else 2
        for i in range(steps):
            state, metrics = run.step_fn(state, trainer.put_batch(batch, mesh), run.rest)
            losses.append(float(metrics["loss"]))
            if i == 1:
                results[name] = (jax.device_get(state.params), losses,
                                 jax.device_get(state.opt_state), float(metrics["grad_norm"]))
        if name == "fsdp":
            specs = [tuple(s.spec) for s in jax.tree.leaves(run.state_sh.params)]
            assert any("fsdp" in sp for sp in specs), "nothing was FSDP-sharded"
            sharded = [x for x in jax.tree.leaves(state.params) if "fsdp" in tuple(x.sharding.spec)]
            assert sharded and all(x.addressable_shards[0].data.size * 4 == x.size
                                   for x in sharded)
        if name == "single":
            assert all(math.isfinite(x) for x in losses)
            assert losses[-1] < 0.75 * losses[0], losses
            assert sum(b < a for a, b in zip(losses, losses[1:])) >= 7, losses
    p1, l1, o1, g1 = results["single"]
    for name in ("data", "fsdp"):
        p8, l8, o8, g8 = results[name]
        np.testing.assert_allclose(l8, l1[:2], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(g8, g1, rtol=1e-5, err_msg=name)
        # Adam divides by sqrt(v): for the few entries whose gradient is ~0 the summation
        # order changes the step by up to ~lr, hence an absolute tolerance of 1% of lr. The
        # moments themselves: entries that nearly cancel over the batch (two of the
        # classifier's 320 with drop path on) differ by up to ~6e-5 of the leaf's largest.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), p8, p1)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=max(1e-7, 2e-4 * float(np.max(np.abs(b)))) if np.size(b)
            else 0), o8, o1)


@pytest.mark.slow
def test_scanned_train_step_equals_unrolled_under_fsdp(rng):
    """--config.scan_layers: two sharded train steps (data x fsdp on 8 devices, drop path on,
    remat and ordered_backward as the recipe turns them on) equal the unrolled model's, and the
    step's program scans the one stage with repeated layers (forward, and its transpose)."""
    from test_sharded_kernels import _two_steps

    c = no_aug(tiny_config("dinat_mini", fsdp_min_size=0, learning_rate=5e-3, remat=True))
    c.model_overrides.depths = (4, 1)
    c.model_overrides.dilations = ((1, 2, 1, 2), (1,))
    assert c.ordered_backward and c.model_overrides.drop_path_rate > 0
    batch, mesh = fixed_batch(rng), sharding.make_mesh(fsdp=4)
    p1, l1, jaxpr1 = _two_steps(c, mesh, batch)
    c.scan_layers = True
    p2, l2, jaxpr2 = _two_steps(c, mesh, batch)
    assert jaxpr1.count("scan[") == 0 and jaxpr2.count("scan[") == 2
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), p2, p1)


# ------------------------------------------------------------------ end to end on mock ImageNet

IMAGENET_CONFIGS = [n for n in configs.CONFIGS if n != "digits"]


@pytest.mark.parametrize("name,fsdp", [
    # Every ImageNet config (recipe, schedule, augmentation) end to end with a shrunk model,
    # NAT data parallel and DiNAT FSDP (+EMA) over 8 devices; dinat_mini in every run, the
    # others in the sampled slow tier.
    pytest.param(n, f, marks=() if n == "dinat_mini" else pytest.mark.slow)
    for n, f in [(n, 8 if n.startswith("dinat") else 1) for n in IMAGENET_CONFIGS]])
def test_imagenet_config_on_mock_data(tmp_path, name, fsdp):
    c = tiny_config(name, fsdp=fsdp, fsdp_min_size=0, ema_decay=0.9 if fsdp > 1 else 0.0)
    with tfds.testing.mock_data(num_examples=40):
        metrics = trainer.train_and_evaluate(c, str(tmp_path))
    assert metrics["step"] == 4 and metrics["resumed_from"] == 0
    assert metrics["eval_count"] == 40 and 0 <= metrics["eval_top1"] <= metrics["eval_top5"]
    assert math.isfinite(metrics["train_loss"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]
    assert any("eval_top1" in r for r in rows) and any("images_per_second" in r for r in rows)
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert os.listdir(tmp_path / "tensorboard")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    if name == "nat_mini":
        # The reload used for predictions after training gives back exactly the saved params.
        model, step = trainer.load_trained_model(str(tmp_path), trainer.model_config(c, 1000),
                                                 **trainer.build_options(c))
        assert model.eval_transform.image_size == c.image_size
        assert step == 4
        mgr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
        saved = mgr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        mgr.close()
        def flat(tree):  # restored without a target, layer indices come back as strings
            return {"/".join(str(k.key) for k in path): np.asarray(x)
                    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

        got = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        want = flat(saved["state"]["params"])
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_non_finite_loss_stops_with_the_step(tmp_path, capsys):
    """Through the CLI (overrides of every kind): a NaN loss exits 1 naming the step."""
    from nat_jax.cli import main

    workdir = str(tmp_path / "w")
    code = main(["train", "--config", "digits", "--workdir", workdir,
                 "--config.num_epochs=-1", "--config.num_train_steps=6",
                 "--config.warmup_epochs", "-1", "--config.warmup_steps=1",
                 "--config.model_overrides.embed_dim=16", "--config.model_overrides.depths=(1,1)",
                 "--config.model_overrides.num_heads=(1, 2)",
                 "--config.model_overrides.dilations=((2,), (1,))",
                 "--config.progress_bar=false", "--config.log_every_steps=1",
                 "--config.aug.std=(0, 0, 0)"])  # division by zero: the first loss is NaN
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite loss nan at step 1" in err and "last good checkpoint" in err
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "2"))


@pytest.mark.slow
def test_image_folder_run_with_unreadable_files_and_a_missing_val_class(tmp_path, capsys,
                                                                       caplog):
    """Training on an image folder whose train split holds a broken symlink and a corrupt file
    and whose val split lacks a class: the run finishes, each bad file is warned about once,
    the eval counts the readable images and predictions name the training classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in {"train": ["cat", "dog", "fish"], "val": ["dog", "fish"]}.items():
        for cls in classes:
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    (tmp_path / "data" / "train" / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "data" / "train" / "fish" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    c = tiny_config(dataset="image_folder", data_dir=str(tmp_path / "data"), num_classes=-1,
                    eval_split="val", global_batch_size=8, predict_after_training=3,
                    checkpoint_every_steps=4)  # 32 examples: over 2 epochs of 14 files
    with caplog.at_level(logging.WARNING, logger="nat_jax.train.input_pipeline"):
        metrics = trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert metrics["step"] == 4 and metrics["eval_count"] == 8
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 2 and any("gone.jpg" in w for w in warned), warned
    printed = capsys.readouterr().out
    assert printed.count("true    dog") + printed.count("true   fish") == 3, printed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_full_preset_architecture_one_step(tmp_path, name):
    """The real preset model (not shrunk) runs a step on mock data at a small image size."""
    c = tiny_config(name, image_size=64, global_batch_size=8)
    c.model_overrides = ml_collections.ConfigDict()
    c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1, 1
    with tfds.testing.mock_data(num_examples=8):
        metrics = trainer.train_and_evaluate(c, str(tmp_path))
    assert metrics["step"] == 1 and math.isfinite(metrics["train_loss"])


def test_resume_check_reads_workdirs_of_older_versions(tmp_path):
    """model_config.json of older runs also holds dtype / na_backend / image_size / crop_pct
    (build and eval settings, once config fields): they do not block a resume; the
    architecture and the parameter dtype still must match."""
    c = tiny_config()
    wanted = trainer.stored_model_config(trainer.model_config(c, 10), c)
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    old = dict(wanted, dtype="bfloat16", na_backend="pallas", image_size=64, crop_pct=0.9)
    (tmp_path / trainer.MODEL_CONFIG_FILE).write_text(json.dumps(old))
    trainer.check_resume_matches(str(tmp_path), wanted)
    for key, value in (("param_dtype", "bfloat16"), ("embed_dim", 32)):
        (tmp_path / trainer.MODEL_CONFIG_FILE).write_text(json.dumps(dict(old, **{key: value})))
        with pytest.raises(UserInputError, match=f"{key} {value} -> {wanted[key]}"):
            trainer.check_resume_matches(str(tmp_path), wanted)
