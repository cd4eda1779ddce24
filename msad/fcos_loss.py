"""FCOS target assignment and losses (FCOS Sec. 3.1-3.3, AdelaiDet's improved variant; method.md Sec. 6).

Assignment runs on the whole batch at once: ground truth is padded to B x M boxes and every test is a
B x L x M tensor operation, so there is no Python loop over images, boxes or locations.
MSAD Sec. 3.1: the targets depend only on the HR geometry, so the teacher computes them once and all
three branches (HR, LR, fused) and the student reuse them.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dist

INF = float("inf")
# Sizes of interest of the five level positions, in HR-frame pixels (FCOS Sec. 3.2).
SIZE_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


@dataclass
class Targets:
    labels: torch.Tensor  # B x L, contiguous class or -1 for background
    ltrb: torch.Tensor  # B x L x 4, regression targets divided by the location's stride
    pos: torch.Tensor  # B x L bool

    @property
    def centerness(self):
        """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) (FCOS Eq. 3); 1 at a box centre. B x L."""
        lr, tb = self.ltrb[..., 0::2], self.ltrb[..., 1::2]
        ratio = (lr.min(-1).values / lr.max(-1).values.clamp(min=1e-12)) * (tb.min(-1).values / tb.max(-1).values.clamp(min=1e-12))
        return ratio.clamp(min=0).sqrt()


def level_ranges(shapes, ranges=SIZE_RANGES, device=None):
    """Per-location [lo, hi] size range: L x 2."""
    return torch.cat([torch.tensor([r], device=device, dtype=torch.float32).expand(h * w, 2)
                      for (h, w), r in zip(shapes, ranges)])


def pad_boxes(boxes_list, labels_list, device):
    """Lists of [n_i, 4] / [n_i] -> B x M x 4 boxes, B x M labels, B x M valid mask (M >= 1)."""
    M = max([1] + [len(b) for b in boxes_list])
    B = len(boxes_list)
    boxes = torch.zeros(B, M, 4, device=device)
    labels = torch.full((B, M), -1, dtype=torch.long, device=device)
    for i, (b, l) in enumerate(zip(boxes_list, labels_list)):  # one copy per image, not per box
        boxes[i, : len(b)] = b
        labels[i, : len(l)] = l
    return boxes, labels, labels >= 0


@torch.no_grad()
def assign_targets(points, strides, ranges, boxes_list, labels_list, center_radius=1.5) -> Targets:
    """FCOS assignment with centre sampling.

    points [L, 2], strides [L], ranges [L, 2] in one coordinate frame; boxes in the same frame.
    A location is positive for a box if it lies strictly inside the box's centre region (a square of
    half-side radius*stride around the box centre, clipped to the box) and max(l, t, r, b) is within its
    level's range (both ends inclusive). Ties go to the box of smallest area.
    """
    boxes, labels, valid = pad_boxes(boxes_list, labels_list, points.device)  # B x M x 4
    x, y = points[None, :, 0, None], points[None, :, 1, None]  # 1 x L x 1
    x0, y0, x1, y1 = (boxes[:, None, :, k] for k in range(4))  # B x 1 x M
    ltrb = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=-1)  # B x L x M x 4
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = (strides * center_radius)[None, :, None]  # 1 x L x 1
    in_center = ((x > torch.maximum(cx - radius, x0)) & (x < torch.minimum(cx + radius, x1))
                 & (y > torch.maximum(cy - radius, y0)) & (y < torch.minimum(cy + radius, y1)))  # B x L x M
    max_reg = ltrb.max(-1).values
    in_range = (max_reg >= ranges[None, :, 0, None]) & (max_reg <= ranges[None, :, 1, None])
    area = ((x1 - x0) * (y1 - y0)).expand_as(max_reg)
    area = torch.where(in_center & in_range & valid[:, None, :], area, torch.full_like(area, INF))
    min_area, gt = area.min(dim=2)  # B x L
    pos = min_area < INF
    target_labels = torch.where(pos, labels.gather(1, gt), torch.full_like(gt, -1))
    target_ltrb = ltrb.gather(2, gt[..., None, None].expand(-1, -1, 1, 4)).squeeze(2) / strides[None, :, None]
    return Targets(target_labels, target_ltrb, pos)


def sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0):
    """Focal loss (RetinaNet Eq. 5) summed over all elements."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    a_t = alpha * onehot + (1 - alpha) * (1 - onehot)
    return (a_t * ce * (1 - p_t) ** gamma).sum()


def giou_loss_ltrb(pred, target, weight):
    """Weighted sum of 1 - GIoU for boxes given as distances (l, t, r, b) from a shared point.

    Uses AdelaiDet's IOULoss smoothing: IoU = (inter + 1) / (union + 1).
    """
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (torch.minimum(pt, tt) + torch.minimum(pb, tb))
    enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb)) + 1e-7
    union = pred_area + target_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    giou = iou - (enclose - union) / enclose
    return ((1 - giou) * weight).sum()


def fcos_losses(cls, box, ctr, targets: Targets, prefix=""):
    """The FCOS loss of one branch: focal / N_pos, GIoU weighted by centre-ness / sum of centre-ness,
    centre-ness BCE / N_pos. N_pos and the centre-ness sum are averaged over processes (floors 1 and 1e-6);
    every process issues the same all-reduce even with zero positives, so DDP cannot hang.
    cls [B, L, K], box [B, L, 4], ctr [B, L] from FCOSHead; returns {prefix+"loss_cls", ...}.
    """
    pos = targets.pos
    onehot = F.one_hot(targets.labels.clamp(min=0), cls.shape[-1]).to(cls.dtype) * pos[..., None]  # B x L x K
    ctr_t = targets.centerness[pos]  # P
    norms = dist.all_reduce_mean(torch.stack([pos.sum().float(), ctr_t.sum().float()]))
    num_pos, ctr_sum = norms[0].clamp(min=1.0), norms[1].clamp(min=1e-6)
    loss_cls = sigmoid_focal_loss(cls.float(), onehot.float()) / num_pos
    # Indexing with an empty mask still links every head parameter to the graph (zero gradient), as DDP needs.
    loss_box = giou_loss_ltrb(box[pos].float(), targets.ltrb[pos], ctr_t) / ctr_sum
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos].float(), ctr_t, reduction="sum") / num_pos
    return {f"{prefix}loss_cls": loss_cls, f"{prefix}loss_box": loss_box, f"{prefix}loss_ctr": loss_ctr}
