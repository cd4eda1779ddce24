"""Assembly of the MSAD models (MSAD Sec. 3.2-3.4): C-FF, the multi-scale teacher, the LR student, and
moving weights between them."""
from dataclasses import replace

import pytest
import torch

from msad import align
from msad.decode import Detector
from msad.distill import DistillationLoss
from msad.imagenet import normalize
from msad.fcos_loss import assign_targets, fcos_losses, fcos_targets
from msad.fusion import CrossFeatureFusion
from msad.models import build_model, load_partial, model_from_checkpoint
from msad.teacher_loss import TeacherLoss

pytestmark = pytest.mark.usefixtures("seeded")

BOXES = [[[10, 12, 70, 90], [60, 60, 120, 110], [0, 0, 250, 200]], [[30, 20, 100, 60]]]
LABELS = [[0, 1, 2], [2]]


@pytest.fixture
def batch(make_batch):
    return make_batch(BOXES, sizes=[(256, 256), (200, 160)], labels_per_image=LABELS)


def pyramid_pair(channels=32, batch=2, hw=((32, 40), (16, 20), (8, 10), (4, 5), (2, 3))):
    """Random HR / LR pyramids whose two images are clearly different (so their fusion weights differ)."""
    shift = torch.tensor([0.0, 3.0])[:, None, None, None]  # image 1 is offset
    hr = [torch.randn(batch, channels, h, w) + shift for h, w in hw]
    lr = [torch.randn(batch, channels, h, w) - shift for h, w in hw]
    return hr, lr


# ------------------------------------------------------------------------------------------------------
# C-FF (MSAD Sec. 3.3)
# ------------------------------------------------------------------------------------------------------
def test_fusion_weights_are_a_softmax_pair_per_image():
    fusion = CrossFeatureFusion(32)
    hr, lr = pyramid_pair()
    a = fusion.weights(hr[0], lr[0])
    assert a.shape == (2, 2)
    assert torch.allclose(a.sum(dim=1), torch.ones(2))
    assert (a > 0).all()
    assert (a[0] - a[1]).abs().max() > 1e-3  # two different images get their own weights


def test_fused_map_is_the_weighted_sum_computed_by_hand():
    fusion = CrossFeatureFusion(32)
    hr, lr = pyramid_pair()
    w1, w2 = fusion.gate[0].weight, fusion.gate[2].weight  # 4 x 64, 2 x 4: Linear 2C -> C/8 -> 2, no bias
    fused = fusion(hr, lr)
    for level, (h, l) in enumerate(zip(hr, lr)):
        for b in range(2):  # per image: image 1 must not reuse image 0's weights
            pooled = torch.cat([h[b], l[b]]).mean(dim=(1, 2))  # 2C
            a = torch.softmax(w2 @ torch.relu(w1 @ pooled), dim=0)  # (a_H, a_L)
            assert torch.allclose(fused[level][b], a[0] * h[b] + a[1] * l[b], atol=1e-6), (level, b)


def test_one_fusion_module_serves_all_levels(tiny_cfg):
    teacher = build_model("teacher", tiny_cfg)
    C = tiny_cfg.fpn_channels
    assert sum(p.numel() for p in teacher.fusion.parameters()) == 2 * C * (C // 8) + (C // 8) * 2  # one gate
    # the same pair at every level position gets the same weights, hence the same fused map
    h, l = torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4)
    fused = teacher.fusion([h] * 5, [l] * 5)
    assert all(torch.equal(f, fused[0]) for f in fused)


# ------------------------------------------------------------------------------------------------------
# the multi-scale teacher (MSAD Sec. 3.2)
# ------------------------------------------------------------------------------------------------------
def test_teacher_pyramids_are_hr_p3_p7_lr_p2_p6_of_the_half_image_and_their_fusion(tiny_cfg, batch):
    teacher = build_model("teacher", tiny_cfg).eval()
    x = normalize(batch.images)
    with torch.no_grad():
        hr, lr, fused = teacher.pyramids(batch.images).values()
        expected_hr = teacher.pyramid(x, (3, 4, 5, 6, 7))
        expected_lr = teacher.pyramid(x[..., ::2, ::2], (2, 3, 4, 5, 6))  # nearest 0.5x of the padded HR batch
        expected_fused = teacher.fusion(expected_hr, expected_lr)
    for got, expected in ((hr, expected_hr), (lr, expected_lr), (fused, expected_fused)):
        assert len(got) == 5 and all(torch.equal(g, e) for g, e in zip(got, expected))


