"""Bad inputs to ``nat-jax convert`` / ``export``: one error line, exit code 1, nothing written.

Includes pickles whose payload would run a shell command: they must be refused without running
it (the marker file the command would create must not appear).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest

# torch and transformers come with the test extra: a missing one must fail, not skip.
import torch  # noqa: E402
import transformers  # noqa: E402,F401

from test_convert import (DINAT_SMALL, NAT_SMALL, hf_to_original, run_cli,  # noqa: E402
                          torch_model)

from nat_jax.convert import hf_config  # noqa: E402


class _RunsCommand:
    """Unpickling this would call ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def nat_hf(tmp_path_factory):
    """A small NAT saved as an HF directory, plus its state dict."""
    model = torch_model(NAT_SMALL, seed=11)
    root = tmp_path_factory.mktemp("bad")
    model.save_pretrained(root / "hf", safe_serialization=True)
    return root, model


def assert_clean_failure(capsys, args, out, *needles) -> str:
    """The CLI exits 1 with one stderr line (no traceback) containing ``needles``; no OUT."""
    assert run_cli(*args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    siblings = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not siblings, siblings  # no temporary directory left behind either
    return err


@pytest.mark.parametrize("container", ["raw_pickle", "torch_zip"])
def test_malicious_pickle_is_refused_without_running(container, tmp_path, capsys):
    marker = tmp_path / "marker_file"
    payload = {"model": _RunsCommand(f"touch {marker}")}
    path = tmp_path / "evil.pth"
    if container == "raw_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    assert_clean_failure(capsys, ["convert", path, tmp_path / "out", "--arch", "nat_mini"],
                         tmp_path / "out", "refusing to load", "weights_only")
    assert not marker.exists()


def test_malicious_bin_in_hf_directory_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker_file"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(
        pickle.dumps({"w": _RunsCommand(f"touch {marker}")}))
    (tmp_path / "src" / "config.json").write_text(json.dumps(hf_config.config_to_hf(NAT_SMALL)))
    assert_clean_failure(capsys, ["convert", tmp_path / "src", tmp_path / "out"],
                         tmp_path / "out", "refusing to load")
    assert not marker.exists()


def test_truncated_and_corrupt_files(nat_hf, tmp_path, capsys):
    root, model = nat_hf
    whole = (root / "hf" / "model.safetensors").read_bytes()
    cases = {
        "cut.safetensors": whole[: len(whole) // 2],
        "garbage.safetensors": b"\x00\x01not a safetensors header at all",
    }
    torch.save(model.state_dict(), tmp_path / "good.pth")
    pth = (tmp_path / "good.pth").read_bytes()
    cases["cut.pth"] = pth[: len(pth) // 2]
    cases["garbage.bin"] = b"this is not a pickle or a zip file"
    cases["empty.pt"] = b""
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out_{name}"
        assert_clean_failure(capsys, ["convert", tmp_path / name, out, "--arch", "nat_mini"],
                             out, "cannot read", "truncated or corrupt")


def test_unsupported_suffix_missing_src_and_empty_dir(tmp_path, capsys):
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    out = tmp_path / "out"
    assert_clean_failure(capsys, ["convert", tmp_path / "weights.ckpt", out],
                         out, "unsupported file type '.ckpt'")
    assert_clean_failure(capsys, ["convert", tmp_path / "nope.pth", out], out, "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(capsys, ["convert", tmp_path / "empty", out], out,
                         "directory without weights")


def test_wrong_model_family(nat_hf, tmp_path, capsys):
    root, _ = nat_hf
    out = tmp_path / "out"
    # a different architecture altogether
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(),
               tmp_path / "other.pth")
    assert_clean_failure(capsys, ["convert", tmp_path / "other.pth", out, "--arch", "nat_mini"],
                         out, "not a NAT/DiNAT checkpoint")
    # DiNAT_s / isotropic variants of the original repository (single patch conv)
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}, tmp_path / "dinats.pth")
    assert_clean_failure(capsys, ["convert", tmp_path / "dinats.pth", out, "--arch",
                                  "dinat_tiny"], out, "DiNAT_s or isotropic")
    # an HF config of another family
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "model.safetensors").write_bytes(
        (root / "hf" / "model.safetensors").read_bytes())
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    assert_clean_failure(capsys, ["convert", tmp_path / "swin", out], out,
                         "wrong model family")
    # NAT weights ('nat.' keys) with a DiNAT preset
    (tmp_path / "nat.safetensors").write_bytes((root / "hf" / "model.safetensors").read_bytes())
    assert_clean_failure(capsys, ["convert", tmp_path / "nat.safetensors", out, "--arch",
                                  "dinat_mini"], out, "wrong model family")


