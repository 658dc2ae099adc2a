"""PyTorch NAT/DiNAT checkpoints <-> nat-jax checkpoints (``nat-jax convert`` / ``nat-jax export``).

Python API::

    from nat_jax.convert import convert, convert_model, export
    convert("nat-mini-in1k-224/", "nat_mini_jax")                  # HF directory
    convert("nat_mini.pth", "nat_mini_jax", arch="nat_mini")       # original SHI-Labs file
    model, result = convert_model("nat-mini-in1k-224/")            # in memory, nothing written
    export("nat_mini_jax", "nat_mini_hf")                          # back to an HF directory

Pickled files are read without torch by an unpickler that only rebuilds tensors
(:mod:`nat_jax.convert.torch_pickle`); torch is needed only for ``--verify``. The key map lives in
:mod:`nat_jax.convert.keymap`.
"""

from nat_jax.convert.keymap import KeyMismatchError
from nat_jax.convert.loading import ConversionError
from nat_jax.convert.pipeline import Result, convert, convert_model, export

__all__ = ["ConversionError", "KeyMismatchError", "Result", "convert", "convert_model", "export"]
