"""The shared FCOS head (Tian et al. 2019, the "improved" AdelaiDet variant); its decoding is msad/decode.py.

One head serves every pyramid of MSAD: the teacher's HR P3..P7, its LR P2..P6, the fused pyramid,
and the student's P2..P6 (MSAD Sec. 3.2: the head and its per-level Scales are shared by *position*,
so HR P3, LR P2 and fused level 0 use the same Scale).
"""
import math
from typing import NamedTuple

import torch
from torch import nn

from .backbone import gn_groups

PRIOR_PROB = 0.01  # initial foreground probability of every class at every location (RetinaNet Sec. 4.1)


def prior_bias(prior: float = PRIOR_PROB) -> float:
    """The classification bias that makes sigmoid(logit) = `prior` at init: -log((1 - prior) / prior), -4.595."""
    return -math.log((1 - prior) / prior)


class HeadOutputs(NamedTuple):
    """The head's predictions at every location of one pyramid, in level-major, row-major order (the order of
    align.locations), for a batch of B images and L = sum_i h_i * w_i locations.

    cls_logits: B x L x K class logits; box_regression: B x L x 4 distances (l, t, r, b) to the box sides, in
    units of the location's stride, >= 0; centerness: B x L centre-ness logits; mask_codes: B x L x D, the MEInst
    mask code of each location's object (msad/masks.py), None without a mask branch.
    """
    cls_logits: torch.Tensor
    box_regression: torch.Tensor
    centerness: torch.Tensor
    mask_codes: torch.Tensor | None = None

    def chunk(self, n: int) -> list["HeadOutputs"]:
        """Split along the batch into n equal parts (the teacher runs its branches as one batch)."""
        return [HeadOutputs(*parts) for parts in zip(*(t.chunk(n) if t is not None else (None,) * n for t in self))]

    def image(self, b: int) -> "HeadOutputs":
        """The predictions of image b, without the batch dimension: L x K, L x 4, L (and L x D)."""
        return HeadOutputs(*(t[b] if t is not None else None for t in self))


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
    directly, the cheapest head (a light student's). `mask_dim` D > 0 adds MEInst's mask output: one 3x3 conv on
    the box tower giving D code values per location, shared by every branch as the other outputs are.
    """

    def __init__(self, channels: int, num_classes: int, num_convs: int = 4, num_levels: int = 5,
                 prior: float = PRIOR_PROB, mask_dim: int = 0):
        super().__init__()
        if num_convs < 0 or channels < 1:
            raise ValueError(f"--head-convs must be >= 0 and --fpn-channels >= 1, got {num_convs} and {channels}")
        self.num_classes = num_classes
        self.cls_tower = _tower(channels, num_convs)
        self.box_tower = _tower(channels, num_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctr_pred = nn.Conv2d(channels, 1, 3, padding=1)
        if mask_dim:  # only then: a detector's state_dict keeps exactly its keys
            self.mask_pred = nn.Conv2d(channels, mask_dim, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 0.01) weights, zero bias
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior))

    def forward(self, feats) -> HeadOutputs:
        """feats: list over level positions of B x C x h_i x w_i -> HeadOutputs (B x L x K, B x L x 4, B x L and
        B x L x D or None)."""
        cls, box, ctr, code = [], [], [], []
        masks = hasattr(self, "mask_pred")
        for i, f in enumerate(feats):
            c = self.cls_tower(f)
            b = self.box_tower(f)
            cls.append(self.cls_logits(c).flatten(2))  # B x K x h*w
            box.append(torch.relu(self.scales[i](self.box_pred(b))).flatten(2))  # B x 4 x h*w
            ctr.append(self.ctr_pred(b).flatten(2))  # B x 1 x h*w
            if masks:
                code.append(self.mask_pred(b).flatten(2))  # B x D x h*w
        cat = lambda xs: torch.cat(xs, dim=2).transpose(1, 2)  # B x L x ch
        return HeadOutputs(cat(cls), cat(box), cat(ctr).squeeze(2), cat(code) if masks else None)
