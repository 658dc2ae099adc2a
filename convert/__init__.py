"""PyTorch NAT/DiNAT checkpoints <-> nat-jax checkpoints (``nat-jax convert`` / ``nat-jax export``).

Python API::

    from nat_jax.convert import convert, export
    convert("nat-mini-in1k-224/", "nat_mini_jax")                  # HF directory
    convert("nat_mini.pth", "nat_mini_jax", arch="nat_mini")       # original SHI-Labs file
    export("nat_mini_jax", "nat_mini_hf")                          # back to an HF directory

Pickled files are only read with ``torch.load(weights_only=True)``; see
:mod:`nat_jax.convert.loading`. The key map lives in :mod:`nat_jax.convert.keymap`.
"""

from nat_jax.convert.keymap import KeyMismatchError
from nat_jax.convert.loading import ConversionError
from nat_jax.convert.pipeline import Result, convert, export

__all__ = ["ConversionError", "KeyMismatchError", "Result", "convert", "export"]
