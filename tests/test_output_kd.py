"""Output-level distillation on the aligned grid (msad/output_kd.py): the student's predictions at location i
imitate the frozen teacher's fused predictions at location i; cls KL (optionally focal-weighted), box GIoU and
centre-ness KL weighted by the teacher's score."""
import pytest
import torch

from msad.distill import DistillationLoss, FeatureDistillation, TrainableStudent
from msad.fcos_head import HeadOutputs
from msad.models import ModelConfig, build_model
from msad.output_kd import OutputDistillation, binary_kl, box_distance

pytestmark = pytest.mark.usefixtures("seeded")
B, L, K = 2, 50, 3


def head(scale=1.0) -> HeadOutputs:
    ltrb = torch.rand(B, L, 4) * 5 * scale
    ltrb[0, :3] = 0  # degenerate boxes (relu'd to zero), as at background locations
    return HeadOutputs(torch.randn(B, L, K) * 3, ltrb, torch.randn(B, L))


def test_every_term_is_exactly_zero_when_the_student_predicts_what_the_teacher_does():
    t = head()
    s = HeadOutputs(*(x.clone().requires_grad_() for x in t[:3]))
    for gamma in (0.0, 2.0):
        losses = OutputDistillation(1.0, gamma)(s, t, torch.tensor(7.0), 10_000)
        assert losses.keys() == {"loss_kd_cls", "loss_kd_box", "loss_kd_ctr"}
        assert all(v.item() == 0.0 for v in losses.values()), losses


def test_the_terms_grow_with_the_distance_and_have_the_bce_gradient():
    t, s = head(), head()
    losses = OutputDistillation(1.0)(s, t, torch.tensor(4.0), 10_000)
    assert all(v > 0 for v in losses.values())
    logits = t.cls_logits.clone().requires_grad_()
    p_t = torch.sigmoid(s.cls_logits)
    binary_kl(logits, s.cls_logits).sum().backward()
    assert torch.allclose(logits.grad, torch.sigmoid(logits) - p_t, atol=1e-6)  # KL has BCE's gradient


def test_classification_is_summed_over_all_locations_and_classes_and_divided_by_the_positives():
    t, s = head(), head()
    num_pos = torch.tensor(5.0)
    losses = OutputDistillation(2.0, terms=("cls",))(s, t, num_pos, 10_000)
    p_t, p_s = torch.sigmoid(t.cls_logits), torch.sigmoid(s.cls_logits)
    kl = p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()
    assert losses.keys() == {"loss_kd_cls"}
    assert torch.allclose(losses["loss_kd_cls"], 2.0 * kl.sum() / num_pos, rtol=1e-4)
    focal = OutputDistillation(2.0, gamma=2.0, terms=("cls",))(s, t, num_pos, 10_000)["loss_kd_cls"]
    assert torch.allclose(focal, 2.0 * (kl * (p_t - p_s).abs() ** 2).sum() / num_pos, rtol=1e-4)


def test_box_and_centreness_are_weighted_by_the_teacher_score():
    t, s = head(), head()
    losses = OutputDistillation(1.0, terms=("box", "ctr"))(s, t, torch.tensor(1.0), 10_000)
    score = torch.sigmoid(t.cls_logits).max(-1).values * torch.sigmoid(t.centerness)
    d = box_distance(s.box_regression, t.box_regression)
    assert torch.allclose(losses["loss_kd_box"], (d * score).sum() / score.sum(), rtol=1e-5)
    # where the teacher scores ~0, the student's box costs nothing, however wrong
    t.cls_logits[1, 7], t.centerness[1, 7] = -40.0, -40.0
    box = lambda s: OutputDistillation(1.0, terms=("box",))(s, t, torch.tensor(1.0), 10_000)["loss_kd_box"]
    before = box(s)
    s.box_regression[1, 7] = 100.0
    assert torch.allclose(box(s), before, rtol=1e-6)


def test_box_distance_is_one_minus_giou():
    teacher = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # a 2 x 2 box around the point
    student = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # its quarter: IoU 1/4, enclosing box = the teacher's
    assert torch.allclose(box_distance(student, teacher), torch.tensor([0.75]))
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert box_distance(far, teacher).item() == pytest.approx(1.0)


def test_warmup_and_weight_scale_every_term():
    t, s = head(), head()
    full = OutputDistillation(3.0, warmup_iters=100)(s, t, torch.tensor(2.0), 100)
    half = OutputDistillation(3.0, warmup_iters=100)(s, t, torch.tensor(2.0), 50)
    assert all(torch.allclose(half[k], full[k] / 2) for k in full)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="--kd-output-terms"):
        OutputDistillation(1.0, terms=("cls", "mask"))
    with pytest.raises(ValueError, match="--kd-gamma"):
        OutputDistillation(1.0, gamma=float("nan"))
    t = head()
    with pytest.raises(ValueError, match="output distillation: student predictions"):
        OutputDistillation(1.0)(HeadOutputs(*(x[:, :10] for x in t[:3])), t, torch.tensor(1.0), 0)


def test_gradients_reach_only_the_student_and_the_teacher_head_stays_frozen_in_eval(tiny_cfg, make_batch):
    teacher = build_model("teacher", tiny_cfg).eval().requires_grad_(False)
    thin = ModelConfig(**{**tiny_cfg.to_dict(), "fpn_channels": 16, "head_convs": 0})  # no adapters needed
    trainable = TrainableStudent(build_model("student", thin).train())
    criterion = DistillationLoss(teacher, None, OutputDistillation(1.0))
    batch = make_batch([[[10, 12, 70, 90]], [[30, 20, 100, 60]]], sizes=(128, 128))
    fused = criterion.teacher_fused(batch.images)
    assert fused.head is not None and not any(t.requires_grad for t in fused.head if t is not None)
    losses = criterion(trainable(batch.images), batch, 500)
    assert {"loss_kd_cls", "loss_kd_box", "loss_kd_ctr"} < losses.keys()
    assert not any(k.startswith("loss_kd_p") for k in losses)  # the feature term is off
    sum(v for k, v in losses.items() if k.startswith("loss_kd")).backward()
    assert trainable.student.head.cls_logits.weight.grad.abs().sum() > 0
    assert trainable.student.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_the_student_location_i_is_compared_with_the_fused_location_i(tiny_cfg, make_batch):
    """The pyramid shift: the student's P2..P6 on the half image and the fused P3..P7 share one grid."""
    teacher = build_model("teacher", tiny_cfg).eval()
    student = build_model("student", tiny_cfg).eval()
    batch = make_batch([[[10, 12, 70, 90]]], sizes=(128, 160))
    fused = teacher(batch.images, ("fused",))["fused"]
    lr = student(batch.images)["lr"]
    assert lr.head.cls_logits.shape == fused.head.cls_logits.shape
    assert torch.equal(lr.geometry.points, fused.geometry.points)
    assert torch.equal(lr.geometry.strides, fused.geometry.strides)
