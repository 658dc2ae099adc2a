"""``nat-jax`` command line: one subcommand per user task.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) ->
int``; modules are imported only when their subcommand runs, so ``nat-jax --help`` stays fast
and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("nat_jax.demo", "compare the neighborhood-attention backends on a few shapes"),
    "convert": ("nat_jax.convert.cli", "convert PyTorch NAT/DiNAT weights (HF or SHI-Labs) to "
                "a nat-jax checkpoint"),
    "export": ("nat_jax.convert.export_cli", "export a nat-jax checkpoint as an HF model "
               "directory (safetensors)"),
    "train": ("nat_jax.train.cli", "train NAT/DiNAT from a config (ImageNet, an image folder, "
              "or the digits demo)"),
}


def _module_doc(module: str) -> str:
    return (importlib.import_module(module).__doc__ or "").strip()


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nat-jax",
        description="NAT / DiNAT neighborhood attention transformers in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            mod = importlib.import_module(module)
            p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.add_arguments(p)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own: restart with malloc's huge pages (nat_jax.host)
        from nat_jax import host
        host.relaunch_with_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