def test_teacher_loss_is_hr_plus_lr_plus_0_4_fused(tiny_cfg, batch):
    teacher = build_model("teacher", tiny_cfg).train()
    losses = TeacherLoss()(teacher(batch.images), batch)
    with torch.no_grad():  # recompute every branch by hand, one head call each, with one set of HR-frame targets
        pyramids = teacher.pyramids(batch.images)
        shapes = [tuple(f.shape[-2:]) for f in pyramids["hr"]]
        points, strides = align.make_points(shapes, align.hr_strides(), torch.device("cpu"))
        targets = assign_targets(points, strides, align.level_ranges(shapes), [t["boxes"] for t in batch.targets],
                                 [t["labels"] for t in batch.targets], shapes=shapes)
        by_hand = {name: fcos_losses(teacher.head(feats), targets) for name, feats in pyramids.items()}
    assert set(losses) == {f"{b}_loss_{t}" for b in ("hr", "lr", "fused") for t in ("cls", "box", "ctr")}
    for name, weight in (("hr", 1.0), ("lr", 1.0), ("fused", 0.4)):
        for term, value in by_hand[name].items():
            assert torch.allclose(losses[f"{name}_{term}"], weight * value, rtol=1e-4), f"{name}_{term}"
    total = sum(by_hand["hr"].values()) + sum(by_hand["lr"].values()) + 0.4 * sum(by_hand["fused"].values())
    assert torch.allclose(sum(losses.values()), total, rtol=1e-4)


def test_teacher_loss_reaches_backbone_fpn_head_and_fusion(tiny_cfg, batch):
    teacher = build_model("teacher", tiny_cfg).train()
    sum(TeacherLoss()(teacher(batch.images), batch).values()).backward()
    grads = {n: p.grad for n, p in teacher.named_parameters()}
    assert not [n for n, g in grads.items() if g is None]  # every parameter is in the graph
    # fpn.lateral.p2 is used by the LR branch only, fpn.p7 by the HR branch only. (head.box_pred and the
    # Scales are left out: behind the ReLU of an untrained head they can get an all-zero gradient.)
    for prefix in ("backbone.conv1.", "backbone.layer4.", "fpn.lateral.p2.", "fpn.p7.", "head.cls_tower.",
                   "head.box_tower.", "head.cls_logits.", "head.ctr_pred.", "fusion.gate."):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix


@pytest.mark.parametrize("branch", ["fused", "hr", "lr"])
def test_each_teacher_branch_returns_detections_at_inference(branch, tiny_cfg, batch):
    # untrained, so every score is ~0.07: keep everything above 0, but only the top 50 per level (fast NMS)
    teacher = build_model("teacher", replace(tiny_cfg, score_thresh=0.0, pre_nms_top_n=50)).eval()
    with torch.no_grad():
        dets = Detector(teacher, branch)(batch)
    assert len(dets) == 2
    for d in dets:
        assert d["boxes"].shape[1] == 4 and 0 < len(d["boxes"]) <= 100
        assert len(d["scores"]) == len(d["labels"]) == len(d["boxes"])


def test_teacher_branches_run_different_pyramids(tiny_cfg, batch):
    teacher = build_model("teacher", replace(tiny_cfg, score_thresh=0.0, pre_nms_top_n=50)).eval()
    scores = {}
    for branch in ("fused", "hr", "lr"):
        with torch.no_grad():
            scores[branch] = Detector(teacher, branch)(batch)[0]["scores"]
    assert not torch.equal(scores["fused"], scores["hr"])
    assert not torch.equal(scores["fused"], scores["lr"])
    assert not torch.equal(scores["hr"], scores["lr"])


