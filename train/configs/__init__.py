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

from nat_jax.train.errors import UserInputError

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
        raise UserInputError(f"config {name=!r} is neither a known config "
                             f"({', '.join(CONFIGS)}) nor an existing .py file")
    return module.get_config()


def _number(text: str, kind: type) -> int | float:
    """``text`` as an int (``1e3`` allowed, ``1.5`` not) or a float."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got "
                         f"{text!r}") from None
    if kind is int:
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        return int(value)
    return value


def _coerce(text: str, current, *, fixed_length: bool = False):
    """Parses ``text`` into the type of ``current`` (the field's present value).

    Tuples must be written as tuples (``(0.5,)`` for one element; a bare ``0.5`` is an error,
    not a silent 1-tuple); with ``fixed_length`` they keep ``current``'s length, and numbers
    stay numbers.
    """
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, (int, float)):
        return _number(text, type(current))
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"expected a tuple like {tuple(current)}, got {text!r} (one "
                             "element is written (x,))")
        if fixed_length and len(value) != len(current):
            raise ValueError(f"expected {len(current)} values like {tuple(current)}, got "
                             f"{len(value)}")
        numeric = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in current]
        if current and all(numeric):
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
                raise ValueError(f"expected numbers like {tuple(current)}, got {text!r}")
            if all(isinstance(x, float) for x in current):
                value = [float(x) for x in value]
        return type(current)(value)
    return parse_value(text)


def parse_value(text: str):
    """A command-line value of no known type: a Python literal if it parses (``true`` /
    ``false`` as on a command line too), else the raw string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]
                    ) -> ml_collections.ConfigDict:
    """Sets ``config.a.b = value`` for each ``"a.b": "value"`` with the field's type.

    Unknown fields are an error except below ``model_overrides`` (any model config field) and
    ``xla_options`` (any XLA compiler option).
    Every error is a UserInputError naming the override.
    """
    for dotted, text in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise UserInputError(f"config override {dotted}: no field {part!r}")
            node = node[part]
        in_model = parents[:1] in (["model_overrides"], ["xla_options"])
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserInputError(f"config override {dotted}: {'.'.join(parents)} is not a "
                                 "group of fields")
        if leaf not in node:
            if not in_model:
                raise UserInputError(f"config override {dotted}: no field {leaf!r} "
                                     f"(known: {', '.join(sorted(node.keys()))})")
            node[leaf] = _coerce(text, None)
            continue
        current = node[leaf]
        try:
            if current is None:
                field_type = node.get_type(leaf) if hasattr(node, "get_type") else None
                value = _coerce(text, field_type() if field_type in (int, float, str, bool)
                                else None)
            else:
                value = _coerce(text, current, fixed_length=not in_model)
            node[leaf] = value
        except (ValueError, TypeError) as e:
            raise UserInputError(f"config override {dotted}={text!r}: {e}") from None
    return config
