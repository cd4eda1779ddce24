"""ImageNet statistics of the backbone weights and the model's first step, `normalize`.

The data pipeline keeps images uint8 up to the device (4x less traffic than float); the model normalises them.
"""
import functools

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, 0..1 scale (torchvision ResNet weights)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device):
    """ImageNet mean and std on `device`, 0..255 scale: made once, so normalize never waits on a copy."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1).mul(255).to(device)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1).mul(255).to(device)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) B x 3 x H x W -> float32 (x / 255 - mean) / std, on the images' device."""
    # While torch.export traces, tensors are fake: made fresh (graph constants), never cached.
    mean, std = _mean_std.__wrapped__(images.device) if torch.compiler.is_compiling() else _mean_std(images.device)
    return (images.float() - mean) / std
