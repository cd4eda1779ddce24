"""Three SGD steps of the tiny MSAD teacher on one fixed global batch of 2 images, the second without boxes.

    python tests/helpers/ddp_teacher.py OUT.pth                                  # one process, both images
    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/ddp_teacher.py OUT.pth   # one image each

Under DDP rank 1 has zero positives; with all-reduced normalisers the logged (global mean) losses and the
final weights must equal the single-process run, and nothing may hang.
"""
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import msad`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the conftest batch builder
from conftest import build_batch  # noqa: E402
from msad import dist  # noqa: E402
from msad.models import ModelConfig, build_model  # noqa: E402
from msad.teacher_loss import TeacherLoss  # noqa: E402


def main(out):
    info = dist.init_distributed("cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", width=0.25, norm="gn", freeze_at=0, fpn_channels=32, head_convs=2,
                      num_classes=3)
    model = build_model("teacher", cfg)
    trainable = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = build_batch([[(10, 12, 60, 70), (70, 20, 120, 100)], []], sizes=(128, 128), labels_per_image=[[0, 2], []])
    if info.world_size > 1:  # this rank's share of the global batch
        r = slice(info.rank, info.rank + 1)
        batch = replace(batch, images=batch.images[r], targets=batch.targets[r], image_sizes=batch.image_sizes[r],
                        orig_sizes=batch.orig_sizes[r], image_ids=batch.image_ids[r])
    history = []
    for _ in range(3):
        losses = TeacherLoss()(trainable(batch.images), batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(dist.all_reduce_mean(torch.stack([v.detach() for v in losses.values()])))
    if info.is_main:
        torch.save({"names": list(losses), "losses": torch.stack(history), "model": model.state_dict()}, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
