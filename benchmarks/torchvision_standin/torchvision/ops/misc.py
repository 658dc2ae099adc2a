import torch


class FrozenBatchNorm2d(torch.nn.Module):
    """Never instantiated by the models the benchmark builds; present for timm's import."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision stand-in: FrozenBatchNorm2d is not available")
