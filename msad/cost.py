"""Inference cost of a detector, reported with every evaluation: parameters and FLOPs per image.

The point of a low-resolution detector (MSAD Sec. 1) is to be cheap at test time, so every evaluation states
what the evaluated model costs. FLOPs come from `torch.utils.flop_counter` (convolutions and matrix products,
2 FLOPs per multiply-add; bias adds, norms, activations, decoding and NMS are not counted), measured on one
real batch and divided by its image count. They therefore depend on the image size (the padded batch).
"""
import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the model (not buffers: FrozenBN statistics and affines are left out)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flops_per_image(model: torch.nn.Module, batch) -> float:
    """FLOPs of one inference forward of `model` on `batch` (an ImageBatch), divided by its image count."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(batch)
    return counter.get_total_flops() / batch.images.shape[0]


def model_cost(model: torch.nn.Module, batch) -> dict:
    """{"params_m": millions of parameters, "gflops": GFLOPs per image on `batch`} for the metrics line
    ({} without a batch: no readable image)."""
    if batch is None:
        return {}
    return {"params_m": round(count_params(model) / 1e6, 4), "gflops": round(flops_per_image(model, batch) / 1e9, 4)}
