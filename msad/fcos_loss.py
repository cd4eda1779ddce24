"""FCOS target assignment and losses (FCOS Sec. 3.1-3.3, the released code's improved variant).

Assignment runs on the whole batch at once: ground truth is padded to B x M boxes and every test is a
tensor operation over (image, box, candidate location), so there is no Python loop over images, boxes or
locations. Only the few locations around each box centre can pass centre sampling, so those are the only
candidates (B x M x 180 instead of B x M x L pairs, L ~ 20k at 800 px).
MSAD Sec. 3.1: the targets depend only on the HR geometry, so the teacher computes them once and all
three branches (HR, LR, fused) and the student reuse them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dist
from .align import INF
from .meinst import code_targets, mask_loss



@dataclass
class Targets:
    labels: torch.Tensor  # B x L, contiguous class or -1 for background
    ltrb: torch.Tensor  # B x L x 4, regression targets divided by the location's stride
    pos: torch.Tensor  # B x L bool
    gt: torch.Tensor | None = None  # B x L, the index of each location's box in its image (0 off the positives)
    mask_codes: torch.Tensor | None = None  # B x L x D, the MEInst code of that box's mask (meinst.code_targets)

    @property
    def centerness(self):
        """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) (FCOS Eq. 3); 1 at a box centre. B x L."""
        lr, tb = self.ltrb[..., 0::2], self.ltrb[..., 1::2]
        ratio = (lr.min(-1).values / lr.max(-1).values.clamp(min=1e-12)) * (tb.min(-1).values / tb.max(-1).values.clamp(min=1e-12))
        return ratio.clamp(min=0).sqrt()


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


def _targets(points, strides, boxes, labels, pos, gt) -> Targets:
    """Targets from each location's winning box `gt` (B x L, any value where not `pos`)."""
    gt = torch.where(pos, gt, 0)
    target_labels = torch.where(pos, labels.gather(1, gt), -1)
    gt_boxes = boxes.gather(1, gt[..., None].expand(-1, -1, 4))  # B x L x 4
    px, py = points[None, :, 0], points[None, :, 1]  # 1 x L
    target_ltrb = torch.stack([px - gt_boxes[..., 0], py - gt_boxes[..., 1], gt_boxes[..., 2] - px,
                               gt_boxes[..., 3] - py], dim=-1) / strides[None, :, None]  # B x L x 4
    return Targets(target_labels, target_ltrb, pos, gt)


@torch.no_grad()
def assign_targets_dense(points, strides, ranges, boxes_list, labels_list, center_radius=1.5) -> Targets:
    """FCOS assignment with centre sampling (FCOS Sec. 3.1-3.2, the released code's improved variant): the
    definition, testing every (image, box, location) triple.

    points [L, 2], strides [L], ranges [L, 2] in one coordinate frame; boxes in the same frame.
    A location is positive for a box if it lies strictly inside the box's centre region (a square of
    half-side radius*stride around the box centre, clipped to the box) and max(l, t, r, b) is within its
    level's range (both ends inclusive). Ties go to the box of smallest area, then to the lower box index.
    Its B x M x L tensors are too big for training (L ~ 20k at 800 px); `assign_targets` computes the same.
    """
    boxes, labels, valid = pad_boxes(boxes_list, labels_list, points.device)  # B x M x 4
    M = labels.shape[1]
    x, y = points[:, 0], points[:, 1]  # L
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))  # B x M x 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = strides * center_radius  # L
    in_center = ((x > torch.maximum(cx - radius, x0)) & (x < torch.minimum(cx + radius, x1))
                 & (y > torch.maximum(cy - radius, y0)) & (y < torch.minimum(cy + radius, y1)))  # B x M x L
    max_reg = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=-1).max(-1).values  # B x M x L
    in_range = (max_reg >= ranges[:, 0]) & (max_reg <= ranges[:, 1])
    area = torch.where(in_center & in_range & valid[..., None], (x1 - x0) * (y1 - y0), INF)  # B x M x L
    min_area = area.min(1).values  # B x L
    box_index = torch.arange(M, device=points.device)[None, :, None]  # 1 x M x 1
    gt = torch.where(area == min_area[:, None], box_index, M).amin(1)  # B x L: the lowest index of the smallest
    return _targets(points, strides, boxes, labels, min_area < INF, gt)


