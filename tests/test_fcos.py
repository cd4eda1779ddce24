"""FCOS as used by MSAD (FCOS Sec. 3, the released code's improved variant): target assignment, losses,
decoding, size, trainability.

Assignment cases are built by hand on the HR location grid of a padded image: level positions 0..4 are
P3..P7 with strides 8..128, locations at (j*s + s//2, i*s + s//2), size ranges [-1,64], [64,128], ...
"""
import math

import pytest
import torch
import torchvision

from msad import align
from msad.align import Geometry, level_ranges, make_points
from msad.decode import class_nms, decode, decode_image
from msad.fcos_head import HeadOutputs
from msad.fcos_loss import Targets, assign_targets, assign_targets_dense, focal_loss_sum, giou_loss_ltrb
from msad.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("seeded")


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def hr_grid(h, w):
    """Location grid of an HR image padded to h x w (multiples of 128): points, strides, ranges, shapes."""
    shapes = [(math.ceil(h / s), math.ceil(w / s)) for s in align.hr_strides()]
    points, strides = make_points(shapes, align.hr_strides(), torch.device("cpu"))
    return Geometry(points, strides, level_ranges(shapes), shapes)


def loc(shapes, position, x, y):
    """Flat index of the location at pixel (x, y) of level position `position` (0 = P3)."""
    s = align.hr_strides()[position]
    i, j = (y - s // 2) // s, (x - s // 2) // s
    assert (j * s + s // 2, i * s + s // 2) == (x, y), f"({x}, {y}) is not a location of level position {position}"
    return sum(h * w for h, w in shapes[:position]) + i * shapes[position][1] + j


def assign(size, boxes_per_image, labels_per_image=None):
    """Targets of a batch of images padded to `size`; labels default to class 0. Returns (Targets, shapes)."""
    points, strides, ranges, shapes = hr_grid(*size)
    boxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image]
    if labels_per_image is None:
        labels_per_image = [[0] * len(b) for b in boxes]
    labels = [torch.tensor(l, dtype=torch.long).reshape(-1) for l in labels_per_image]
    fast = assign_targets(points, strides, ranges, boxes, labels, shapes=shapes)
    dense = assign_targets_dense(points, strides, ranges, boxes, labels)  # the definition
    assert all(torch.equal(getattr(fast, k), getattr(dense, k)) for k in ("labels", "ltrb", "pos"))
    return fast, shapes


def centred_box(x, y, half):
    return [x - half, y - half, x + half, y + half]


# ------------------------------------------------------------------------------------------------------
# assignment by hand
# ------------------------------------------------------------------------------------------------------
def test_max_regression_of_exactly_64_is_positive_at_p3_and_at_p4():
    # Image 0: a P3 location (68, 68) at the centre of a 128 x 128 box, so l = t = r = b = 64 (top of P3's range).
    # Image 1: a P4 location (72, 72) at the centre of a 128 x 128 box (bottom of P4's range).
    t, shapes = assign((256, 256), [[centred_box(68, 68, 64)], [centred_box(72, 72, 64)]], [[1], [2]])
    p3, p4 = loc(shapes, 0, 68, 68), loc(shapes, 1, 72, 72)
    assert t.pos[0, p3] and t.labels[0, p3] == 1
    assert torch.equal(t.ltrb[0, p3] * 8, torch.full((4,), 64.0))
    assert t.pos[1, p4] and t.labels[1, p4] == 2
    assert torch.equal(t.ltrb[1, p4] * 16, torch.full((4,), 64.0))


def test_max_regression_of_exactly_128_is_positive_at_p4_and_at_p5():
    t, shapes = assign((384, 384), [[centred_box(152, 152, 128)], [centred_box(144, 144, 128)]], [[1], [2]])
    p4, p5 = loc(shapes, 1, 152, 152), loc(shapes, 2, 144, 144)
    assert t.pos[0, p4] and t.labels[0, p4] == 1
    assert torch.equal(t.ltrb[0, p4] * 16, torch.full((4,), 128.0))
    assert t.pos[1, p5] and t.labels[1, p5] == 2
    assert torch.equal(t.ltrb[1, p5] * 32, torch.full((4,), 128.0))


def test_regression_just_above_a_range_is_negative_at_that_level():
    # The same P3 location with l = t = r = b = 65: beyond P3's [-1, 64].
    t, shapes = assign((256, 256), [[centred_box(68, 68, 65)]])
    assert not t.pos[0, loc(shapes, 0, 68, 68)]


def test_centre_region_is_clipped_to_the_box():
    # A thin box near the left edge: 8 px wide, so the P3 centre square (half-side 1.5 * 8 = 12 around x = 14)
    # sticks out of it on both sides. Locations in that overhang are outside the box and must be negative.
    box = [10, 8, 18, 40]  # centre (14, 24); unclipped centre square x in (2, 26), y in (12, 36)
    t, shapes = assign((128, 128), [[box]])
    assert t.pos[0, loc(shapes, 0, 12, 20)]  # inside the box and the centre square
    assert not t.pos[0, loc(shapes, 0, 4, 20)]  # left of the box, inside the unclipped square
    assert not t.pos[0, loc(shapes, 0, 20, 28)]  # right of the box, inside the unclipped square
    assert (t.ltrb[t.pos] > 0).all()  # every positive lies strictly inside its box


def test_location_on_the_box_border_is_negative():
    # "strictly inside": the P3 location x = 12 sits exactly on the left edge of this box.
    on_border, _ = assign((128, 128), [[[12, 8, 20, 40]]])
    inside, shapes = assign((128, 128), [[[11.5, 8, 20, 40]]])  # control: half a pixel wider
    assert not on_border.pos[0, loc(shapes, 0, 12, 20)]
    assert inside.pos[0, loc(shapes, 0, 12, 20)]


def test_overlapping_boxes_give_the_location_to_the_smaller_box():
    big, small = [28, 28, 132, 132], [52, 52, 108, 108]  # both centred on (80, 80)
    # P3 location (76, 76) is positive for both: max ltrb 56 (big) and 32 (small), both inside P3's range.
    t, shapes = assign((256, 256), [[big, small], [small, big]], [[1, 2], [2, 1]])
    p = loc(shapes, 0, 76, 76)
    for b in range(2):  # whatever the order of the boxes in the annotation
        assert t.labels[b, p] == 2
        assert torch.equal(t.ltrb[b, p] * 8, torch.tensor([24.0, 24.0, 32.0, 32.0]))


def test_boxes_of_equal_area_give_the_location_to_the_first_box():
    # Two 40 x 40 boxes, shifted by 8 px, both containing the P3 location (76, 76) in their centre squares.
    a, b = [52, 52, 92, 92], [60, 60, 100, 100]
    t, shapes = assign((256, 256), [[a, b], [b, a]], [[1, 2], [2, 1]])
    p = loc(shapes, 0, 76, 76)
    assert t.labels[0, p] == 1 and t.labels[1, p] == 2  # the lower box index, whichever box it is


def test_image_without_boxes_is_all_background():
    t, _ = assign((256, 384), [[]])
    assert not t.pos.any()
    assert (t.labels == -1).all()


def test_image_without_boxes_next_to_one_with_boxes():
    boxes = [[10, 20, 90, 120], [100, 30, 250, 200]]
    batch, _ = assign((256, 256), [boxes, []], [[0, 2], []])
    alone, _ = assign((256, 256), [boxes], [[0, 2]])
    assert not batch.pos[1].any() and (batch.labels[1] == -1).all()
    assert batch.pos[0].any()
    assert torch.equal(batch.labels[0], alone.labels[0])
    assert torch.equal(batch.ltrb[0][batch.pos[0]], alone.ltrb[0][alone.pos[0]])


# ------------------------------------------------------------------------------------------------------
# the dense definition and the fast assignment == a per-image, per-box, per-location Python reference
# ------------------------------------------------------------------------------------------------------
def reference_assign(points, strides, ranges, boxes, labels, radius=1.5):
    """FCOS assignment for one image written as plainly as possible (FCOS Sec. 3.1-3.2), location by location."""
    out_labels, out_ltrb = [], []
    for (x, y), s, (lo, hi) in zip(points.tolist(), strides.tolist(), ranges.tolist()):
        best_area, label, ltrb = math.inf, -1, None
        for (x0, y0, x1, y1), c in zip(boxes.tolist(), labels.tolist()):
            l, t, r, b = x - x0, y - y0, x1 - x, y1 - y
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            in_centre = (max(cx - radius * s, x0) < x < min(cx + radius * s, x1)
                         and max(cy - radius * s, y0) < y < min(cy + radius * s, y1))
            in_range = lo <= max(l, t, r, b) <= hi
            area = (x1 - x0) * (y1 - y0)
            if in_centre and in_range and area < best_area:
                best_area, label, ltrb = area, c, [v / s for v in (l, t, r, b)]
        out_labels.append(label)
        out_ltrb.append(ltrb)
    return out_labels, out_ltrb


def random_boxes(n, h, w, g):
    """n integer boxes (exact arithmetic, so boundary cases are hit exactly) with distinct areas, sizes 8..w."""
    boxes = []
    while len(boxes) < n:
        bw, bh = (torch.exp(torch.empty(2).uniform_(math.log(8), math.log(w), generator=g))).long().tolist()
        bw, bh = min(bw, w), min(bh, h)
        x0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        y0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        box = [x0, y0, x0 + bw, y0 + bh]
        if bw * bh not in [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]:  # ties in area are unspecified
            boxes.append(box)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_dense_and_fast_assignment_equal_a_per_image_python_reference():
    g = torch.Generator().manual_seed(1)
    h, w = 512, 768
    points, strides, ranges, shapes = hr_grid(h, w)
    counts = [5, 0, 12, 1]
    boxes = [random_boxes(n, h, w, g) for n in counts]
    boxes[2] = torch.cat([boxes[2], torch.tensor([[20.0, 10.0, 760.0, 500.0]])])  # one box large enough for P7
    labels = [torch.randint(0, 5, (len(bx),), generator=g) for bx in boxes]
    t = assign_targets_dense(points, strides, ranges, boxes, labels)
    fast = assign_targets(points, strides, ranges, boxes, labels, shapes=shapes)
    assert torch.equal(fast.labels, t.labels) and torch.equal(fast.pos, t.pos) and torch.equal(fast.ltrb, t.ltrb)
    for b in range(len(counts)):
        ref_labels, ref_ltrb = reference_assign(points, strides, ranges, boxes[b], labels[b])
        assert t.labels[b].tolist() == ref_labels, f"image {b}"
        assert torch.equal(t.pos[b], torch.tensor(ref_labels) >= 0), f"image {b}"
        pos = t.pos[b].nonzero().flatten().tolist()
        assert torch.allclose(t.ltrb[b, pos], torch.tensor([ref_ltrb[i] for i in pos]).reshape(-1, 4))
    # the case is not vacuous: every level position has positives somewhere in the batch
    level_of = torch.cat([torch.full((hh * ww,), i) for i, (hh, ww) in enumerate(shapes)])
    assert set(level_of[t.pos.any(0)].tolist()) == set(range(5))


# ------------------------------------------------------------------------------------------------------
# centre-ness and losses
# ------------------------------------------------------------------------------------------------------
def test_centerness_target_is_one_at_a_box_centre():
    t, shapes = assign((256, 256), [[centred_box(100, 100, 40)]])  # (100, 100) is a P3 location
    p = loc(shapes, 0, 100, 100)
    assert t.pos[0, p]
    assert t.centerness[0, p] == 1.0


def test_centerness_target_follows_fcos_eq3_off_centre():
    ltrb = torch.tensor([[[1.0, 2.0, 3.0, 2.0], [1.0, 1.0, 4.0, 9.0]]])  # 1 x 2 x 4
    t = Targets(torch.zeros(1, 2, dtype=torch.long), ltrb, torch.ones(1, 2, dtype=torch.bool))
    expected = torch.tensor([[math.sqrt(1 / 3 * 2 / 2), math.sqrt(1 / 4 * 1 / 9)]])
    assert torch.allclose(t.centerness, expected)


def test_focal_loss_sum_equals_torchvision():
    logits = torch.randn(4, 50, 7) * 3
    onehot = (torch.rand(4, 50, 7) < 0.1).float()
    expected = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="sum")
    assert torch.allclose(focal_loss_sum(logits, logits[onehot > 0]), expected, rtol=1e-5)


