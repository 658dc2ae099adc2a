def __getattr__(name):
    """Dataset classes timm names at import time; none is usable here."""
    return type(name, (), {"__init__": _unavailable})


def _unavailable(self, *args, **kwargs):
    raise NotImplementedError("torchvision stand-in: datasets are not available")
