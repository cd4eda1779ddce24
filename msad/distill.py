"""Stage 2 of MSAD (Sec. 3.4): the student's loss L_S = L_FCOS + L_KD, where the frozen teacher runs.

`DistillationLoss` is the whole of it: it holds the frozen teacher (outside DDP and the student's checkpoint),
runs it under no_grad on the batch the student sees, and forms L_KD from the teacher's fused pyramid with
`FeatureDistillation`. What DDP wraps and the optimizer trains is `TrainableStudent`: the student and, for a
thinner student, its adapters.

Feature distillation:

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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .fcos_loss import fcos_losses, fcos_targets
from .models import BranchOutputs

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


class StudentOutputs(NamedTuple):
    """TrainableStudent's output: the student's models.BranchOutputs ("lr") and its pyramid as the teacher's
    width sees it (through the adapters; the pyramid itself when there are none), B x C_t x h_i x w_i per level."""
    lr: object
    adapted: list


class TrainableStudent(nn.Module):
    """What stage 2 trains and DDP wraps: the student (FCOS on P2..P6 of the half image) and, for a student thinner
    than its teacher, the adapters (trained with it, saved in checkpoint.pth under "aux", not in the student).

    forward(images): the padded uint8 HR batch B x 3 x H x W -> StudentOutputs.
    """

    def __init__(self, student: nn.Module, adapters: nn.Module | None = None):
        super().__init__()
        self.student, self.adapters = student, adapters

    def forward(self, images: torch.Tensor) -> StudentOutputs:
        out = self.student(images)["lr"]
        return StudentOutputs(out, self.adapters(out.features) if self.adapters is not None else out.features)


class DistillationLoss:
    """L_S = L_FCOS + L_KD of the student (MSAD Sec. 3.4): callable(outputs, batch, iteration) -> dict of scalars.

    outputs: StudentOutputs of the batch; batch: the ImageBatch (HR images, targets in HR pixels). L_FCOS is
    scored on the HR-frame targets, which the pyramid shift makes the student's (Sec. 3.1). With a teacher, the
    frozen teacher runs here (`teacher_fused`), under no_grad, on the same HR batch, and L_KD is formed from its
    fused branch (its HR branch without C-FF):
    - `features` (FeatureDistillation, the released code's L_KD): its pyramid is the target of the student's
      (adapted) pyramid, "loss_kd_p2".."loss_kd_p6";
    - `outputs` (output_kd.OutputDistillation, our extension): its head's predictions on that pyramid are the
      targets of the student's, location by location, "loss_kd_cls" / "loss_kd_box" / "loss_kd_ctr".
    Without a teacher, L_S = L_FCOS. `probe` (diagnostics.StudentProbe) sees every step's terms and pyramids.
    A student with a mask branch (`mask_code`, its masks.MaskCode) has MEInst's mask term in L_FCOS.
    """

    def __init__(self, teacher: nn.Module | None = None, features: FeatureDistillation | None = None,
                 outputs=None, probe=None, mask_code=None):
        self.teacher, self.features, self.outputs, self.probe = teacher, features, outputs, probe
        self.mask_code = mask_code
        self.branch = None if teacher is None else "fused" if "fused" in teacher.branches else "hr"

    @torch.no_grad()
    def teacher_fused(self, images: torch.Tensor):
        """The frozen teacher on the HR batch: its fused branch as models.BranchOutputs (features; head, None
        unless output distillation needs the predictions: the head then runs on the fused pyramid)."""
        if self.outputs is None:
            return BranchOutputs(self.teacher.pyramids(images, (self.branch,))[self.branch], None, None)
        return self.teacher(images, (self.branch,))[self.branch]

    def __call__(self, outputs: StudentOutputs, batch, iteration: int) -> dict:
        out = outputs.lr
        targets = fcos_targets(out.geometry, batch.targets, self.mask_code)
        losses = fcos_losses(out.head, targets)
        if self.teacher is None:
            return losses
        teacher = self.teacher_fused(batch.images)
        if self.features is not None:
            losses |= self.features(outputs.adapted, teacher.features, iteration)
        if self.outputs is not None:
            num_pos = dist.all_reduce_mean(targets.pos.sum().float()).clamp(min=1.0)
            losses |= self.outputs(out.head, teacher.head, num_pos, iteration)
        if self.probe is not None and self.features is not None:  # the probe compares the pyramids
            self.probe(iteration, losses, out.features, outputs.adapted, teacher.features)
        return losses