def test_giou_loss_ltrb_equals_torchvision_giou_with_plus_one_smoothing():
    pred = torch.rand(200, 4) * 20 + 0.5  # l, t, r, b around a shared point
    target = torch.rand(200, 4) * 20 + 0.5
    weight = torch.rand(200)
    to_xyxy = lambda d: torch.stack([-d[:, 0], -d[:, 1], d[:, 2], d[:, 3]], dim=1)  # the point is the origin
    p, t = to_xyxy(pred), to_xyxy(target)
    iou = torchvision.ops.box_iou(p, t).diagonal()
    giou = torchvision.ops.generalized_box_iou(p, t).diagonal()
    # AdelaiDet smooths IoU as (inter + 1) / (union + 1); recover inter and union from torchvision's IoU.
    areas = torchvision.ops.box_area(p) + torchvision.ops.box_area(t)
    union = areas / (1 + iou)
    inter = iou * union
    smoothed_giou = (inter + 1) / (union + 1) - (iou - giou)  # (iou - giou) is torchvision's enclosure term
    expected = ((1 - smoothed_giou) * weight).sum()
    assert torch.allclose(giou_loss_ltrb(pred, target, weight), expected, rtol=1e-4)


def test_giou_loss_is_zero_for_a_perfect_prediction():
    target = torch.rand(10, 4) * 30 + 1
    assert giou_loss_ltrb(target, target, torch.ones(10)).abs() < 1e-5


