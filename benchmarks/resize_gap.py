"""How far our resize moves a converted torchvision FCOS's detections from torchvision's own, on images that
need resizing.

Both sides run the same weights (torchvision's fcos_resnet50_fpn, seeded random weights that detect something,
as tests/test_convert.py builds them; no COCO weights can be downloaded here) on the same files, resized to short
side 800 (long side at most 1333). Ours resizes the uint8 image with antialiasing (msad.data, as evaluation does)
and pads to 32 (the converted file's padding); torchvision resizes the float image bilinearly without antialiasing
(GeneralizedRCNNTransform). Without a resize the two are equal (tests/test_convert.py). For every torchvision
detection: the best IoU of one of ours of the same label, and the score difference of that match.

    python benchmarks/resize_gap.py --images data/synthetic/val2017 --count 8
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import numpy as np
import torch
from torchvision.ops import box_iou

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msad import convert  # noqa: E402
from msad.checkpoint import load_checkpoint  # noqa: E402
from msad.data import ImageFolder, decode_rgb  # noqa: E402
from msad.decode import Detector  # noqa: E402
from msad.models import model_from_checkpoint  # noqa: E402
from msad.samplers import build_eval_loader  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers"))
from seeded_torchvision import seeded_torchvision  # noqa: E402  (the converted-weights tests' detector)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="data/synthetic/val2017")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "resize_gap"))
    args = p.parse_args(argv)
    tv = seeded_torchvision()
    tmp = tempfile.mkdtemp(prefix="resize_gap_")
    torch.save(tv.state_dict(), f"{tmp}/tv.pth")
    convert.main(["torchvision", f"{tmp}/tv.pth", f"{tmp}/fcos.pth"])
    ckpt = load_checkpoint(f"{tmp}/fcos.pth")
    ours = Detector(*model_from_checkpoint(ckpt, "fcos.pth")).eval()
    os.makedirs(f"{tmp}/images")
    for name in sorted(os.listdir(args.images))[: args.count]:
        shutil.copy(os.path.join(args.images, name), f"{tmp}/images/{name}")
    dataset = ImageFolder(f"{tmp}/images", 800, 1333)
    ious, dscores, matched, total = [], [], 0, 0
    for batch in build_eval_loader(dataset, 1, 0, 1, 0, ckpt["args"]["size_divisible"]):
        mine = ours(batch)[0]
        image = torch.from_numpy(np.array(decode_rgb(dataset.image_path(batch.image_ids[0])))).permute(2, 0, 1)
        tv.transform.min_size, tv.transform.max_size = (800,), 1333
        theirs = tv([image.float() / 255])[0]
        labels = torch.tensor(convert.COCO_IDS)[mine["labels"]]  # ours are contiguous, torchvision's are ids
        iou = box_iou(theirs["boxes"], mine["boxes"]).nan_to_num(0.0) * (theirs["labels"][:, None] == labels[None])  # empty boxes: 0
        best, j = iou.max(1) if len(mine["boxes"]) else (torch.zeros(len(theirs["boxes"])), None)
        ious += best.tolist()
        if j is not None:
            dscores += (theirs["scores"] - mine["scores"][j]).abs().tolist()
        matched += int((best >= 0.95).sum())
        total += len(theirs["boxes"])
    result = {"images": args.count, "torchvision_detections": total, "matched_iou_0.95": round(matched / total, 3),
              "median_best_iou": round(statistics.median(ious), 4), "mean_best_iou": round(statistics.mean(ious), 4),
              "median_abs_score_diff": round(statistics.median(dscores), 4)}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
