"""Training configs: one Python file per config, each with ``get_config() -> ConfigDict``.

``get_config("nat_mini")`` returns a fresh ConfigDict; a path to a ``.py`` file with a
``get_config`` function works too (your own config outside the package). Overrides from the
command line are applied by :func:`apply_overrides`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections

# name -> module; explicit so every config can be found with grep.
CONFIGS: dict[str, str] = {
    "nat_mini": "nat_jax.train.configs.nat_mini",
    "nat_tiny": "nat_jax.train.configs.nat_tiny",
    "nat_small": "nat_jax.train.configs.nat_small",
    "nat_base": "nat_jax.train.configs.nat_base",
    "dinat_mini": "nat_jax.train.configs.dinat_mini",
    "dinat_tiny": "nat_jax.train.configs.dinat_tiny",
    "dinat_small": "nat_jax.train.configs.dinat_small",
    "dinat_base": "nat_jax.train.configs.dinat_base",
    "dinat_large": "nat_jax.train.configs.dinat_large",
    "digits": "nat_jax.train.configs.digits",
}


def get_config(name: str) -> ml_collections.ConfigDict:
    """A fresh config by name (see ``CONFIGS``) or from a ``.py`` file path."""
    if name.endswith(".py") and os.path.exists(name):
        spec = importlib.util.spec_from_file_location("_user_train_config", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name in CONFIGS:
        module = importlib.import_module(CONFIGS[name])
    else:
        raise ValueError(f"config {name=!r} is neither a known config ({', '.join(CONFIGS)}) "
                         "nor an existing .py file")
    return module.get_config()


def _coerce(text: str, current):
    """Parses ``text`` into the type of ``current`` (the field's present value)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(float(text)) if "e" in text.lower() else int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text)
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    # None / placeholders / dicts: a Python literal if it parses, else the raw string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]
                    ) -> ml_collections.ConfigDict:
    """Sets ``config.a.b = value`` for each ``"a.b": "value"`` with the field's type.

    Unknown fields are an error except below ``model_overrides`` (any model config field).
    """
    for dotted, text in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"config override {dotted!r}: no field {part!r}")
            node = node[part]
        if leaf not in node:
            if parents[:1] != ["model_overrides"]:
                raise ValueError(f"config override {dotted!r}: no field {leaf!r} "
                                 f"(known: {', '.join(sorted(node.keys()))})")
            node[leaf] = _coerce(text, None)
            continue
        current = node[leaf]
        if isinstance(node, ml_collections.ConfigDict) and current is None:
            field_type = node.get_type(leaf) if hasattr(node, "get_type") else None
            value = _coerce(text, field_type() if field_type in (int, float, str, bool) else None)
        else:
            try:
                value = _coerce(text, current)
            except ValueError as e:
                raise ValueError(f"config override {dotted}={text!r}: {e}") from None
        node[leaf] = value
    return config
