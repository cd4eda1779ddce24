"""Distillation diagnostics (msad/diagnostics.py), the C-FF hidden width and the per-level KD normalisation:
what the README's results section reports must be what these functions compute."""
from dataclasses import replace

import pytest
import torch

from msad import align
from msad.imagenet import normalize
from msad.diagnostics import CFFWeights, StudentProbe, probe_iterations
from msad.distill import DistillationLoss, FeatureDistillation, TrainableStudent
from msad.fcos_loss import fcos_losses, fcos_targets
from msad.fusion import CrossFeatureFusion
from msad.models import build_model

pytestmark = pytest.mark.usefixtures("seeded")
BOXES = [[[10, 12, 70, 90], [60, 60, 120, 110]], [[30, 20, 100, 60]]]


def test_cff_hidden_width_defaults_to_a_eighth_of_the_channels_and_can_be_set(tiny_cfg):
    assert CrossFeatureFusion(256).gate[0].out_features == 32  # released: 512 -> 32 -> 2
    assert CrossFeatureFusion(32).gate[0].out_features == 4
    assert CrossFeatureFusion(32, hidden=16).gate[0].out_features == 16
    teacher = build_model("teacher", replace(tiny_cfg, cff_hidden=16))
    assert teacher.fusion.gate[0].out_features == 16 and teacher.fusion.gate[2].in_features == 16


def test_cff_weights_are_the_per_level_mean_over_every_image(tiny_cfg, make_batch):
    teacher = build_model("teacher", tiny_cfg).eval()
    batches = [make_batch(BOXES, sizes=(128, 160), seed=s) for s in (0, 1)]
    expected = []
    with torch.no_grad():
        for b in batches:
            x = normalize(b.images)
            hr = teacher.pyramid(x, align.branch_levels(1.0))
            lr = teacher.pyramid(align.make_low_res(x), align.branch_levels(0.5))
            expected.append(torch.stack([teacher.fusion.weights(h, l) for h, l in zip(hr, lr)]))  # L x B x 2
    expected = torch.cat(expected, dim=1).mean(dim=1)  # L x 2, over the 4 images
    with CFFWeights(teacher) as cff, torch.no_grad():
        for b in batches:
            teacher(b.images, ("fused",))
    summary = cff.summary()
    assert summary["a_H"] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)
    assert summary["a_L"] == pytest.approx(expected[:, 1].tolist(), abs=1e-4)
    assert len(summary["a_H"]) == 5
    teacher(batches[0].images, ("fused",))  # the hook is gone after the with block
    assert cff.count == 4
    assert CFFWeights(build_model("student", tiny_cfg)).summary() == {}  # no C-FF, nothing to report


def test_probe_logs_feature_gap_and_gradient_ratio_without_touching_parameter_gradients(tiny_cfg, make_batch,
                                                                                         tmp_path):
    student = build_model("student", tiny_cfg).train()
    batch = make_batch(BOXES, sizes=(128, 160))
    with torch.no_grad():
        shapes = [f.shape for f in student.pyramids(batch.images)["lr"]]
    teacher = build_model("teacher", tiny_cfg).eval()
    probe = StudentProbe({3}, tmp_path / "log.jsonl")
    criterion = DistillationLoss(teacher, FeatureDistillation(2.0, 0), probe=probe)
    teacher_feats = criterion.teacher_fused(batch.images).features
    assert [f.shape for f in teacher_feats] == shapes
    trainable = TrainableStudent(student)
    criterion(trainable(batch.images), batch, 2)  # not a probed iteration
    assert probe.records == {}
    losses = criterion(trainable(batch.images), batch, 3)
    assert all(p.grad is None for p in student.parameters())  # autograd.grad only, on the pyramid
    # By hand: the same forward (deterministic), gradients of each part w.r.t. the pyramid.
    out = student(batch.images)["lr"]
    by_hand, feats = fcos_losses(out.head, fcos_targets(out.geometry, batch.targets)), out.features
    kd = FeatureDistillation(2.0, 0)(feats, teacher_feats, 3)
    g_kd = torch.autograd.grad(sum(kd.values()), feats, retain_graph=True)
    g_det = torch.autograd.grad(sum(by_hand.values()), feats)
    record = probe.records[3]
    for i, (s, t, a, b) in enumerate(zip(feats, teacher_feats, g_kd, g_det)):
        assert record[f"feat_gap_p{i + 2}"] == pytest.approx((s - t).abs().mean().item(), rel=1e-4)
        assert record[f"grad_ratio_p{i + 2}"] == pytest.approx((a.norm() / b.norm()).item(), rel=1e-3)
    total = (sum(a.square().sum() for a in g_kd) / sum(b.square().sum() for b in g_det)).sqrt().item()
    assert record["grad_ratio_all"] == pytest.approx(total, rel=1e-3)
    assert sum(losses.values()).item() == pytest.approx(sum((by_hand | kd).values()).item(), rel=1e-5)
    line = (tmp_path / "log.jsonl").read_text().strip().splitlines()
    assert len(line) == 1 and '"diagnostics": "student_probe"' in line[0]
    assert probe.summary()["feat_gap_first"] == [record[f"feat_gap_p{l}"] for l in range(2, 7)]


def test_probe_iterations_include_the_first_and_the_last():
    assert probe_iterations(400) == {0, 100, 200, 299, 399}
    assert probe_iterations(1) == {0}


def test_level_normalised_kd_is_the_relative_error_per_level():
    s = [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    t = [torch.randn(2, 8, 4, 4) * 5, torch.randn(2, 8, 2, 2) * 0.1]  # very different scales
    losses = FeatureDistillation(0.6, 0, "l1", "level")(s, t, 0)
    for i in range(2):
        rel = (s[i] - t[i]).abs().mean() / t[i].abs().mean()
        assert losses[f"loss_kd_p{i + 2}"].item() == pytest.approx(0.6 * rel.item(), rel=1e-5)
    with pytest.raises(ValueError, match="--kd-norm"):
        FeatureDistillation(0.6, 0, "l1", "channel")
