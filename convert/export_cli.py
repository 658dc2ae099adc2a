"""Export a nat-jax checkpoint as an HF model directory (config.json + model.safetensors).

transformers 4.53.x loads the result with NatForImageClassification.from_pretrained(OUT_DIR)
(DinatForImageClassification for DiNAT), so weights trained or converted with nat-jax can be
used from PyTorch. OUT_DIR is written atomically.

example:
  nat-jax export nat_mini nat_mini_hf
"""

from __future__ import annotations

import argparse

from nat_jax.convert.cli import print_error, print_summary
from nat_jax.convert.loading import ConversionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="nat-jax checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist)")
    parser.add_argument("--format", default="hf", choices=("hf",),
                        help="output format (default: hf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no summary")


def run(args: argparse.Namespace) -> int:
    from nat_jax.convert.pipeline import export
    try:
        result = export(args.ckpt, args.out_dir, format=args.format, overwrite=args.overwrite)
    except ConversionError as e:
        return print_error(e)
    if not args.quiet:
        print_summary(result, "nat-jax export")
    return 0