def test_missing_config_says_what_to_pass(tmp_path, capsys):
    model = torch_model(DINAT_SMALL, seed=12)
    torch.save(hf_to_original(model.state_dict(), "dinat"), tmp_path / "flat.pth")
    out = tmp_path / "out"
    err = assert_clean_failure(capsys, ["convert", tmp_path / "flat.pth", out], out,
                               "--arch", "NAT vs DiNAT", "embed_dim=16", "depths=[2, 2, 1]",
                               "num_heads=[2, 2, 4]", "kernel_size=3", "mlp_ratio=2",
                               "layer scale=yes", "num_labels=7")
    assert "presets that fit: none" in err
    # full-size shapes: the message names the presets that fit
    mini = torch_model(nat_jax_config("nat_mini"), seed=13)
    torch.save(mini.state_dict(), tmp_path / "mini.pth")
    assert_clean_failure(capsys, ["convert", tmp_path / "mini.pth", out], out,
                         "presets that fit: nat_mini, dinat_mini", "the keys say NAT")


def nat_jax_config(name):
    import nat_jax
    return nat_jax.configs.get(name)


def test_wrong_arch(nat_hf, tmp_path, capsys):
    root, model = nat_hf
    out = tmp_path / "out"
    torch.save({"state_dict": hf_to_original(model.state_dict(), "nat")}, tmp_path / "o.pth")
    assert_clean_failure(capsys, ["convert", tmp_path / "o.pth", out, "--arch", "nat_tiny"],
                         out, "--arch nat_tiny does not match the weights", "embed_dim: 64 vs "
                         "weights 16")
    assert_clean_failure(capsys, ["convert", tmp_path / "o.pth", out, "--arch", "nat_huge"],
                         out, "'nat_huge' is not a preset", "nat_mini")
    assert_clean_failure(capsys, ["convert", root / "hf", out, "--arch", "nat_mini"], out,
                         "disagrees with")


