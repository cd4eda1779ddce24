"""The pyramid shift that aligns a half-resolution branch with a full-resolution one (MSAD Sec. 3.1, Fig. 1b).

Level P_l has stride 2^l. If the low-resolution (LR) input is exactly half the high-resolution (HR)
input, LR P_l has the spatial size of HR P_(l+1). So a branch at input scale 1/2 uses P2..P6 where the
HR branch uses P3..P7, and position i pairs (HR P_(3+i), LR P_(2+i)). In the HR frame both branches then
have the same location grid, strides 8..128 and size ranges, hence identical FCOS targets. That shared
HR-frame grid (`locations`) is built here, once for every branch: the losses assign targets on it and the
decoding reads boxes off it.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

INF = float("inf")
HR_LEVELS = (3, 4, 5, 6, 7)
# Sizes of interest of the five level positions, in HR-frame pixels (FCOS Sec. 3.2).
SIZE_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))
HR_PAD = 2 ** HR_LEVELS[-1]  # pad the HR batch to a multiple of the P7 stride (128)
LR_MODES = ("nearest", "antialias")


def pyramid_offset(input_scale: float) -> int:
    """Levels to shift down for a branch whose input is `input_scale` x the HR input (1 -> 0, 0.5 -> -1)."""
    offset = math.log2(input_scale)
    if offset != round(offset) or offset > 0:
        raise ValueError(f"input scale {input_scale} does not keep the 2x pyramid alignment (use 1 or 0.5)")
    return int(offset)


def branch_levels(input_scale: float = 1.0):
    """Pyramid levels a branch uses: (3..7) at full resolution, (2..6) at half resolution."""
    return tuple(l + pyramid_offset(input_scale) for l in HR_LEVELS)


def hr_strides():
    """Strides of the level positions in HR-frame pixels (8..128), shared by every aligned branch."""
    return [2 ** l for l in HR_LEVELS]


class Geometry(NamedTuple):
    """The HR-frame location grid of a pyramid with L = sum_i h_i * w_i locations (level-major, row-major)."""
    points: torch.Tensor  # L x 2, (x, y) of each location
    strides: torch.Tensor  # L, its level's stride
    ranges: torch.Tensor  # L x 2, its level's size range [lo, hi]
    shapes: list  # (h_i, w_i) per level position


def make_points(shapes, strides, device, offset: bool = True, canvas=None):
    """Location centres of every level: points [L, 2] (x, y) and strides [L].

    (j*s + s//2, i*s + s//2) as in the released code (FCOS Sec. 3.1); (j*s, i*s) with offset=False. With the
    canvas (H, W) given, the steps are H // h and W // w, as torchvision's AnchorGenerator places them (61 px
    for P6 on an 800 px side padded to 32); they are s on a canvas of multiples of 128. `strides` stay s.
    """
    points, point_strides = [], []
    for (h, w), s in zip(shapes, strides):
        shift = s // 2 if offset else 0
        sy, sx = (canvas[0] // h, canvas[1] // w) if canvas is not None else (s, s)
        ys = torch.arange(h, device=device, dtype=torch.float32) * sy + shift
        xs = torch.arange(w, device=device, dtype=torch.float32) * sx + shift
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.flatten(), yy.flatten()], dim=1))  # h*w x 2
        point_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(points), torch.cat(point_strides)


def level_ranges(shapes, ranges=SIZE_RANGES, device=None):
    """Per-location [lo, hi] size range: L x 2."""
    out = torch.cat([torch.tensor([r], dtype=torch.float32).expand(h * w, 2) for (h, w), r in zip(shapes, ranges)])
    return out.to(device, non_blocking=True)  # from pageable memory: staged at once, no wait for the GPU


def locations(feats, center_offset: bool = True, canvas=None) -> Geometry:
    """The HR-frame grid of an aligned pyramid (HR P3..P7, LR P2..P6 or fused): the same for every branch.
    canvas: the HR canvas (H, W) for torchvision's placement (make_points), None for ours."""
    shapes = [tuple(f.shape[-2:]) for f in feats]
    device = feats[0].device
    points, strides = make_points(shapes, hr_strides(), device, center_offset, canvas)
    return Geometry(points, strides, level_ranges(shapes, device=device), shapes)


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