# ------------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------------
def test_decode_maps_one_confident_location_to_its_box_in_original_pixels():
    points, strides, _, shapes = hr_grid(256, 256)
    L, K = len(points), 3
    cls = torch.full((1, L, K), -10.0)
    box = torch.zeros(1, L, 4)
    ctr = torch.full((1, L), -10.0)
    p = loc(shapes, 1, 72, 88)  # a P4 location, stride 16
    cls[0, p, 2], ctr[0, p] = 5.0, 5.0
    box[0, p] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # in stride units
    # resized 200 x 250 from an original of 400 x 500: original pixels are twice the resized ones
    out = decode(HeadOutputs(cls, box, ctr), Geometry(points, strides, None, shapes), [(200, 250)], [(400, 500)])[0]
    assert out["labels"].tolist() == [2]
    expected = torch.tensor([[72 - 16, 88 - 32, 72 + 48, 88 + 64]], dtype=torch.float32) * 2
    assert torch.allclose(out["boxes"], expected)
    assert torch.allclose(out["scores"], torch.sigmoid(torch.tensor([5.0])))  # sqrt(cls * ctr)


def test_decode_drops_boxes_that_clipping_leaves_with_zero_width_or_height():
    points, strides, _, shapes = hr_grid(256, 256)
    L, K = len(points), 3
    cls, box, ctr = torch.full((1, L, K), -10.0), torch.ones(1, L, 4), torch.full((1, L), -10.0)
    inside, right, below = loc(shapes, 0, 60, 60), loc(shapes, 0, 220, 60), loc(shapes, 0, 60, 220)  # P3, stride 8
    for p, label in ((inside, 0), (right, 1), (below, 2)):
        cls[0, p, label], ctr[0, p] = 5.0, 5.0
    # the image is 200 x 200 inside its 256 x 256 canvas: the right and bottom locations sit in the padding,
    # 12 px past the border with an 8 px reach, so clipping leaves them zero width / zero height
    out = decode(HeadOutputs(cls, box, ctr), Geometry(points, strides, None, shapes), [(200, 200)], [(200, 200)])[0]
    assert out["labels"].tolist() == [0]
    assert torch.allclose(out["boxes"], torch.tensor([[52.0, 52.0, 68.0, 68.0]]))


