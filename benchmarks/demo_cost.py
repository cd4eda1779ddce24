"""Inference cost of the demo models, counted as evaluate.py reports it: GFLOPs per image on the demo val set.

`evaluate.py` and the training scripts put `gflops` (msad.cost: convolutions and matrix products, 2 FLOPs per
multiply-add, on the first evaluation batch) and `params_m` in their final line. This script counts the same
thing for every model of the demo ablation (benchmarks/reproduce.py), over every val batch as the evaluation
loader pads it, and on one unpadded 256x384 image (its 128x192 half for the naive LR detector), without
training anything (FLOPs do not depend on the weights):

  hr_fcos        FCOS on P3-P7, HR test size (256)
  naive_lr_fcos  FCOS on P3-P7, LR test size (128); its batch is padded to a multiple of the P7 stride, 128
  student        the MSAD student: FCOS on P2-P6 of the half-size HR batch (the demo preset's FPN 32, 2 convs)
  fFhH           light students: --fpn-channels F --head-convs H

    python benchmarks/demo_cost.py                      # about 30 s on one CPU core
    python benchmarks/demo_cost.py --light 28x1,32x0    # other light students
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from msad.align import HR_PAD  # noqa: E402
from msad.cli import PRESETS  # noqa: E402
from msad.cost import count_params, flops_per_image  # noqa: E402
from msad.data import CocoDetection  # noqa: E402
from msad.decode import Detector  # noqa: E402
from msad.models import ModelConfig, build_model, default_branch  # noqa: E402
from msad.samplers import build_eval_loader  # noqa: E402
from speed_parts import make_batch  # noqa: E402


def gflops_per_image(model, dataset, batch_size: int) -> float:
    """Mean GFLOPs per image over the whole val set, batched and padded as evaluate.py does."""
    total, images = 0.0, 0
    for batch in build_eval_loader(dataset, batch_size, 0, 1, 0, HR_PAD):
        n = batch.images.shape[0]
        total, images = total + flops_per_image(model, batch) * n, images + n
    return total / images / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "synthetic"), help="demo dataset root")
    p.add_argument("--light", default="16x0,16x1,24x0,24x1,28x1,32x0,32x1", help="light students FxH")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "demo_cost"))
    args = p.parse_args(argv)
    common = PRESETS["demo"]["common"]
    ann = os.path.join(args.data, "annotations", "instances_val2017.json")
    with open(ann) as f:
        num_classes = len(json.load(f)["categories"])
    hr_size, max_size = common["test_size"], common["max_size"]
    arch = {k: common[k] for k in ("backbone", "width", "norm", "freeze_at", "fpn_channels", "head_convs",
                                   "cff_hidden")}
    models = {"hr_fcos": ("fcos", hr_size, {}), "naive_lr_fcos": ("fcos", hr_size // 2, {}),
              "student": ("student", hr_size, {})}
    for v in args.light.split(","):
        f, h = map(int, v.split("x"))
        models[f"f{f}h{h}"] = ("student", hr_size, {"fpn_channels": f, "head_convs": h})
    rows = {}
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and leaves the other core alone
    for name, (kind, test_size, change) in models.items():
        cfg = ModelConfig(**{**arch, "num_classes": num_classes, **change})
        model = Detector(build_model(kind, cfg), default_branch(kind, cfg)).eval()
        dataset = CocoDetection(ann, os.path.join(args.data, "val2017"), False, (test_size,),
                                max_size * test_size // hr_size)
        # The same picture unpadded: one 256x384 HR image (students halve it), or its 128x192 half for naive LR.
        h, w = (256, 384) if test_size == hr_size else (128, 192)
        rows[name] = {"test_size": test_size, "params_m": round(count_params(model) / 1e6, 4),
                      "gflops": round(gflops_per_image(model, dataset, common["eval_batch_size"]), 4),
                      "gflops_unpadded": round(flops_per_image(model, make_batch(1, h, w, 1, num_classes)) / 1e9, 4),
                      **change}
    naive, naive_unpadded = rows["naive_lr_fcos"]["gflops"], rows["naive_lr_fcos"]["gflops_unpadded"]
    lines = ["| model | test size | FPN | head convs | params (M) | GFLOPs / image | vs naive LR | "
             "unpadded 256x384 image: GFLOPs | vs naive LR |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        r["vs_naive_lr"] = round(r["gflops"] / naive, 3)
        r["unpadded_vs_naive_lr"] = round(r["gflops_unpadded"] / naive_unpadded, 3)
        lines.append(f"| `{name}` | {r['test_size']} | {r.get('fpn_channels', arch['fpn_channels'])} | "
                     f"{r.get('head_convs', arch['head_convs'])} | {r['params_m']:.3f} | {r['gflops']:.3f} | "
                     f"{r['vs_naive_lr']:.2f}x | {r['gflops_unpadded']:.3f} | {r['unpadded_vs_naive_lr']:.2f}x |")
    with open(args.out + ".json", "w") as f:
        json.dump({"data": args.data, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"out": args.out + ".json", "naive_lr_gflops": naive,
                      **{k: r["vs_naive_lr"] for k, r in rows.items()}}))


if __name__ == "__main__":
    main()
