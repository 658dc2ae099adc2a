"""Import stand-in for torchvision, for ``benchmarks/peers.py`` only.

timm imports torchvision at module level (transforms, ``ops.misc.FrozenBatchNorm2d``), and no
torchvision wheel imports beside the CPU torch wheel this project pins. The benchmark only builds
timm models from code (no transforms, datasets or torchvision ops run), so these modules only have
to satisfy the imports; anything else raises when used.
"""

__version__ = "0.0.0+standin"


def __getattr__(name):
    raise AttributeError(f"torchvision stand-in (benchmarks only) has no {name!r}")