@torch.no_grad()
def assign_targets(points, strides, ranges, boxes_list, labels_list, center_radius=1.5, *, shapes) -> Targets:
    """`assign_targets_dense`, computed only where it can be positive: the same Targets, bit for bit.

    Points laid out as `make_points` does, on levels of `shapes` ((h, w) per level). Only the n x n cells
    around each box centre on each level can pass centre sampling, so the same tests run on B x M x C
    candidates (C = levels * n * n, 180 at radius 1.5) instead of B x M x L pairs, and a scatter-min over
    locations picks the smallest box as the dense form's min over boxes does.
    """
    boxes, labels, valid = pad_boxes(boxes_list, labels_list, points.device)  # B x M x 4
    (B, M), L, device = labels.shape, points.shape[0], points.device
    # Candidates: a location within radius*s of the centre is at most ceil(radius) cells away from the cell
    # holding the centre (one more on the far side), on every level; one spare cell per side absorbs rounding.
    # Level layout built on the host and copied without waiting for the GPU (torch.tensor(..., device=cuda) syncs).
    first = torch.tensor([sum(h * w for h, w in shapes[:k]) for k in range(len(shapes))])  # V
    first, hw = first.to(device, non_blocking=True), torch.tensor(shapes).to(device, non_blocking=True)  # V, V x 2
    origin, step = points[first], strides[first, None]  # V x 2 (x, y of the level's first location), V x 1
    r = math.ceil(center_radius)
    offsets = torch.arange(-r, r + 2, device=device)  # n = 2r + 2 cells per axis
    centre = (boxes[..., None, :2] + boxes[..., None, 2:]) / 2  # B x M x 1 x 2
    cell = torch.floor((centre - origin) / step).long()  # B x M x V x 2 (j, i)
    j = cell[..., 0, None, None] + offsets  # B x M x V x 1 x n
    i = cell[..., 1, None, None] + offsets[:, None]  # B x M x V x n x 1
    h, w = hw[:, 0, None, None], hw[:, 1, None, None]  # V x 1 x 1
    on_grid = ((j >= 0) & (j < w) & (i >= 0) & (i < h)).flatten(2)  # B x M x C, C = V * n * n
    idx = torch.where(on_grid, (first[:, None, None] + i * w + j).flatten(2), 0)  # B x M x C flat location index
    # The tests of assign_targets_dense, on (image, box, candidate) triples: same arithmetic, same values.
    x, y = points[idx, 0], points[idx, 1]  # B x M x C
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))  # B x M x 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    radius = strides[idx] * center_radius
    in_center = ((x > torch.maximum(cx - radius, x0)) & (x < torch.minimum(cx + radius, x1))
                 & (y > torch.maximum(cy - radius, y0)) & (y < torch.minimum(cy + radius, y1)))
    max_reg = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=-1).max(-1).values  # B x M x C
    in_range = (max_reg >= ranges[idx, 0]) & (max_reg <= ranges[idx, 1])
    ok = on_grid & in_center & in_range & valid[..., None]
    area = torch.where(ok, (x1 - x0) * (y1 - y0), INF).flatten(1)  # B x (M * C)
    # Per location: the smallest area among its candidate boxes, then the lowest box index with that area.
    idx = idx.flatten(1)
    min_area = torch.full((B, L), INF, device=device).scatter_reduce_(1, idx, area, "amin")  # B x L
    box_index = torch.arange(M, device=device)[None, :, None].expand_as(ok).flatten(1)
    winner = torch.where(area == min_area.gather(1, idx), box_index, M)
    gt = torch.full((B, L), M, device=device).scatter_reduce_(1, idx, winner, "amin")  # B x L
    return _targets(points, strides, boxes, labels, min_area < INF, gt)


def focal_loss_sum(logits, pos_logits, alpha=0.25, gamma=2.0, pos_mask=None):
    """Focal loss (RetinaNet Eq. 5) summed over `logits` whose target-1 entries are `pos_logits` (a copy of
    those entries, e.g. gathered; all other entries have target 0). Entries of `pos_logits` where `pos_mask`
    is False are not positives (they let callers gather one entry per location without indexing).

    Every entry is first counted as a negative, FL(x, 0) = (1 - alpha) p^gamma softplus(x), and the positives
    then swap that term for FL(x, 1) = alpha (1 - p)^gamma softplus(-x) (p = sigmoid(x), softplus(-x) = -log p).
    A one-hot target of the size of `logits` is never built: ~5 elementwise passes over the B x L x K class
    map instead of ~20, and the swap costs only as much as there are positives.
    """
    neg = lambda x: torch.sigmoid(x) ** gamma * F.softplus(x)  # noqa: E731  FL(x, 0) / (1 - alpha)
    pos = lambda x: torch.sigmoid(-x) ** gamma * F.softplus(-x)  # noqa: E731  FL(x, 1) / alpha
    swap = alpha * pos(pos_logits) - (1 - alpha) * neg(pos_logits)
    if pos_mask is not None:
        swap = torch.where(pos_mask, swap, 0.0)
    return (1 - alpha) * neg(logits).sum() + swap.sum()


