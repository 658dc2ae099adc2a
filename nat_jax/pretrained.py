"""Save and load models: an Orbax checkpoint of the parameters plus the config JSON.

Directory format (the converter writes exactly this)::

    path/
      config.json   NatConfig/DinatConfig.to_dict() with id2label filled in (the label names),
                    plus "architectures": [class name] and "format": "nat-jax/1"
      params/       Orbax StandardCheckpointer: nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                    i.e. the nested dict of the parameter tree documented in nat_jax.modeling

Writes are atomic: everything goes to a hidden temporary sibling directory that is renamed into
place at the end, so a crash never leaves a half-written ``path``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from nat_jax.configs import _BaseConfig, model_class_for

__all__ = ["FORMAT", "load_config", "load_pretrained", "save_pretrained",
           "unwritable_reason"]

FORMAT = "nat-jax/1"
_HEAD_OF = {"ForImageClassification": "classification", "Backbone": "backbone", "Model": "base"}


def _head_of(class_name: str) -> str:
    for suffix, head in _HEAD_OF.items():
        if class_name.endswith(suffix):
            return head
    raise ValueError(f"architectures entry {class_name!r} is not a NAT/DiNAT model class")


def save_pretrained(model: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False
                    ) -> Path:
    """Write ``model`` (params + config + label names) to the directory ``path``.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"path={str(path)!r} exists; pass overwrite=True to replace it")
    config: _BaseConfig = model.config
    meta = config.to_dict()
    meta["id2label"] = {str(i): n for i, n in enumerate(config.label_names())} \
        if config.num_labels > 0 else None
    meta["architectures"] = [type(model).__name__]
    meta["format"] = FORMAT

    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", params)
            ckpt.wait_until_finished()
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path`` to fill; on success it replaces ``path`` by
    rename (an existing ``path`` is moved aside first and deleted after), on any failure it is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why the directory ``path`` cannot be created and written into (a few words), or None.

    Looks at the deepest part of ``path`` that exists: a file there (``path`` itself or one of
    its parents) is a reason, and so is a directory in which no file can be created, which is
    tried for real with a temporary file (permission bits, read-only mounts, pseudo file
    systems and root all answer the same way).
    """
    existing = Path(path).absolute()
    while True:
        try:
            existing.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            existing = existing.parent  # the filesystem root always exists
        except OSError as e:
            return f"cannot access {existing} ({e.strerror or e})"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})"
    return None


def load_config(path: str | os.PathLike) -> tuple[_BaseConfig, str]:
    """``(config, head)`` stored in a :func:`save_pretrained` directory."""
    meta = json.loads((Path(path) / "config.json").read_text())
    fmt = meta.pop("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"{path}: format {fmt!r} is not {FORMAT!r}")
    archs = meta.pop("architectures", None) or ["ForImageClassification"]
    return _BaseConfig.from_dict(meta), _head_of(archs[0])


def load_pretrained(path: str | os.PathLike, *, head: str | None = None, dtype: str | None = None,
                    param_dtype: str | None = None, na_backend: str | None = None,
                    seed: int = 0) -> nnx.Module:
    """Rebuild the model saved at ``path``.

    Args:
      path: a directory written by :func:`save_pretrained` (or the converter).
      head: "classification", "base" or "backbone"; defaults to the saved model's. A checkpoint
        loads into a smaller head too, dropping the weights that head does not use (classifier
        -> base or backbone, base -> backbone; a backbone's feature-map norms are then newly
        initialized, with a warning, as transformers does); a larger head is a ValueError.
      dtype, param_dtype, na_backend: override the saved config (e.g. ``dtype="bfloat16"``).
      seed: seeds the dropout streams (used only with ``deterministic=False``).

    Returns:
      The module with the saved parameters (nothing is randomly initialized and then thrown
      away: the structure comes from ``nnx.eval_shape``).
    """
    import dataclasses

    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    config, saved_head = load_config(path)
    overrides = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype,
                                       na_backend=na_backend).items() if v is not None}
    config = dataclasses.replace(config, **overrides)
    head = head or saved_head
    graphdef, abstract_params, rest = abstract_model(config, head, seed)

    if head not in _LOADS_INTO[saved_head]:
        raise ValueError(f"checkpoint {path} holds a {saved_head!r} model, which lacks weights "
                         f"the {head!r} head needs; load it with head= one of "
                         f"{', '.join(map(repr, _LOADS_INTO[saved_head]))}")
    with ocp.StandardCheckpointer() as ckpt:
        stored = _tree_meta(ckpt.metadata(path / "params"))
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
        values = ckpt.restore(path / "params", target)
    want = nnx.to_pure_dict(abstract_params)
    if head != saved_head:
        values = _into_smaller_head(values, want, saved_head, config, seed, path)
    _check_tree(want, values, path)
    values = jax.tree.map(lambda t, v: jnp.asarray(v, t.dtype), want, _like(want, values))
    nnx.replace_by_pure_dict(abstract_params, values)
    return nnx.merge(graphdef, abstract_params, rest)


# Which heads a checkpoint of each head loads into: the same, or a smaller one (the saved
# weights it does not use are dropped; a backbone's feature norms are new, as in transformers).
_LOADS_INTO = {"classification": ("classification", "base", "backbone"),
               "base": ("base", "backbone"), "backbone": ("backbone",)}
_NEW_IN_BACKBONE = "hidden_states_norms"


def _into_smaller_head(values: dict, want: dict, saved_head: str, config: _BaseConfig,
                       seed: int, path: Path) -> dict:
    """The saved ``values`` reduced to the entries of a smaller head's tree ``want``."""
    if saved_head == "classification":
        values = values[config.model_type]  # the classifier's base-model subtree
    dropped = sorted(set(values) - set(want))
    values = {k: v for k, v in values.items() if k in want}
    if _NEW_IN_BACKBONE in want and _NEW_IN_BACKBONE not in values:
        # The feature-map norms exist only in backbones: initialized like a new model's.
        cls = model_class_for(config, "backbone")
        values[_NEW_IN_BACKBONE] = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
            cls(config, rngs=nnx.Rngs(seed)), nnx.Param))[_NEW_IN_BACKBONE])()
        logging.getLogger(__name__).warning(
            "%s: %s newly initialized (a %s checkpoint has no backbone feature norms); "
            "unused saved weights dropped: %s", path, _NEW_IN_BACKBONE, saved_head,
            ", ".join(dropped) or "none")
    return values


