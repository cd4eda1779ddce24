"""The pyramid shift of MSAD Sec. 3.1: with the LR input exactly half the HR input,
LR P_l has the shape of HR P_(l+1), and targets computed in either frame are the same."""
import pytest
import torch
import torch.nn.functional as F

from msad import align
from msad.imagenet import normalize
from msad.align import make_points
from msad.align import SIZE_RANGES, level_ranges
from msad.fcos_loss import assign_targets
from msad.models import build_model

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.fixture
def tiny_teacher(tiny_cfg):
    return build_model("teacher", tiny_cfg).eval()


# Raw image sizes (h, w): odd, non-square, smaller than one P7 cell, exact multiples, and COCO-large.
IMAGE_SIZES = [(37, 53), (128, 128), (129, 255), (333, 201), (480, 640), (800, 1333)]


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=[f"{h}x{w}" for h, w in IMAGE_SIZES])
def test_lr_pyramid_level_l_has_the_shape_of_hr_level_l_plus_1(size, tiny_teacher, make_batch):
    batch = make_batch([[]], sizes=size)  # padded to a multiple of 128 by the data pipeline
    H, W = batch.images.shape[-2:]
    assert H % align.HR_PAD == 0 and W % align.HR_PAD == 0
    x = normalize(batch.images)
    with torch.no_grad():
        hr = tiny_teacher.pyramid(x, align.branch_levels(1.0))  # P3..P7 of the HR batch
        lr = tiny_teacher.pyramid(align.make_low_res(x), align.branch_levels(0.5))  # P2..P6 of the LR batch
    for i, (h, l) in enumerate(zip(hr, lr)):
        stride = 2 ** (3 + i)
        assert h.shape == l.shape == (1, 32, H // stride, W // stride), f"HR P{3 + i} vs LR P{2 + i}"
    align.check_aligned(hr, lr)  # does not raise


def test_check_aligned_names_the_mismatched_level():
    hr = [torch.zeros(1, 8, 64 // 2 ** i, 64 // 2 ** i) for i in range(5)]
    lr = [f.clone() for f in hr]
    lr[2] = torch.zeros(1, 8, 17, 16)  # position 2: HR P5 (16 x 16) vs LR P4
    with pytest.raises(ValueError, match=r"HR P5 \(1, 8, 16, 16\) != LR P4 \(1, 8, 17, 16\)"):
        align.check_aligned(hr, lr)


def test_check_aligned_rejects_pyramids_of_different_length():
    hr = [torch.zeros(1, 8, 4, 4)] * 5
    with pytest.raises(ValueError, match="length"):
        align.check_aligned(hr, hr[:4])


def test_nearest_low_res_equals_interpolate_nearest_at_half_scale():
    x = torch.randn(2, 3, 128, 256)
    expected = F.interpolate(x, scale_factor=0.5, mode="nearest")
    assert torch.equal(align.make_low_res(x, "nearest"), expected)


def test_antialiased_low_res_has_half_the_size():
    x = torch.randn(2, 3, 128, 256)
    y = align.make_low_res(x, "antialias")
    assert y.shape == (2, 3, 64, 128)
    assert not torch.allclose(y, align.make_low_res(x, "nearest"))  # a real filter, not subsampling


def test_low_res_rejects_an_odd_sized_batch():
    with pytest.raises(ValueError, match="divisible by 2"):
        align.make_low_res(torch.zeros(1, 3, 127, 128))


def test_branch_levels_shift_down_by_one_at_half_resolution():
    assert align.branch_levels(1.0) == (3, 4, 5, 6, 7)
    assert align.branch_levels(0.5) == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("scale", [0.75, 2.0])
def test_pyramid_offset_rejects_scales_that_break_the_alignment(scale):
    with pytest.raises(ValueError, match="alignment"):
        align.pyramid_offset(scale)


def test_targets_in_lr_coordinates_equal_targets_in_hr_coordinates():
    # MSAD Sec. 3.1: the LR branch may equally work in LR pixels, with strides 4..64, halved size ranges
    # and halved boxes; labels and stride-normalised regression targets must come out the same.
    H, W = 384, 512  # a padded HR batch
    shapes = [(H // s, W // s) for s in align.hr_strides()]  # HR P3..P7 == LR P2..P6 (previous tests)
    hr_points, hr_strides = make_points(shapes, align.hr_strides(), torch.device("cpu"))
    lr_points, lr_strides = make_points(shapes, [s // 2 for s in align.hr_strides()], torch.device("cpu"))
    lr_ranges = tuple((lo if lo < 0 else lo / 2, hi / 2) for lo, hi in SIZE_RANGES)  # [-1,32], [32,64], ...
    assert torch.equal(lr_points * 2, hr_points)  # the same locations, in two frames

    g = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for n in (6, 0, 15):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * 0.8 + 4
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([W, H]))], dim=1))
        labels.append(torch.randint(0, 4, (n,), generator=g))

    hr = assign_targets(hr_points, hr_strides, level_ranges(shapes), boxes, labels, shapes=shapes)
    lr = assign_targets(lr_points, lr_strides, level_ranges(shapes, lr_ranges), [b / 2 for b in boxes], labels,
                        shapes=shapes)
    assert hr.pos.sum() > 20
    assert torch.equal(lr.labels, hr.labels)
    assert torch.equal(lr.pos, hr.pos)
    assert torch.allclose(lr.ltrb[lr.pos], hr.ltrb[hr.pos])