def checkpoint(model, kind, cfg):
    return {"kind": kind, "args": cfg.to_dict(), "model": model.state_dict()}


def test_checkpoint_branch_selection(tiny_cfg):
    teacher = build_model("teacher", tiny_cfg)
    model, branch = model_from_checkpoint(checkpoint(teacher, "teacher", tiny_cfg), "t.pth", "lr")
    assert branch == "lr"
    assert torch.equal(model.state_dict()["fusion.gate.0.weight"], teacher.state_dict()["fusion.gate.0.weight"])
    assert model_from_checkpoint(checkpoint(teacher, "teacher", tiny_cfg), "t.pth")[1] == "fused"  # the default
    student = build_model("student", tiny_cfg)
    assert model_from_checkpoint(checkpoint(student, "student", tiny_cfg), "s.pth")[1] == "lr"
    fcos = build_model("fcos", tiny_cfg)
    assert model_from_checkpoint(checkpoint(fcos, "fcos", tiny_cfg), "f.pth")[1] == "hr"
    no_cff = replace(tiny_cfg, fusion=False)
    assert model_from_checkpoint(checkpoint(build_model("teacher", no_cff), "teacher", no_cff), "t.pth")[1] == "hr"


def test_checkpoint_without_fusion_rejects_the_fused_branch(tiny_cfg):
    cfg = replace(tiny_cfg, fusion=False)
    ckpt = checkpoint(build_model("teacher", cfg), "teacher", cfg)
    with pytest.raises(ValueError, match=r"--branch fused: .* without C-FF has branches hr, lr"):
        model_from_checkpoint(ckpt, "t.pth", "fused")


def test_fcos_checkpoint_rejects_a_teacher_branch(tiny_cfg):
    ckpt = checkpoint(build_model("fcos", tiny_cfg), "fcos", tiny_cfg)
    with pytest.raises(ValueError, match=r"--branch lr: a fcos checkpoint has branches hr"):
        model_from_checkpoint(ckpt, "f.pth", "lr")


def test_teacher_without_fusion_has_no_fusion_parameters_or_fused_loss(tiny_cfg, batch):
    teacher = build_model("teacher", replace(tiny_cfg, fusion=False)).train()
    assert not [n for n, _ in teacher.named_parameters() if n.startswith("fusion")]
    assert not [k for k in TeacherLoss()(teacher(batch.images), batch) if k.startswith("fused_")]
    teacher.eval()
    hr = teacher.pyramids(batch.images, ("hr",))["hr"]
    kd = DistillationLoss(teacher)
    assert all(torch.equal(t, h) for t, h in zip(kd.teacher_fused(batch.images).features, hr))  # imitate HR instead