def abstract_model(config: _BaseConfig, head: str = "classification", seed: int = 0):
    """``(graphdef, abstract_params, rest)`` of a model without allocating its parameters.

    ``abstract_params`` is the ``nnx.Param`` state as shapes (from ``nnx.eval_shape``), to be
    filled with ``nnx.replace_by_pure_dict`` and joined with ``nnx.merge(graphdef, params,
    rest)``. ``rest`` is the non-parameter state (dropout RNG keys/counts), cheap enough to build
    for real under jit, where XLA drops the unused parameter initializers.
    """
    cls = model_class_for(config, head)

    def build():
        return cls(config, rngs=nnx.Rngs(seed))

    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    return graphdef, abstract_params, rest


def _tree_meta(meta):
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def _key(k):
    return getattr(k, "key", getattr(k, "idx", k))


def _like(want, have):
    """``have`` re-nested with ``want``'s keys (Orbax may hand back list indices as strings)."""
    def pick(path, _):
        node = have
        for k in map(_key, path):
            node = node[k] if k in node else node[str(k)]
        return node
    return jax.tree_util.tree_map_with_path(pick, want)


def _check_tree(want, have, path) -> None:
    """Same parameter paths and shapes as the model, with a readable error otherwise."""
    def flat(tree):
        return {"/".join(str(_key(k)) for k in p): tuple(leaf.shape)
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want, have = flat(want), flat(have)
    if want != have:
        missing = sorted(set(want) - set(have))[:5]
        extra = sorted(set(have) - set(want))[:5]
        shapes = [k for k in want if k in have and want[k] != have[k]][:5]
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, "
                         f"unexpected {extra}, shape mismatch {shapes}")
