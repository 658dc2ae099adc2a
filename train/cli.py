"""Train NAT/DiNAT: ``nat-jax train --config NAME --workdir DIR [--config.FIELD=VALUE ...]``.

NAME is a config of ``nat_jax.train.configs`` (nat_mini ... dinat_large, digits) or a path to
your own ``.py`` file with ``get_config()``. Any config field can be overridden, with the type of
its current value: ``--config.learning_rate=5e-4 --config.aug.mixup_alpha=0
--config.model_overrides.drop_path_rate=0.1``. Running again with the same workdir resumes
from the latest checkpoint. Multi-host: pass ``--distributed`` (or set NAT_JAX_DISTRIBUTED=1)
on every host; see the README.

Examples::

    nat-jax train --config digits --workdir runs/digits
    nat-jax train --config nat_mini --workdir runs/nat_mini --config.data_dir=~/tensorflow_datasets
    nat-jax train --config nat_mini --workdir runs/flowers --config.dataset=image_folder \\
        --config.data_dir=~/flowers --config.num_classes=-1 --config.eval_split=val
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="config name (e.g. digits, nat_mini) or path to a .py config")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints, metrics.jsonl, TensorBoard logs and the curve go here")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (one process per host)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the final config (after overrides) and exit")
    parser.epilog = "Config overrides: --config.FIELD=VALUE (any field, nested with dots)."
    # argparse cannot declare "--config.<anything>", so this subparser peels those pairs off
    # before parsing the rest and hands them over as args.config_overrides.
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        rest, overrides = split_overrides(list(sys.argv[1:] if args is None else args))
        namespace, extras = parse_known(rest, namespace)
        namespace.config_overrides = overrides
        return namespace, extras

    parser.parse_known_args = parse_known_args


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates ``--config.a.b=value`` / ``--config.a.b value`` pairs from other arguments."""
    rest: list[str] = []
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"nat-jax train: {arg} needs a value")
                value = argv[i + 1]
                i += 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def run(args: argparse.Namespace) -> int:
    from nat_jax.train import configs, trainer
    from nat_jax.train.errors import UserInputError

    try:
        config = configs.get_config(args.config)
        configs.apply_overrides(config, getattr(args, "config_overrides", {}))
    except UserInputError as e:
        print(f"nat-jax train: {e}", file=sys.stderr)
        return 1
    if args.distributed:
        config.distributed = True
    if args.print_config:
        print(config)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nat_jax.train").setLevel(logging.INFO)  # derived durations etc.
    try:
        metrics = trainer.train_and_evaluate(config, args.workdir)
    except (trainer.NonFiniteLossError, UserInputError) as e:
        print(f"nat-jax train: {e}", file=sys.stderr)
        return 1
    shown = {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in metrics.items()}
    print("Final metrics: " + json.dumps(shown, sort_keys=True), flush=True)
    return 0
