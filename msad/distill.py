"""Feature distillation from the teacher's fused pyramid to the low-resolution student (MSAD Sec. 3.4).

L_KD = w(t) * alpha * T * sum_l mean |S_l - F_l|, with the student's P2..P6 as S, the fused teacher
pyramid as F, alpha = 0.2, T = 3 and w(t) = min(1, t / warmup) a linear warm-up over 500 iterations,
as the released code runs it. The mean is over all B x C x h x w elements of a level.

A student thinner than its teacher (fewer FPN channels) distils through `Adapters`: one 1x1 conv per level
position mapping its channels to the teacher's, the regressor of FitNets (Romero et al. 2015). They train with
the student and are not part of the inference model. The released code has none (its student is as wide as
its teacher).

`normalize="level"` (an option, not the released code) divides each level's distance by the same distance
to zero, mean |F_l| (or mean F_l^2 for L2), detached: every level then weighs by its relative error, whatever
the scale of its features.
"""
import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = {
    "l1": lambda s, t: F.l1_loss(s, t),  # the paper's and the released code's choice
    "l2": lambda s, t: F.mse_loss(s, t),
}
NORMALIZE = ("none", "level")
KD_WEIGHT = 0.6  # alpha * T = 0.2 x 3 in the released code
KD_WARMUP = 500  # iterations of the linear warm-up w(t), released code (the demo preset scales it)


def warmup_factor(iteration: int, warmup_iters: int = KD_WARMUP) -> float:
    """w(t) = min(1, t / warmup_iters); 1 when there is no warm-up."""
    return 1.0 if warmup_iters <= 0 else min(1.0, iteration / warmup_iters)


class FeatureDistillation:
    """Holds no parameters: callable(student_feats, teacher_feats, iteration) -> dict of per-level terms."""

    def __init__(self, weight: float = KD_WEIGHT, warmup_iters: int = KD_WARMUP, distance: str = "l1",
                 normalize: str = "none"):
        if distance not in DISTANCES:
            raise ValueError(f"--kd-loss must be one of {sorted(DISTANCES)}, got {distance!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"--kd-norm must be one of {NORMALIZE}, got {normalize!r}")
        self.weight, self.warmup_iters, self.distance = weight, warmup_iters, DISTANCES[distance]
        self.normalize = normalize

    def __call__(self, student_feats, teacher_feats, iteration: int):
        if len(student_feats) != len(teacher_feats):
            raise ValueError(f"student has {len(student_feats)} levels, teacher {len(teacher_feats)}")
        w = self.weight * warmup_factor(iteration, self.warmup_iters)
        losses = {}
        for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            if s.shape != t.shape:
                raise ValueError(f"distillation level {i}: student P{i + 2} {tuple(s.shape)} != teacher fused "
                                 f"level {i} {tuple(t.shape)}")
            s, t = s.float(), t.float()
            d = self.distance(s, t)
            if self.normalize == "level":
                d = d / self.distance(torch.zeros_like(t), t).clamp_min(1e-6)
            losses[f"loss_kd_p{i + 2}"] = w * d
        return losses


class Adapters(nn.Module):
    """One 1x1 conv per level position, student channels -> teacher channels (training only, FitNets regressor).

    Level position i serves the student's P(i+2) and the teacher's fused level i, as FCOSHead's Scales do.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int = 5):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))
        for conv in self.convs:  # the FPN's init: keeps the features' scale
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, feats):
        """feats: list over level positions of B x C_s x h x w -> list of B x C_t x h x w."""
        return [conv(f) for conv, f in zip(self.convs, feats)]


def build_adapters(student_channels: int, teacher_channels: int, num_levels: int = 5) -> Adapters | None:
    """Adapters when the widths differ, None when the student's pyramid can be compared to the teacher's as is."""
    if student_channels == teacher_channels:
        return None
    return Adapters(student_channels, teacher_channels, num_levels)