def test_decode_keeps_at_most_100_sorted_boxes_inside_the_original_image():
    points, strides, _, shapes = hr_grid(256, 384)
    B, L, K = 2, len(points), 4
    cls = torch.randn(B, L, K) * 2  # many candidates above the 0.05 threshold
    box = torch.rand(B, L, 4) * 6  # up to 6 strides: many boxes cross the image border
    ctr = torch.randn(B, L)
    image_sizes, orig_sizes = [(200, 300), (256, 384)], [(400, 600), (128, 192)]
    results = decode(HeadOutputs(cls, box, ctr), Geometry(points, strides, None, shapes), image_sizes, orig_sizes)
    assert len(results) == B
    for r, (H0, W0) in zip(results, orig_sizes):
        assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == 100  # plenty of candidates: capped
        bx = r["boxes"]
        assert (bx >= 0).all() and (bx[:, 0::2] <= W0 + 1e-3).all() and (bx[:, 1::2] <= H0 + 1e-3).all()
        assert (bx[:, 2:] > bx[:, :2]).all()  # no box of zero width or height
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        assert ((r["labels"] >= 0) & (r["labels"] < K)).all()
    assert results[0]["boxes"][:, 2].max() > 300  # rescaled up to the 600 px wide original, not left resized


@pytest.mark.parametrize("n", [0, 1, 60, 3000])  # torchvision switches to a per-class loop above 1000 boxes
def test_class_nms_is_torchvisions_class_wise_nms(n):
    xy = torch.rand(n, 2) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2) * 80 + 1], dim=1)
    scores, labels = torch.rand(n), torch.randint(0, 5, (n,))
    assert torch.equal(class_nms(boxes, scores, labels, 5, 0.6), torchvision.ops.batched_nms(boxes, scores, labels, 0.6))