def test_existing_out_needs_overwrite(nat_hf, tmp_path, capsys):
    root, _ = nat_hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run_cli("convert", root / "hf", out, "--quiet") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "user data"
    assert run_cli("convert", root / "hf", out, "--quiet", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # export refuses an existing OUT_DIR the same way
    (tmp_path / "exported").mkdir()
    assert run_cli("export", out, tmp_path / "exported", "--quiet") == 1
    assert "already exists" in capsys.readouterr().err


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_out_that_is_contains_or_lies_inside_src_is_refused(nat_hf, tmp_path, capsys):
    """Even with --overwrite: OUT == SRC (the source would be deleted), OUT containing SRC, OUT
    inside SRC; the same for export's OUT_DIR and CKPT. The source stays byte for byte."""
    root, _ = nat_hf
    src = tmp_path / "models" / "hf"
    shutil.copytree(root / "hf", src)
    (tmp_path / "models" / "config.json").write_text((src / "config.json").read_text())
    before = _tree(tmp_path)
    cases = [((src, src), "is SRC"), ((src / "model.safetensors", src), "contains SRC"),
             ((src, tmp_path / "models"), "contains SRC"), ((src, src / "sub"), "lies inside SRC"),
             ((root / "hf", tmp_path / "models", "--config", tmp_path / "models" / "config.json"),
              "contains --config")]
    for args, needle in cases:
        assert run_cli("convert", *args, "--overwrite", "--quiet") == 1, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert _tree(tmp_path) == before, args
    assert run_cli("convert", src, tmp_path / "ckpt", "--quiet") == 0
    before = _tree(tmp_path)
    for out, needle in [(tmp_path / "ckpt", "is CKPT"), (tmp_path, "contains CKPT"),
                        (tmp_path / "ckpt" / "hf", "lies inside CKPT")]:
        assert run_cli("export", tmp_path / "ckpt", out, "--overwrite", "--quiet") == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert _tree(tmp_path) == before, out


@pytest.mark.parametrize("case", ["weights_file", "src_directory", "out_parent"])
def test_unreadable_src_and_unwritable_out(nat_hf, tmp_path, case):
    """Permission problems are named as such (not "corrupt", "missing" or "exists"), in one
    line, with nothing written; the kernel refuses for real (see tests/permissions.py)."""
    from permissions import nat_jax_cli

    root, _ = nat_hf
    src, out = tmp_path / "hf", tmp_path / "out"
    shutil.copytree(root / "hf", src)
    locked, mode, needle = {
        "weights_file": (src / "model.safetensors", 0o000,
                         f"cannot read {src / 'model.safetensors'}: Permission denied"),
        "src_directory": (src, 0o000, f"cannot read SRC {src}: Permission denied"),
        "out_parent": (tmp_path / "locked", 0o555,
                       f"cannot write in {tmp_path / 'locked'} (Permission denied)"),
    }[case]
    if case == "out_parent":
        locked.mkdir()
        out = locked / "out"
    locked.chmod(mode)
    try:
        proc = nat_jax_cli("convert", src, out, "--quiet")
    finally:
        locked.chmod(0o755)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not out.exists()


def test_out_under_a_file(nat_hf, tmp_path, capsys):
    root, _ = nat_hf
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    err = assert_clean_failure(capsys, ["convert", root / "hf", out], tmp_path / "nothing",
                               f"cannot write {out}: {tmp_path / 'file'} is a file, not a "
                               "directory")
    assert "exists" not in err and (tmp_path / "file").read_text() == "x"


def test_missing_unexpected_and_mismatched_keys_reported_together(nat_hf, tmp_path, capsys):
    root, model = nat_hf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["nat.layernorm.bias"]
    state["nat.extra.weight"] = torch.zeros(3)
    state["nat.encoder.levels.0.layers.0.attention.self.rpb"] = torch.zeros(1, 7, 7)
    torch.save(state, tmp_path / "broken.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config.config_to_hf(NAT_SMALL)))
    out = tmp_path / "out"
    assert_clean_failure(capsys, ["convert", tmp_path / "broken.bin", out, "--config",
                                  tmp_path / "config.json"], out,
                         "1 missing (nat.layernorm.bias)", "1 unexpected (nat.extra.weight)",
                         "1 shape mismatch (nat.encoder.levels.0.layers.0.attention.self.rpb "
                         "[1, 7, 7] expected [1, 5, 5])")


def test_failed_verify_writes_nothing(nat_hf, tmp_path, capsys):
    root, _ = nat_hf
    out = tmp_path / "out"
    assert_clean_failure(capsys, ["convert", root / "hf", out, "--verify", "--verify-size", "32",
                                  "--tolerance", "0"], out, "--verify failed", "nothing written")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_verify_fails_on_non_finite_outputs(nat_hf, tmp_path, capsys, value):
    """One non-finite classifier bias makes both outputs non-finite: NaN differences must not
    pass the tolerance check."""
    _, model = nat_hf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["classifier.bias"][3] = value
    torch.save(state, tmp_path / "bad.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config.config_to_hf(NAT_SMALL)))
    out = tmp_path / "out"
    assert_clean_failure(capsys, ["convert", tmp_path / "bad.bin", out, "--config",
                                  tmp_path / "config.json", "--verify", "--verify-size", "32"],
                         out, "--verify failed: non-finite outputs", "nothing written")


@pytest.mark.parametrize("flag,value,message", [
    ("--verify-size", "0", "--verify-size 0: the image side must be >= 1"),
    ("--verify-size", "-32", "--verify-size -32: the image side must be >= 1"),
    ("--tolerance", "nan", "--tolerance nan: must be a finite number >= 0"),
    ("--tolerance", "-1e-4", "--tolerance -0.0001: must be a finite number >= 0"),
])
def test_verify_settings_are_checked(nat_hf, tmp_path, capsys, flag, value, message):
    root, _ = nat_hf
    out = tmp_path / "out"
    assert_clean_failure(capsys, ["convert", root / "hf", out, "--verify", f"{flag}={value}"],
                         out, message)


def test_export_rejects_non_checkpoints(nat_hf, tmp_path, capsys):
    root, _ = nat_hf
    out = tmp_path / "out"
    assert_clean_failure(capsys, ["export", root / "hf", out], out,
                         "is not a nat-jax checkpoint")
    assert_clean_failure(capsys, ["export", tmp_path / "missing", out], out,
                         "is not a directory")


def test_wrappers_and_ddp_prefix_are_unwrapped(nat_hf, tmp_path, capsys):
    root, model = nat_hf
    original = hf_to_original(model.state_dict(), "nat")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in original.items()},
               "optimizer": {"lr": torch.tensor(0.1)}, "epoch": 7}
    torch.save(wrapped, tmp_path / "w.pth")
    (tmp_path / "config.json").write_text(json.dumps(hf_config.config_to_hf(NAT_SMALL)))
    assert run_cli("convert", tmp_path / "w.pth", tmp_path / "out", "--config",
                   tmp_path / "config.json") == 0
    text = capsys.readouterr().out
    assert "using the 'state_dict' entry" in text and "module." in text
    import nat_jax
    ours = nat_jax.load_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(
        np.asarray(ours.nat.encoder.levels[0].layers[0].attention.rpb),
        model.state_dict()["nat.encoder.levels.0.layers.0.attention.self.rpb"].numpy())


def test_sharded_legacy_and_progress(nat_hf, tmp_path, monkeypatch, capsys):
    """Sharded HF weights (index.json), legacy (non-zip) torch pickles, and the progress bar."""
    import nat_jax
    from nat_jax.convert import loading
    root, model = nat_hf
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    monkeypatch.setattr(loading, "PROGRESS_MIN_BYTES", 0)  # draw bars even for tiny files
    result = nat_jax.convert.convert(tmp_path / "sharded", tmp_path / "out", progress=True)
    assert result.num_params == sum(p.numel() for p in model.parameters())
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_config.config_to_hf(NAT_SMALL)))
    assert run_cli("convert", tmp_path / "legacy.pt", tmp_path / "out2", "--config",
                   tmp_path / "config.json", "--quiet") == 0
    a = nat_jax.load_pretrained(tmp_path / "out")
    b = nat_jax.load_pretrained(tmp_path / "out2")
    np.testing.assert_array_equal(np.asarray(a.classifier.kernel), np.asarray(b.classifier.kernel))
