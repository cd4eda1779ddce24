"""The shared FCOS head (Tian et al. 2019, the "improved" AdelaiDet variant) and its decoding.

One head serves every pyramid of MSAD: the teacher's HR P3..P7, its LR P2..P6, the fused pyramid,
and the student's P2..P6 (MSAD Sec. 3.2: the head and its per-level Scales are shared by *position*,
so HR P3, LR P2 and fused level 0 use the same Scale).
"""
import math

import torch
from torch import nn
from torchvision.ops import batched_nms

from .backbone import gn_groups

PRIOR_PROB = 0.01  # initial foreground probability of every class at every location (RetinaNet Sec. 4.1)


def prior_bias(prior: float = PRIOR_PROB) -> float:
    """The classification bias that makes sigmoid(logit) = `prior` at init: -log((1 - prior) / prior), -4.595."""
    return -math.log((1 - prior) / prior)


class Scale(nn.Module):
    """A learnable scalar multiplying the box regression of one level position (FCOS Sec. 3.3)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    """num_convs x (conv, GN, ReLU); an empty Sequential (the identity) when num_convs is 0."""
    layers = []
    for _ in range(num_convs):  # 3x3 conv with bias, GroupNorm, ReLU (FCOS, as released)
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(gn_groups(channels), channels), nn.ReLU()]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Classification tower + box tower, centre-ness on the box tower, one Scale per level position.

    `num_convs` is the depth of each tower (4 in FCOS); with 0 the prediction convs read the FPN level
    directly, the cheapest head (a light student's).
    """

    def __init__(self, channels: int, num_classes: int, num_convs: int = 4, num_levels: int = 5,
                 prior: float = PRIOR_PROB):
        super().__init__()
        if num_convs < 0 or channels < 1:
            raise ValueError(f"--head-convs must be >= 0 and --fpn-channels >= 1, got {num_convs} and {channels}")
        self.num_classes = num_classes
        self.cls_tower = _tower(channels, num_convs)
        self.box_tower = _tower(channels, num_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctr_pred = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 0.01) weights, zero bias
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior))

    def forward(self, feats):
        """feats: list over level positions of B x C x h_i x w_i.

        Returns cls [B, L, K], box [B, L, 4] (l, t, r, b in stride units, >= 0), ctr [B, L] logits,
        with L = sum_i h_i * w_i locations in level-major, row-major order (the order of `make_points`).
        """
        cls, box, ctr = [], [], []
        for i, f in enumerate(feats):
            c = self.cls_tower(f)
            b = self.box_tower(f)
            cls.append(self.cls_logits(c).flatten(2))  # B x K x h*w
            box.append(torch.relu(self.scales[i](self.box_pred(b))).flatten(2))  # B x 4 x h*w
            ctr.append(self.ctr_pred(b).flatten(2))  # B x 1 x h*w
        cat = lambda xs: torch.cat(xs, dim=2).transpose(1, 2)  # B x L x ch
        return cat(cls), cat(box), cat(ctr).squeeze(2)


def make_points(shapes, strides, device):
    """Location centres (j*s + s//2, i*s + s//2) of every level: points [L, 2] (x, y) and stride [L]."""
    points, point_strides = [], []
    for (h, w), s in zip(shapes, strides):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.flatten(), yy.flatten()], dim=1))  # h*w x 2
        point_strides.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(points), torch.cat(point_strides)


def level_slices(shapes):
    """Start/end of each level inside the flattened location axis."""
    bounds = [0]
    for h, w in shapes:
        bounds.append(bounds[-1] + h * w)
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def decode(cls, box, ctr, points, strides, shapes, image_sizes, orig_sizes,
           score_thresh=0.05, pre_nms_top_n=1000, nms_thresh=0.6, max_dets=100):
    """FCOS inference (FCOS Sec. 3, released thresholds), batched over images and vectorised over locations.

    Per level: keep sigmoid(cls) > score_thresh, top `pre_nms_top_n` by cls * ctr; score = sqrt(cls * ctr);
    clip to the resized image and drop the boxes that clipping leaves with zero width or height (from
    locations in the padding, as detectron2's `nonempty` filter does), then class-wise NMS over all levels
    (one batched_nms call for the whole batch), top `max_dets`, rescale to the original size. Returns one
    dict per image with boxes [n, 4] (x0, y0, x1, y1 in original pixels), scores [n], labels [n] (contiguous).
    """
    B, _, K = cls.shape
    prob = torch.sigmoid(cls.float())
    joint = prob * torch.sigmoid(ctr.float())[..., None]  # B x L x K
    img_idx, loc_idx, lab_idx, scores = [], [], [], []
    for start, end in level_slices(shapes):
        p, j = prob[:, start:end].flatten(1), joint[:, start:end].flatten(1)  # B x (n*K)
        j = torch.where(p > score_thresh, j, torch.full_like(j, -1.0))
        top, idx = j.topk(min(pre_nms_top_n, j.shape[1]), dim=1)  # B x k
        keep = top > 0
        img_idx.append(torch.arange(B, device=cls.device)[:, None].expand_as(idx)[keep])
        loc_idx.append(idx[keep] // K + start)
        lab_idx.append(idx[keep] % K)
        scores.append(top[keep].sqrt())
    img_idx, loc_idx, labels, scores = (torch.cat(x) for x in (img_idx, loc_idx, lab_idx, scores))
    ltrb = box[img_idx, loc_idx].float() * strides[loc_idx, None]  # n x 4, input pixels
    xy = points[loc_idx]
    boxes = torch.cat([xy - ltrb[:, :2], xy + ltrb[:, 2:]], dim=1)
    # Clip to each resized image, then map to original pixels.
    sizes = torch.tensor(image_sizes, device=cls.device, dtype=torch.float32)[img_idx]  # n x 2 (h, w)
    ratio = torch.tensor([[w0 / w, h0 / h] for (h, w), (h0, w0) in zip(image_sizes, orig_sizes)],
                         device=cls.device, dtype=torch.float32)[img_idx]  # n x 2 (x, y)
    boxes = torch.minimum(boxes.clamp(min=0), sizes.flip(1).repeat(1, 2))
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # n
    img_idx, labels, scores, boxes, ratio = (x[nonempty] for x in (img_idx, labels, scores, boxes, ratio))
    boxes = boxes * ratio.repeat(1, 2)
    keep = batched_nms(boxes, scores, img_idx * K + labels, nms_thresh)  # sorted by score
    results = []
    for b in range(B):
        k = keep[img_idx[keep] == b][:max_dets]
        results.append({"boxes": boxes[k], "scores": scores[k], "labels": labels[k]})
    return results
