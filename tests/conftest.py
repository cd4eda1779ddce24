"""Shared fixtures of the model-core tests: a tiny model configuration and a batch builder.

Everything here runs on CPU in milliseconds: a ResNet-18 at width 0.25 with GroupNorm (per-sample, so
results do not depend on the batch composition), a 32-channel FPN and a 2-conv head.
"""
import pytest
import torch

from msad.data import collate
from msad.fcos_loss import FCOSLoss
from msad.models import ModelConfig, MultiScaleTeacher
from msad.teacher_loss import TeacherLoss


def pytest_configure(config):
    # pycocotools' mask.decode under numpy 2 warns on every call (its own code, not ours)
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture
def seeded():
    """A fixed RNG state and one intra-op thread for the duration of a test.

    The seed makes each random case reproducible when the test runs alone. One thread because these models
    are tiny: a second thread only adds synchronisation, and on a busy 2-core machine (other jobs running)
    the spinning threads make the suite ~5x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("seeded")`; the thread count is restored afterwards.
    """
    torch.manual_seed(0)
    yield from _threads(1)


def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module of tiny models (see `seeded`)."""
    yield from _threads(1)


@pytest.fixture(scope="module")
def two_threads():
    """Both cores for a module of full-size (R50) models."""
    yield from _threads(2)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(backbone="resnet18", width=0.25, norm="gn", freeze_at=0, fpn_channels=32, head_convs=2,
                       num_classes=3)


def _image(h: int, w: int, boxes: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 3 x h x w: grey noise with each box painted in a colour of its class (a learnable toy scene)."""
    image = torch.randint(90, 140, (3, h, w), dtype=torch.uint8, generator=generator)
    palette = torch.tensor([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]], dtype=torch.uint8)
    for (x0, y0, x1, y1), label in zip(boxes.round().long().tolist(), labels.tolist()):
        image[:, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = palette[label % len(palette), :, None, None]
    return image


def build_batch(boxes_per_image, sizes=(128, 128), labels_per_image=None, orig_sizes=None,
                size_divisible=128, seed=0):
    """An `msad.data.ImageBatch` as the data loader would make it (uint8, padded to 128, top-left aligned).

    boxes_per_image: one list of (x0, y0, x1, y1) per image, in resized pixels (may be empty).
    sizes: one (h, w) for all images or one per image; orig_sizes defaults to sizes (no resize).
    labels_per_image: defaults to class 0 for every box.
    """
    n = len(boxes_per_image)
    sizes = [tuple(sizes)] * n if isinstance(sizes[0], int) else [tuple(s) for s in sizes]
    orig_sizes = sizes if orig_sizes is None else [tuple(s) for s in orig_sizes]
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, boxes in enumerate(boxes_per_image):
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)  # N x 4
        labels = torch.zeros(len(boxes), dtype=torch.long) if labels_per_image is None \
            else torch.tensor(labels_per_image[i], dtype=torch.long).reshape(-1)
        target = {"boxes": boxes, "labels": labels, "image_id": i, "orig_size": orig_sizes[i], "size": sizes[i]}
        samples.append((_image(*sizes[i], boxes, labels, g), target))
    return collate(samples, size_divisible)


@pytest.fixture
def make_batch():
    """The `build_batch` helper, as a fixture: `make_batch([[box, ...], []], sizes=(h, w), ...)`."""
    return build_batch


@pytest.fixture
def train_losses():
    """`train_losses(model, batch)`: the loss a training script forms for the model: TeacherLoss for the
    multi-scale teacher, FCOSLoss for a detector or a student without distillation."""
    def losses(model, batch):
        criterion = TeacherLoss() if isinstance(model, MultiScaleTeacher) else FCOSLoss()
        return criterion(model(batch.images), batch)
    return losses
