"""The pyramid shift that aligns a half-resolution branch with a full-resolution one (MSAD Sec. 3.1, Fig. 1b).

Level P_l has stride 2^l. If the low-resolution (LR) input is exactly half the high-resolution (HR)
input, LR P_l has the spatial size of HR P_(l+1). So a branch at input scale 1/2 uses P2..P6 where the
HR branch uses P3..P7, and position i pairs (HR P_(3+i), LR P_(2+i)). In the HR frame both branches then
have the same location grid, strides 8..128 and size ranges, hence identical FCOS targets.
"""
import math

import torch
import torch.nn.functional as F

HR_LEVELS = (3, 4, 5, 6, 7)
HR_PAD = 2 ** HR_LEVELS[-1]  # pad the HR batch to a multiple of the P7 stride (128)
LR_MODES = ("nearest", "antialias")


def pyramid_offset(input_scale: float) -> int:
    """Levels to shift down for a branch whose input is `input_scale` x the HR input (1 -> 0, 0.5 -> -1)."""
    offset = math.log2(input_scale)
    if offset != round(offset) or offset > 0:
        raise ValueError(f"input scale {input_scale} does not keep the 2x pyramid alignment (use 1 or 0.5)")
    return int(offset)


def branch_levels(input_scale: float = 1.0, hr_levels=HR_LEVELS):
    """Pyramid levels a branch uses: (3..7) at full resolution, (2..6) at half resolution."""
    return tuple(l + pyramid_offset(input_scale) for l in hr_levels)


def hr_strides(hr_levels=HR_LEVELS):
    """Strides of the level positions in HR-frame pixels (8..128), shared by every aligned branch."""
    return [2 ** l for l in hr_levels]


def make_low_res(images: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """The LR batch: a 0.5x resize of the padded, normalised HR batch (B x 3 x H x W -> B x 3 x H/2 x W/2).

    `nearest` is what the released code does (it keeps every other pixel); `antialias` is a bilinear
    anti-aliased resize, a cleaner downsampling that this project offers as an option.
    """
    H, W = images.shape[-2:]
    if H % 2 or W % 2:
        raise ValueError(f"HR batch {H}x{W} is not divisible by 2; pad it to a multiple of {HR_PAD}")
    if mode == "nearest":
        return images[..., ::2, ::2]  # exactly F.interpolate(scale_factor=0.5, mode="nearest"), without a kernel
    if mode == "antialias":
        return F.interpolate(images, size=(H // 2, W // 2), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"--low-res-mode must be one of {LR_MODES}, got {mode!r}")


def check_aligned(hr_feats, lr_feats) -> None:
    """Every aligned pair must have the same spatial size; never interpolate to force a match (Sec. 3.1)."""
    if len(hr_feats) != len(lr_feats):
        raise ValueError(f"aligned pyramids differ in length: {len(hr_feats)} vs {len(lr_feats)}")
    for i, (h, l) in enumerate(zip(hr_feats, lr_feats)):
        if h.shape != l.shape:
            raise ValueError(f"level position {i}: HR P{HR_LEVELS[i]} {tuple(h.shape)} != LR P{HR_LEVELS[i] - 1} "
                             f"{tuple(l.shape)}; the HR batch must be padded to a multiple of {HR_PAD}")
