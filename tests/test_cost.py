"""msad.cost: the params and GFLOPs per image that every evaluation reports (2 FLOPs per multiply-add)."""
import pytest
from torch import nn

from msad.cost import count_params, flops_per_image, model_cost
from msad.decode import Detector
from msad.models import build_model

pytestmark = pytest.mark.usefixtures("seeded")


class OneConv(nn.Module):
    """A detector stand-in with one 3x3 conv (stride 2, 3 -> 8 channels) on the batch's images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, batch):
        return self.conv(batch.images.float())


def test_gflops_equal_a_hand_count_of_one_conv(make_batch):
    batch = make_batch([[], [], []], sizes=(128, 256), size_divisible=32)  # 3 images, 3 x 128 x 256
    model = OneConv()
    macs_per_image = 8 * 64 * 128 * 3 * 3 * 3  # C_out x H_out x W_out x C_in x k x k
    assert flops_per_image(model, batch) == 2 * macs_per_image
    assert count_params(model) == 8 * 3 * 3 * 3 + 8
    assert model_cost(model, batch) == {"params_m": round(224 / 1e6, 4), "gflops": round(2 * macs_per_image / 1e9, 4)}


def test_detector_flops_are_per_image_and_params_are_the_inference_models(tiny_cfg, make_batch):
    student = Detector(build_model("student", tiny_cfg), "lr")
    one = flops_per_image(student, make_batch([[[10, 10, 60, 60]]]))
    two = flops_per_image(student, make_batch([[[10, 10, 60, 60]], [[20, 30, 90, 100]]]))
    assert one > 0 and two == pytest.approx(one)
    assert not student.training  # measured in inference mode
    assert count_params(student) == sum(p.numel() for p in student.parameters())