# ------------------------------------------------------------------------------------------------------
# the low-resolution student (MSAD Sec. 3.4)
# ------------------------------------------------------------------------------------------------------
def test_student_reads_p2_to_p6_of_the_half_size_image(tiny_cfg, batch):
    student = build_model("student", tiny_cfg).eval()
    seen = {}
    student.backbone.register_forward_pre_hook(lambda m, args: seen.update(input=args[0].shape) or None)
    student.fpn.register_forward_pre_hook(lambda m, args: seen.update(levels=tuple(args[1])) or None)
    with torch.no_grad():
        student(batch.images)
    B, _, H, W = batch.images.shape
    assert seen["input"] == (B, 3, H // 2, W // 2)
    assert seen["levels"] == (2, 3, 4, 5, 6)
    assert not hasattr(student.fpn, "p7")  # never built, so no dead parameters under DDP


def test_student_head_grid_equals_the_hr_detectors_grid(tiny_cfg, batch):
    student, hr_fcos = build_model("student", tiny_cfg), build_model("fcos", tiny_cfg)
    with torch.no_grad():
        s_geo = student(batch.images)["lr"].geometry
        h_geo = hr_fcos(batch.images)["hr"].geometry
    assert s_geo.shapes == h_geo.shapes  # level shapes
    assert len(s_geo.points) == len(h_geo.points)  # number of locations
    assert torch.equal(s_geo.points, h_geo.points) and torch.equal(s_geo.strides, h_geo.strides)  # HR frame
    assert torch.equal(s_geo.ranges, h_geo.ranges)  # and size ranges


def test_student_and_hr_detector_get_identical_targets(tiny_cfg, batch):
    student, hr_fcos = build_model("student", tiny_cfg), build_model("fcos", tiny_cfg)
    with torch.no_grad():
        s = fcos_targets(student(batch.images)["lr"].geometry, batch.targets)
        h = fcos_targets(hr_fcos(batch.images)["hr"].geometry, batch.targets)
    assert s.pos.any()
    assert torch.equal(s.labels, h.labels) and torch.equal(s.ltrb[s.pos], h.ltrb[h.pos])


# ------------------------------------------------------------------------------------------------------
# teacher -> student initialisation
# ------------------------------------------------------------------------------------------------------
def test_load_partial_copies_backbone_fpn_and_head_from_the_teacher(tiny_cfg):
    teacher, student = build_model("teacher", tiny_cfg), build_model("student", tiny_cfg)
    source = teacher.state_dict()
    shared = [k for k in student.state_dict() if k.startswith(("backbone.", "fpn.", "head."))]
    assert len(shared) == len(student.state_dict())  # the student is exactly backbone + FPN + head
    assert not all(torch.equal(student.state_dict()[k], source[k]) for k in shared)  # fresh inits differ
    load_partial(student, source, "teacher.pth")
    state = student.state_dict()
    assert all(torch.equal(state[k], source[k]) for k in shared)


def test_a_teacher_starts_from_a_trained_hr_detector_with_p2_and_cff_new(tiny_cfg):
    """train_teacher.py --init-from: backbone, FPN P3-P7 and head of an FCOS; the P2 lateral/output are new."""
    fcos, teacher = build_model("fcos", tiny_cfg), build_model("teacher", tiny_cfg)
    fresh = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = load_partial(teacher, fcos.state_dict(), "fcos.pth", new=("fpn.lateral.p2.", "fpn.output.p2."))
    assert report["new"] == ["fpn.lateral.p2.bias", "fpn.lateral.p2.weight", "fpn.output.p2.bias",
                             "fpn.output.p2.weight"]
    state = teacher.state_dict()
    assert sorted(report["loaded"]) == sorted(fcos.state_dict())  # all of the detector
    assert all(torch.equal(state[k], v) for k, v in fcos.state_dict().items())
    assert all(torch.equal(state[k], fresh[k]) for k in report["new"] + ["fusion.gate.0.weight"])
    with pytest.raises(ValueError, match="missing: fpn.lateral.p2.bias"):  # without `new`, P2 is a mismatch
        load_partial(build_model("teacher", tiny_cfg), fcos.state_dict(), "fcos.pth")


def test_load_partial_from_a_wider_backbone_lists_the_mismatched_keys(tiny_cfg):
    teacher = build_model("teacher", replace(tiny_cfg, width=0.5))
    student = build_model("student", tiny_cfg)
    with pytest.raises(ValueError, match=r"teacher\.pth does not match .*shape mismatch: .*backbone\.conv1\.weight "
                                         r"\(16, 3, 7, 7\) vs \(32, 3, 7, 7\)"):
        load_partial(student, teacher.state_dict(), "teacher.pth")


def test_load_partial_from_a_deeper_backbone_lists_the_extra_keys(tiny_cfg):
    # ResNet-34 has every ResNet-18 key with the same shape, plus more blocks: loading it would silently
    # give the student a truncated network.
    teacher = build_model("teacher", replace(tiny_cfg, backbone="resnet34"))
    student = build_model("student", tiny_cfg)
    with pytest.raises(ValueError, match=r"teacher\.pth does not match .*backbone\.layer1\.2\."):
        load_partial(student, teacher.state_dict(), "teacher.pth")
