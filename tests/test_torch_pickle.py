"""Reading PyTorch checkpoints without torch: the restricted unpickler against torch.load, what
it refuses, corrupt files, and a whole conversion in a process where torch cannot be imported.

torch is here only to write the files (and as the reference reader).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch  # test extra: a missing one must fail, not skip

from nat_jax.convert import torch_pickle
from test_convert import NAT_SMALL, hf_to_original, torch_model


def _everything() -> dict:
    """What checkpoints hold: state dicts (OrderedDict), every dtype, views, transposed and
    offset tensors, parameters, empty and 0-d tensors, shared storage, args, plain values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "model": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).state_dict(),
        "dtypes": {str(d): (torch.randn(2, 3) * 50).to(d) for d in (
            torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
            torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)},
        "view": base[1:3, 2:5], "transposed": base.t(), "strided": base[:, ::2],
        "shared": (base, base[2]), "param": torch.nn.Parameter(torch.ones(3)),
        "empty": torch.zeros(0, 5), "scalar": torch.tensor(2.5),
        "args": argparse.Namespace(lr=0.1, sizes=[1, 2]), "epoch": 7, "name": "nat_mini",
        "size": torch.Size([2, 3]), "dtype": torch.float16,
    }


def _compare(got, want, where="") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), where
        if want.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16, where
            got, want = got.astype(np.float32), want.float()
        want = want.detach()
        assert got.dtype == want.numpy().dtype and got.shape == tuple(want.shape), where
        np.testing.assert_array_equal(got, want.detach().numpy(), err_msg=where)
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want), where
        for key in want:
            _compare(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)) and not isinstance(want, torch.Size):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _compare(a, b, f"{where}[{i}]")
    elif isinstance(want, argparse.Namespace):
        assert vars(got) == vars(want), where
    elif isinstance(want, torch.dtype):
        assert got == torch_pickle.TorchDtype(str(want).removeprefix("torch.")), where
    else:
        assert got == want, where


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_what_torch_load_reads(tmp_path, legacy):
    path = tmp_path / "everything.pth"
    torch.save(_everything(), path, _use_new_zipfile_serialization=not legacy)
    got = torch_pickle.load(path)
    _compare(got, torch.load(path, weights_only=False))
    assert isinstance(got["model"], collections.OrderedDict)


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Subclass(torch.Tensor):
    pass


_REFUSED = {
    "os.system": (lambda marker: {"w": _RunsCommand(f"touch {marker}")}, "GLOBAL posix.system"),
    "eval": (lambda marker: {"w": eval}, r"GLOBAL (builtins|__builtin__)\.eval"),
    "module": (lambda marker: torch.nn.Linear(2, 2), "GLOBAL torch.nn.modules.linear.Linear"),
    "numpy-scalar": (lambda marker: {"w": np.float64(1.5)}, "GLOBAL numpy"),
    "tensor-subclass": (lambda marker: {"w": torch.ones(2).as_subclass(_Subclass)},
                        "Unsupported"),
}


@pytest.mark.parametrize("case,container", [
    (case, container) for case in _REFUSED for container in ("zip", "legacy", "raw_pickle")
    if (case, container) != ("tensor-subclass", "raw_pickle")])  # needs torch's storages
def test_refuses_anything_but_tensors_without_running_it(tmp_path, case, container):
    payload, refused = _REFUSED[case]
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    obj = payload(marker)
    if container == "raw_pickle":
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(torch_pickle.RefusedGlobal, match=refused):
        torch_pickle.load(path)
    assert not marker.exists()


def _rewrite_zip(src, dst, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)


def test_corrupt_files_are_reported(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(4, 4)}, good)
    _rewrite_zip(good, tmp_path / "short.pth",
                 lambda name, data: data[:10] if "/data/" in name else data)
    _rewrite_zip(good, tmp_path / "missing.pth",
                 lambda name, data: None if "/data/" in name else data)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(4, 4)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pth").write_bytes(legacy.read_bytes()[:-20])
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1, 2]}))
    for name, message in [("short.pth", "holds 10 bytes, its tensor needs 64"),
                          ("missing.pth", "is missing"), ("cut.pth", "ends 20 bytes early"),
                          ("plain.pkl", "not a PyTorch checkpoint")]:
        with pytest.raises(torch_pickle.CorruptCheckpoint, match=message):
            torch_pickle.load(tmp_path / name)


def test_conversion_works_where_torch_cannot_be_imported(tmp_path):
    """SHI-Labs .pth (zip), HF pytorch_model.bin (legacy format here) and bf16 .safetensors
    convert in a process where ``import torch`` fails; the results equal a conversion in this
    (torch-importing) process."""
    model = torch_model(NAT_SMALL, seed=21)
    state = model.state_dict()
    config = tmp_path / "config.json"
    from nat_jax.convert import hf_config
    config.write_text(json.dumps(hf_config.config_to_hf(NAT_SMALL)))
    torch.save({"model": hf_to_original(state, "nat")}, tmp_path / "original.pth")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
              str(tmp_path / "half.safetensors"))
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from nat_jax.cli import main
for name in ("original.pth", "legacy.bin", "half.safetensors"):
    code = main(["convert", r"{tmp_path}/" + name, r"{tmp_path}/out_" + name, "--config",
                 r"{config}", "--quiet"])
    assert code == 0, name
assert sys.modules["torch"] is None
print("converted without torch")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "converted without torch" in proc.stdout, proc.stderr[-3000:]
    import nat_jax
    from flax import nnx
    want = nat_jax.convert.convert_model(tmp_path / "original.pth", config=config)[0]
    want = nnx.to_pure_dict(nnx.state(want, nnx.Param))
    for name in ("original.pth", "legacy.bin", "half.safetensors"):
        got = nnx.to_pure_dict(nnx.state(nat_jax.load_pretrained(tmp_path / f"out_{name}"),
                                         nnx.Param))
        rounded = name == "half.safetensors"
        import jax
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-2 if rounded else 0, atol=1e-2 if rounded else 0), got, want)
