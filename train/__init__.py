"""Training for NAT/DiNAT: configs, tfds/grain input, augmentation, sharded loop, checkpoints.

Python entry: ``nat_jax.train.train_and_evaluate(config, workdir) -> dict`` with a config from
``nat_jax.train.configs.get_config(name)``. Command line: ``nat-jax train --config NAME
--workdir DIR [--config.FIELD=VALUE ...]``.
"""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "train_and_evaluate"]


def __getattr__(name: str):
    # Lazy, so `import nat_jax.train.configs` (and `nat-jax train --help`) stay light.
    if name in __all__:
        from nat_jax.train import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'nat_jax.train' has no attribute {name!r}")
