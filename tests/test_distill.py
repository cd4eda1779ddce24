"""Feature distillation from the fused teacher pyramid to the LR student (MSAD Sec. 3.4):
L_KD = w(t) * 0.2 * 3 * sum over the 5 levels of mean |S_l - F_l|, w(t) = min(1, t / 500)."""
import pytest
import torch

from msad.distill import (Adapters, DistillationLoss, FeatureDistillation, TrainableStudent, build_adapters,
                          warmup_factor)
from msad.models import ModelConfig, build_model, model_from_checkpoint

pytestmark = pytest.mark.usefixtures("seeded")

SHAPES = [(2, 8, 16, 20), (2, 8, 8, 10), (2, 8, 4, 5), (2, 8, 2, 3), (2, 8, 1, 2)]


def pyramids():
    student = [torch.randn(s) for s in SHAPES]
    teacher = [torch.randn(s) * 2 + 1 for s in SHAPES]
    return student, teacher


def test_l1_distillation_equals_0_6_times_the_sum_of_per_level_mean_abs_error():
    s, t = pyramids()
    losses = FeatureDistillation()(s, t, iteration=10_000)
    by_hand = 0.6 * sum((a - b).abs().sum() / a.numel() for a, b in zip(s, t))
    assert len(losses) == 5
    assert torch.allclose(sum(losses.values()), by_hand)
    for i, (a, b) in enumerate(zip(s, t)):  # one term per level
        assert torch.allclose(losses[f"loss_kd_p{i + 2}"], 0.6 * (a - b).abs().mean())


@pytest.mark.parametrize("iteration, factor", [(0, 0.0), (250, 0.5), (500, 1.0), (1000, 1.0)])
def test_warmup_ramps_linearly_over_500_iterations(iteration, factor):
    assert warmup_factor(iteration, 500) == factor
    s, t = pyramids()
    kd = FeatureDistillation()
    full = sum(kd(s, t, iteration=500).values())
    assert torch.allclose(sum(kd(s, t, iteration=iteration).values()), factor * full)


def test_no_warmup_means_full_weight_from_the_start():
    assert warmup_factor(0, 0) == 1.0


def test_distillation_is_zero_for_identical_features():
    s, _ = pyramids()
    losses = FeatureDistillation()(s, [x.clone() for x in s], iteration=10_000)
    assert all(v == 0 for v in losses.values())


def test_shape_mismatch_raises_naming_the_level_and_shapes():
    s, t = pyramids()
    t[1] = torch.randn(2, 8, 9, 10)
    with pytest.raises(ValueError, match=r"level 1: student P3 \(2, 8, 8, 10\) != teacher fused level 1 "
                                         r"\(2, 8, 9, 10\)"):
        FeatureDistillation()(s, t, iteration=0)


def test_l2_distance_is_selectable():
    s, t = pyramids()
    losses = FeatureDistillation(distance="l2")(s, t, iteration=10_000)
    by_hand = 0.6 * sum(((a - b) ** 2).mean() for a, b in zip(s, t))
    assert torch.allclose(sum(losses.values()), by_hand)


def test_unknown_distance_is_rejected():
    with pytest.raises(ValueError, match="--kd-loss"):
        FeatureDistillation(distance="cosine")


def test_distillation_loss_adds_kd_terms_whose_gradient_reaches_only_the_student(tiny_cfg, make_batch):
    teacher = build_model("teacher", tiny_cfg).eval().requires_grad_(False)
    trainable = TrainableStudent(build_model("student", tiny_cfg).train())
    criterion = DistillationLoss(teacher, FeatureDistillation())
    batch = make_batch([[[10, 12, 70, 90]], [[30, 20, 100, 60]]], sizes=(128, 128))
    teacher_feats = criterion.teacher_fused(batch.images).features
    assert not any(f.requires_grad for f in teacher_feats)  # computed under no_grad
    losses = criterion(trainable(batch.images), batch, 500)
    assert {"loss_cls", "loss_box", "loss_ctr"} < set(losses)
    assert {f"loss_kd_p{l}" for l in range(2, 7)} < set(losses)
    sum(v for k, v in losses.items() if k.startswith("loss_kd")).backward()
    assert trainable.student.fpn.output["p2"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_the_frozen_teacher_is_held_by_the_loss_so_ddp_and_checkpoints_never_see_it(tiny_cfg):
    teacher = build_model("teacher", tiny_cfg).eval()
    trainable = TrainableStudent(build_model("student", tiny_cfg))  # what DDP wraps
    criterion = DistillationLoss(teacher, FeatureDistillation())
    teacher_params = {id(p) for p in teacher.parameters()}
    assert criterion.teacher is teacher and criterion.branch == "fused"
    assert not teacher_params & {id(p) for p in trainable.parameters()}  # what DDP would broadcast and all-reduce
    assert not any(m is teacher for m in trainable.modules())
    assert not any(k.startswith("teacher.") for k in trainable.state_dict())
    trainable.train()
    assert not teacher.training  # the frozen teacher stays in eval mode


def test_without_a_teacher_the_student_loss_is_the_fcos_loss(tiny_cfg, make_batch, train_losses):
    student = build_model("student", tiny_cfg).train()
    batch = make_batch([[[10, 12, 70, 90]], [[30, 20, 100, 60]]], sizes=(128, 128))
    losses = DistillationLoss()(TrainableStudent(student)(batch.images), batch, 500)
    assert losses.keys() == {"loss_cls", "loss_box", "loss_ctr"}
    assert all(torch.equal(v, train_losses(student, batch)[k]) for k, v in losses.items())


def test_adapters_appear_exactly_when_the_widths_differ():
    assert build_adapters(32, 32) is None
    adapters = build_adapters(16, 32)
    assert isinstance(adapters, Adapters) and len(adapters.convs) == 5
    assert all(c.in_channels == 16 and c.out_channels == 32 and c.kernel_size == (1, 1) for c in adapters.convs)
    feats = [torch.randn(s[0], 16, *s[2:]) for s in SHAPES]
    assert [tuple(f.shape) for f in adapters(feats)] == [(s[0], 32, *s[2:]) for s in SHAPES]


def test_a_thin_student_distils_through_adapters_that_stay_out_of_the_inference_model(tiny_cfg, make_batch):
    teacher = build_model("teacher", tiny_cfg).eval()  # FPN 32, 2-conv head
    thin = ModelConfig(**{**tiny_cfg.to_dict(), "fpn_channels": 16, "head_convs": 0})
    student = build_model("student", thin).train()
    batch = make_batch([[[10, 12, 70, 90]], [[30, 20, 100, 60]]], sizes=(128, 128))
    criterion = DistillationLoss(teacher, FeatureDistillation())
    with pytest.raises(ValueError, match="student P2"):  # without adapters the pyramids cannot be compared
        criterion(TrainableStudent(student)(batch.images), batch, 500)
    trainable = TrainableStudent(student, build_adapters(16, 32))
    losses = criterion(trainable(batch.images), batch, 500)
    sum(v for k, v in losses.items() if k.startswith("loss_kd")).backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in trainable.adapters.convs)  # every level position trains
    assert student.fpn.output["p2"].weight.grad.abs().sum() > 0  # and the student through them
    assert len(student.head.cls_tower) == 0 and student.head.cls_logits.in_channels == 16  # --head-convs 0
    state = student.state_dict()
    assert not any("adapters" in k for k in state)  # the inference model is the student alone
    ckpt = {"kind": "student", "model": state, "args": thin.to_dict()}
    assert model_from_checkpoint(ckpt, "s.pth")[0].state_dict().keys() == state.keys()
