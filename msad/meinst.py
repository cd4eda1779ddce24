"""MEInst's mask branch on the FCOS head (Zhang et al., CVPR 2020): targets, loss and decoding of the mask code.

Instance segmentation is one of the instance-level tasks the paper applies MSAD to (Sec. 1); the mask output is
one more field of the shared head (fcos_head.HeadOutputs.mask_codes, B x L x D), so the pyramid shift (Sec. 3.1),
the shared head, C-FF (Sec. 3.3) and the feature distillation (Sec. 3.4) are unchanged:
  * targets: every positive location regresses the code of its object's mask (masks.MaskCode.encode of the
    28 x 28 crop inside its box). Locations come from the HR frame, so the LR and HR branches (and the student)
    share the mask targets as they share the box targets;
  * loss, as the released MEInst (MSE, weight 1): sum over the D code values of (pred - target)^2, weighted by the
    location's centre-ness target and divided by D x the centre-ness sum (all-reduced over processes, floor 1);
  * decoding: the code at each kept detection -> a 28 x 28 mask in its box (MaskCode.decode) -> pasted into the
    image at its original size (`paste_masks`, bilinear, >= 0.5).
"""
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

MASK_HEADS = ("none", "meinst")
PASTE_CHUNK = 16  # instances pasted at once: a chunk's sampling grid is 16 x H x W x 2 floats


def code_targets(code, masks_list: list, gt: torch.Tensor) -> torch.Tensor:
    """B x L x D: the code of each location's object. masks_list: per image N_i x M x M uint8 (the boxes' order);
    gt: B x L, the index of each location's box (0 off the positives, as Targets.gt: those targets are never
    used).

    Each object is encoded once (with the released soft-target noise, fresh at every call) and its code gathered by
    every location that regresses it: B x N x D work, not B x L x M^2."""
    B, n_max = gt.shape[0], max([1] + [len(m) for m in masks_list])
    size = code.size
    masks = torch.zeros(B, n_max, size, size, device=gt.device)
    for b, m in enumerate(masks_list):  # one copy per image, not per object
        masks[b, : len(m)] = m
    with torch.autocast(gt.device.type, enabled=False):  # targets in float32 under --amp too
        codes = code.encode(masks.flatten(0, 1)).view(B, n_max, -1)  # B x N x D
    return codes.gather(1, gt[..., None].expand(-1, -1, codes.shape[-1]))  # B x L x D


def mask_loss(pred: torch.Tensor, target: torch.Tensor, ctr_t: torch.Tensor, ctr_sum: torch.Tensor) -> torch.Tensor:
    """MEInst's MSE: sum_l ctr_l * sum_d (pred - target)^2 / max(D * ctr_sum, 1). pred, target: B x L x D; ctr_t:
    B x L centre-ness targets, zero off the positives; ctr_sum: their sum, averaged over processes."""
    per_location = ((pred.float() - target) ** 2).sum(-1)  # B x L
    return (per_location * ctr_t).sum() / (ctr_sum * pred.shape[-1]).clamp(min=1.0)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, size, threshold: float = 0.5) -> torch.Tensor:
    """n x M x M mask probabilities inside their boxes (x0, y0, x1, y1, image pixels) -> n x h x w bool masks of
    the image of `size` (h, w): each image pixel centre samples its box's mask bilinearly (outside the box: 0),
    then >= threshold, as detectron2's paste. Tensor ops (grid_sample), PASTE_CHUNK instances at a time."""
    h, w = int(size[0]), int(size[1])
    out = torch.zeros(masks.shape[0], h, w, dtype=torch.bool, device=masks.device)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5  # pixel centres
    ys = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5
    for start in range(0, masks.shape[0], PASTE_CHUNK):
        m, b = masks[start:start + PASTE_CHUNK].float(), boxes[start:start + PASTE_CHUNK].float()
        x0, y0, x1, y1 = (b[:, k, None] for k in range(4))  # n x 1
        gx = (xs - x0) / (x1 - x0).clamp(min=1e-6) * 2 - 1  # n x w, -1 and 1 at the box's sides
        gy = (ys - y0) / (y1 - y0).clamp(min=1e-6) * 2 - 1  # n x h
        grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], dim=3)  # n x h x w x 2
        out[start:start + PASTE_CHUNK] = F.grid_sample(m[:, None], grid, align_corners=False)[:, 0] >= threshold
    return out


def encode_rle(masks: torch.Tensor) -> list:
    """n x h x w bool -> COCO compressed RLEs ({"size": [h, w], "counts": str}), as results files hold them."""
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]
