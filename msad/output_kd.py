"""Output-level distillation on the aligned grid (our extension of MSAD Sec. 3.4; not in the paper or the released code).

The pyramid shift (Sec. 3.1) makes location i of the student's P(l-1) on the half image location i of the
teacher's fused level at P(l): same stride, same size range, same targets. So the fused branch's predictions
are dense targets for the student's, location by location, with no matching or resampling. Every term compares
the student's head outputs with the frozen teacher's head on its fused pyramid (HeadOutputs, B x L x ...):

- cls: binary KL(p_T || p_S) over every location and class, p = sigmoid(logit), optionally weighted by
  |p_T - p_S|^gamma (the quality focal weight of GFL, Li et al. 2020), summed and divided by the number of
  positive locations as the FCOS classification loss is;
- box: 1 - GIoU between the student's and the teacher's ltrb (both in stride units, at the same point),
  weighted by the teacher's score s_T = max_k p_T * sigmoid(ctr_T) and divided by the sum of s_T;
- ctr: binary KL between the centre-ness probabilities, with the same weights and normaliser as box.

KL rather than BCE with soft targets: it has the same gradient, and every term is exactly zero when the student's outputs equal the
teacher's. The normalisers are averaged over processes (dist.all_reduce_mean), as FCOS's are.
"""
import torch
import torch.nn.functional as F

from . import dist
from .distill import warmup_factor
from .fcos_loss import giou_terms

TERMS = ("cls", "box", "ctr")


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(Bernoulli(p_T) || Bernoulli(p_S)), p = sigmoid(logit), from log-sigmoids: >= 0, exactly zero
    for equal logits, and its gradient in the student's logit is BCE's with the soft target p_T: p_S - p_T."""
    p_t = torch.sigmoid(teacher_logits)
    return (p_t * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits))
            + (1 - p_t) * (F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)))


def box_distance(student_ltrb: torch.Tensor, teacher_ltrb: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of two boxes given as (l, t, r, b) from one point, elementwise over the leading dims; exactly 0 for
    equal boxes, empty ones (all four distances 0, at background locations) included."""
    inter, union, enclose = giou_terms(student_ltrb, teacher_ltrb)
    iou = torch.where(union > 0, inter / union.clamp(min=1e-7), 1.0)
    return 1 - (iou - (enclose - union) / enclose.clamp(min=1e-7))


class OutputDistillation:
    """callable(student_head, teacher_head, num_pos, iteration) -> {"loss_kd_cls", "loss_kd_box", "loss_kd_ctr"}.

    student_head / teacher_head: fcos_head.HeadOutputs of one batch on the same locations (B x L x K, B x L x 4,
    B x L); teacher_head is detached (the teacher runs under no_grad). num_pos: the batch's positive locations,
    already averaged over processes (the FCOS classification normaliser). Each term is multiplied by
    weight * w(t), the feature term's linear warm-up; `terms` picks which are computed.
    """

    def __init__(self, weight: float, gamma: float = 0.0, terms=TERMS, warmup_iters: int = 0):
        unknown = set(terms) - set(TERMS)
        if unknown or not terms:
            raise ValueError(f"--kd-output-terms must be a non-empty subset of {','.join(TERMS)}, got {','.join(terms)}")
        if not gamma >= 0:
            raise ValueError(f"--kd-gamma {gamma}: must be a finite number of at least 0")
        self.weight, self.gamma, self.terms, self.warmup_iters = weight, gamma, tuple(terms), warmup_iters

    def __call__(self, student_head, teacher_head, num_pos: torch.Tensor, iteration: int) -> dict:
        if student_head.cls_logits.shape != teacher_head.cls_logits.shape:
            raise ValueError(f"output distillation: student predictions {tuple(student_head.cls_logits.shape)} != "
                             f"teacher's fused {tuple(teacher_head.cls_logits.shape)} (B x L x K)")
        w = self.weight * warmup_factor(iteration, self.warmup_iters)
        p_t = torch.sigmoid(teacher_head.cls_logits.float())  # B x L x K
        ctr_t = torch.sigmoid(teacher_head.centerness.float())  # B x L
        score = p_t.max(-1).values * ctr_t  # B x L, the teacher's detection score at each location
        score_sum = dist.all_reduce_mean(score.sum()).clamp(min=1e-6)
        losses = {}
        if "cls" in self.terms:
            s = student_head.cls_logits.float()
            kl = binary_kl(s, teacher_head.cls_logits.float())
            if self.gamma > 0:
                kl = kl * (p_t - torch.sigmoid(s)).abs() ** self.gamma
            losses["loss_kd_cls"] = w * kl.sum() / num_pos
        if "box" in self.terms:
            d = box_distance(student_head.box_regression.float(), teacher_head.box_regression.float())  # B x L
            losses["loss_kd_box"] = w * (d * score).sum() / score_sum
        if "ctr" in self.terms:
            kl = binary_kl(student_head.centerness.float(), teacher_head.centerness.float())  # B x L
            losses["loss_kd_ctr"] = w * (kl * score).sum() / score_sum
        return losses