def giou_terms(pred, target):
    """Intersection, union and enclosing-box areas of boxes given as distances (l, t, r, b) from a shared point."""
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    pred_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (torch.minimum(pt, tt) + torch.minimum(pb, tb))
    enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (torch.maximum(pt, tt) + torch.maximum(pb, tb))
    return inter, pred_area + target_area - inter, enclose


def giou_loss_ltrb(pred, target, weight):
    """Weighted sum of 1 - GIoU for boxes given as distances (l, t, r, b) from a shared point.

    Uses AdelaiDet's IOULoss smoothing: IoU = (inter + 1) / (union + 1).
    """
    inter, union, enclose = giou_terms(pred, target)
    enclose = enclose + 1e-7
    iou = (inter + 1.0) / (union + 1.0)
    giou = iou - (enclose - union) / enclose
    return ((1 - giou) * weight).sum()


def fcos_targets(geometry, gt: list, mask_code=None) -> Targets:
    """The FCOS targets of a batch on an align.Geometry; gt: per image {"boxes": [n, 4] HR pixels, "labels": [n]}
    and, for a model with a mask branch (`mask_code`: its masks.MaskCode), "masks" [n, M, M]: then the Targets also
    hold each location's mask code (meinst.code_targets)."""
    targets = assign_targets(geometry.points, geometry.strides, geometry.ranges, [t["boxes"] for t in gt],
                             [t["labels"] for t in gt], shapes=geometry.shapes)
    if mask_code is not None:
        if any("masks" not in t for t in gt):
            raise ValueError("a model with a mask branch needs the objects' masks: build the dataset with masks=True")
        targets.mask_codes = code_targets(mask_code, [t["masks"] for t in gt], targets.gt)
    return targets


def fcos_losses(head, targets: Targets, prefix=""):
    """The FCOS loss of one branch: focal / N_pos, GIoU weighted by centre-ness / sum of centre-ness,
    centre-ness BCE / N_pos. N_pos and the centre-ness sum are averaged over processes (floors 1 and 1e-6);
    every process issues the same all-reduce even with zero positives, so DDP cannot hang.
    head: fcos_head.HeadOutputs (B x L x K, B x L x 4, B x L); returns {prefix+"loss_cls", ...}, and
    prefix+"loss_mask" (meinst.mask_loss, MEInst's MSE on the code) when the head has a mask output.
    """
    cls, box, ctr = head.cls_logits, head.box_regression, head.centerness
    pos = targets.pos
    ctr_t = torch.where(pos, targets.centerness, 0.0)  # B x L, zero off the positives
    norms = dist.all_reduce_mean(torch.stack([pos.sum().float(), ctr_t.sum()]))
    num_pos, ctr_sum = norms[0].clamp(min=1.0), norms[1].clamp(min=1e-6)
    # The positive terms are evaluated at every location (B x L, 1/K of the class map) and masked, instead of
    # indexing the positives: no host-device sync (a boolean index needs one on CUDA), and every head
    # parameter stays in the graph with zero gradient even without positives, as DDP needs.
    gt_logits = cls.gather(2, targets.labels.clamp(min=0)[..., None]).squeeze(2).float()  # B x L
    loss_cls = focal_loss_sum(cls.float(), gt_logits, pos_mask=pos) / num_pos
    safe_ltrb = torch.where(pos[..., None], targets.ltrb, 1.0)  # a finite dummy target off the positives
    loss_box = giou_loss_ltrb(box.float(), safe_ltrb, ctr_t) / ctr_sum
    loss_ctr = (F.binary_cross_entropy_with_logits(ctr.float(), ctr_t, reduction="none") * pos).sum() / num_pos
    losses = {f"{prefix}loss_cls": loss_cls, f"{prefix}loss_box": loss_box, f"{prefix}loss_ctr": loss_ctr}
    if head.mask_codes is not None:
        if targets.mask_codes is None:
            raise ValueError("the head has a mask output but the targets hold no mask codes (fcos_targets' mask_code)")
        losses[f"{prefix}loss_mask"] = mask_loss(head.mask_codes, targets.mask_codes, ctr_t, norms[1])
    return losses


class FCOSLoss:
    """L_FCOS of a single-branch model (the HR detector, or the student's detection term, MSAD Sec. 3.4).

    callable(outputs, batch, iteration) with outputs {branch: models.BranchOutputs} of one branch and batch an
    ImageBatch (its targets in HR pixels) -> {"loss_cls", "loss_box", "loss_ctr"} (and "loss_mask" with a mask
    branch, whose masks.MaskCode is `mask_code`), scalars.
    """

    def __init__(self, mask_code=None):
        self.mask_code = mask_code

    def __call__(self, outputs: dict, batch, iteration: int = 0) -> dict:
        (out,) = outputs.values()
        return fcos_losses(out.head, fcos_targets(out.geometry, batch.targets, self.mask_code))