def test_torchvision_rule_thresholds_the_joint_score_and_keeps_empty_boxes():
    points, strides, _, shapes = hr_grid(256, 256)
    L = len(points)
    cls, box, ctr = torch.full((L, 2), -10.0), torch.ones(L, 4), torch.full((L,), -10.0)  # 8 px each side at P3
    strong, weak, padding = loc(shapes, 0, 60, 60), loc(shapes, 0, 100, 60), loc(shapes, 0, 220, 60)
    cls[strong, 0], ctr[strong] = 3.0, 3.0  # sqrt(0.95 * 0.95) = 0.95
    cls[weak, 1], ctr[weak] = 3.0, -3.0  # cls 0.95 passes the released 0.05, sqrt(0.95 * 0.047) = 0.21 < 0.3
    cls[padding, 1], ctr[padding] = 3.0, 3.0  # x 212..228, in the padding: clipped to zero width at x = 200
    size = torch.tensor([200, 200])
    _, _, labels = decode_image(cls, box, ctr, points, strides, shapes, size, score_thresh=0.3, rule="torchvision")
    assert sorted(labels.tolist()) == [0, 1]  # the strong one and the empty box clipped to x = 200
    _, _, labels = decode_image(cls, box, ctr, points, strides, shapes, size, score_thresh=0.3)
    assert sorted(labels.tolist()) == [0, 1]  # released rule: the weak one passes, the empty box is dropped
    boxes, _, _ = decode_image(cls, box, ctr, points, strides, shapes, size, score_thresh=0.3)
    assert sorted(boxes[:, 0].tolist()) == [52, 92]


def test_locations_without_the_half_stride_offset_are_torchvisions():
    shapes = [(2, 3), (1, 2)]
    points, strides = make_points(shapes, [8, 16], torch.device("cpu"), offset=False)
    assert points.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8], [0, 0], [16, 0]]
    assert make_points(shapes, [8, 16], torch.device("cpu"))[0][0].tolist() == [4, 4]


# ------------------------------------------------------------------------------------------------------
# the whole detector
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_r50_fcos_params():
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    return sum(p.numel() for p in tv.parameters())


def test_r50_fcos_has_torchvisions_parameter_count_within_1_percent(torchvision_r50_fcos_params):
    ours = sum(p.numel() for p in build_model("fcos", ModelConfig(p6_from="p5", num_classes=91)).parameters())
    assert abs(ours - torchvision_r50_fcos_params) / torchvision_r50_fcos_params < 0.01


def test_r50_fcos_with_batchnorm_differs_from_torchvision_only_by_the_five_scales(torchvision_r50_fcos_params):
    # torchvision builds an untrained backbone with trainable BatchNorm; ours with norm="bn" matches it layer
    # for layer, plus one learnable Scale per level position (FCOS Sec. 3.3) that torchvision's head lacks.
    model = build_model("fcos", ModelConfig(p6_from="p5", num_classes=91, norm="bn"))
    assert sum(p.numel() for p in model.parameters()) - torchvision_r50_fcos_params == 5


def test_a_few_sgd_steps_on_one_batch_reduce_the_loss(tiny_cfg, make_batch, train_losses):
    model = build_model("fcos", tiny_cfg).train()
    batch = make_batch([[[10, 12, 70, 90], [60, 60, 120, 110]], [[30, 20, 100, 60]]], sizes=(128, 128),
                       labels_per_image=[[0, 1], [2]])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(30):
        loss = sum(train_losses(model, batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-5:]) / 5 < 0.7 * history[0], history  # the last steps, not one lucky step


@pytest.mark.parametrize("kind", ["fcos", "student", "teacher"])
def test_batch_without_positives_gives_finite_losses_and_a_gradient_to_every_parameter(kind, tiny_cfg, make_batch,
                                                                                       train_losses):
    # DDP without find_unused_parameters needs every trainable parameter in the graph on every process.
    model = build_model(kind, tiny_cfg).train()
    losses = train_losses(model, make_batch([[], []], sizes=(128, 128)))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    assert any(n.startswith("head.") for n, _ in model.named_parameters())
