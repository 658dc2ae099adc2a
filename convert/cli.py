"""Convert a PyTorch NAT/DiNAT checkpoint into a nat-jax checkpoint.

SRC is an HF model directory (config.json + model.safetensors or pytorch_model.bin), or one
.safetensors/.pth/.pt/.bin file with HF or original SHI-Labs keys (flat, or wrapped in
'model' / 'state_dict'). Without a config.json, --arch names the preset: NAT vs DiNAT and the
dilations cannot be read off the weights. Pickles are read with torch.load(weights_only=True)
only. OUT is written atomically and is readable with nat_jax.load_pretrained(OUT).

examples:
  nat-jax convert nat-mini-in1k-224/ nat_mini
  nat-jax convert dinat_mini.pth dinat_mini --arch dinat_mini --verify
"""

from __future__ import annotations

import argparse
import sys

from nat_jax.convert.loading import ConversionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="HF model directory or checkpoint file")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    parser.add_argument("--arch", metavar="PRESET",
                        help="preset name (nat_mini ... dinat_large_384_k11); needed when SRC "
                             "has no config.json")
    parser.add_argument("--config", metavar="FILE",
                        help="config JSON (HF config.json or nat-jax) for weights of a custom "
                             "architecture; overrides a config.json in SRC")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter dtype of the output (default: float32)")
    parser.add_argument("--verify", action="store_true",
                        help="run the HF PyTorch model on a random image and compare outputs; "
                             "exit 1 (writing nothing) if they differ beyond --tolerance")
    parser.add_argument("--verify-size", type=int, default=None, metavar="N",
                        help="image side for --verify (default: the model's image_size)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="--verify tolerance relative to max(1, max|output|) "
                             "(default: 1e-4 for float32, 5e-2 for bfloat16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def print_error(error: Exception) -> int:
    """One line on stderr, no traceback; returns the exit code."""
    print(f"nat-jax: error: {error}", file=sys.stderr)
    return 1


def print_summary(result, title: str) -> None:
    """Short rich table: arch, head, params, dtype, verification, output, time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("arch", f"{result.arch} ({result.config.model_type}, {result.head})")
    table.add_row("source format", result.source_format)
    table.add_row("params", f"{result.num_params:,} ({result.num_params / 1e6:.1f}M)")
    table.add_row("dtype", result.dtype)
    if result.verify_diff is not None:
        table.add_row("verify", f"max rel |ours - PyTorch| = {result.verify_diff:.2e} "
                                f"(tolerance {result.verify_tolerance:g}): ok")
    table.add_row("output", str(result.out))
    table.add_row("time", f"{result.seconds:.1f} s")
    for note in result.notes:
        table.add_row("note", note)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    from nat_jax.convert.pipeline import convert
    try:
        result = convert(args.src, args.out, arch=args.arch, dtype=args.dtype,
                         verify=args.verify, overwrite=args.overwrite,
                         config=args.config, progress=not args.quiet,
                         verify_size=args.verify_size, tolerance=args.tolerance)
    except ConversionError as e:
        return print_error(e)
    if not args.quiet:
        print_summary(result, "nat-jax convert")
    return 0
