"""``nat_jax.from_pretrained``: published weights, a Hub repo or a local checkpoint in one line.

::

    model = nat_jax.from_pretrained("shi-labs/dinat-mini-in1k-224")   # or "dinat_mini"
    model = nat_jax.from_pretrained("checkpoints/dinat_mini")           # nat-jax or PyTorch

A Hub repo (or a preset name with published weights, see :data:`nat_jax.zoo.PUBLISHED`) is
fetched with ``huggingface_hub``: its cache, ``revision`` (branch, tag or commit), token and
offline mode (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) apply as for transformers. On first
use the PyTorch weights are converted (:mod:`nat_jax.convert`, no torch needed) and the nat-jax
checkpoint is cached under ``$NAT_JAX_CACHE`` (default ``~/.cache/nat_jax``) in
``converted/<format>/models--<org>--<name>/<commit>``: keyed by the snapshot's commit, so a new
revision converts again and an old one never goes stale. Later calls read only ``config.json``
from the Hub cache (to learn the commit) and load the converted checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from nat_jax import pretrained, zoo
from nat_jax.kernels.cache import CACHE_ENV, cache_root

__all__ = ["CACHE_ENV", "PretrainedNotFoundError", "cache_root", "converted_path",
           "from_pretrained"]

# Weight files of an HF repo, in the order they are tried (the converter reads the same set).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


class PretrainedNotFoundError(OSError):
    """The name is no local checkpoint, preset or reachable Hub repo (one-line message)."""


def converted_path(repo_id: str, commit: str) -> Path:
    """Where the conversion of ``repo_id`` at ``commit`` is cached."""
    fmt = pretrained.FORMAT.replace("/", "-")
    return cache_root() / "converted" / fmt / f"models--{repo_id.replace('/', '--')}" / commit


def from_pretrained(name_or_path: str | os.PathLike, *, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                    token: str | bool | None = None, head: str | None = None,
                    dtype: str | None = None, param_dtype: str | None = None,
                    na_backend: str | None = None, remat: bool = False,
                    seed: int = 0) -> nnx.Module:
    """A NAT/DiNAT model with pretrained weights.

    Args:
      name_or_path: a local nat-jax checkpoint directory (``save_pretrained`` / ``nat-jax
        convert``); a local PyTorch checkpoint (HF model directory, ``.safetensors`` / ``.pth``
        / ``.bin`` file; converted in memory, nothing written); a preset with published
        weights (``"dinat_mini"``); or a Hub repo id (``"shi-labs/dinat-mini-in1k-224"``).
      revision, cache_dir, local_files_only, token: as for ``huggingface_hub.hf_hub_download``
        (Hub repos only). ``HF_HUB_OFFLINE=1`` works as usual.
      head, dtype, param_dtype, na_backend, remat, seed: as for
        :func:`nat_jax.load_pretrained`.

    Raises:
      PretrainedNotFoundError: nothing found under that name (message says why, one line).
      nat_jax.convert.ConversionError: the weights could not be converted.
    """
    load = dict(head=head, dtype=dtype, param_dtype=param_dtype, na_backend=na_backend,
                remat=remat, seed=seed)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _from_local(path, load)
    name = str(name_or_path)
    entry = zoo.published(name)
    repo_id = entry.hub_id if entry is not None else name
    if repo_id.count("/") != 1:
        raise PretrainedNotFoundError(
            f"{name!r} is neither a local path, a preset with published weights "
            f"({', '.join(zoo.PUBLISHED)}) nor a Hub repo id (org/name)")
    return _from_hub(repo_id, revision, cache_dir, local_files_only, token, load)


def _from_local(path: Path, load: dict) -> nnx.Module:
    if path.is_dir() and (path / "params").is_dir():  # a nat-jax checkpoint
        return pretrained.load_pretrained(path, **load)
    from nat_jax.convert import convert_model

    model, _ = convert_model(path)
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return pretrained.from_params(pretrained.saved_model(model), values, where=str(path),
                                  **load)


def _from_hub(repo_id: str, revision: str | None, cache_dir, local_files_only: bool, token,
              load: dict) -> nnx.Module:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = local_files_only or constants.HF_HUB_OFFLINE
    where = f"{repo_id}" + (f"@{revision}" if revision else "")

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token))

    try:
        config_file = fetch("config.json")
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise PretrainedNotFoundError(f"{where}: {_first_line(e)}") from None
    except LocalEntryNotFoundError:
        raise PretrainedNotFoundError(
            f"{where} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
            "and downloading is off (offline mode); connect once to download it, or pass a "
            "local path") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise PretrainedNotFoundError(f"{where}: cannot fetch config.json "
                                      f"({_first_line(e)})") from None
    snapshot, commit = config_file.parent, config_file.parent.name
    out = converted_path(repo_id, commit)
    if not (out / "params").is_dir():
        for filename in _WEIGHT_FILES:
            try:
                weights = fetch(filename)
            except EntryNotFoundError:  # not in the repo (or, offline, not in the cache)
                continue
            except (HfHubHTTPError, OSError) as e:
                raise PretrainedNotFoundError(f"{where}: cannot fetch {filename} "
                                              f"({_first_line(e)})") from None
            if filename.endswith(".index.json"):
                _fetch_shards(weights, fetch)
            break
        else:
            raise PretrainedNotFoundError(
                f"{where} (commit {commit}) has none of {', '.join(_WEIGHT_FILES)}"
                + (" in the Hugging Face cache (offline mode)" if offline else ""))
        _convert_into_cache(snapshot, out)
    return pretrained.load_pretrained(out, **load)


def _fetch_shards(index: Path, fetch) -> None:
    import json

    for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
        fetch(shard)


def _convert_into_cache(snapshot: Path, out: Path) -> None:
    """Convert the snapshot into ``out`` (written atomically; a process that got there first
    wins, and its result is as good as ours)."""
    from nat_jax.convert import ConversionError, convert

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert(snapshot, out)
    except ConversionError:
        if (out / "params").is_dir():
            return
        raise


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
