from torchvision.transforms import functional  # noqa: F401
from torchvision.transforms.functional import InterpolationMode  # noqa: F401


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision stand-in: transforms are not available")


def __getattr__(name):
    return type(name, (_Unavailable,), {})
