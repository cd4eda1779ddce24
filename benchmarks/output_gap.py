"""How far a student's predictions stay from its teacher's fused predictions, per level and per term.

The diagnosis behind benchmarks/output_kd.py: on the val images (the demo's, at the test size), the frozen teacher's
fused head and each student's head run on the same batch; at every location of the aligned grid it measures the
terms of msad/output_kd.py without weights or normalisers:

  cls  mean over locations of sum over classes of KL(p_T || p_S)
  box  mean of 1 - GIoU(student ltrb, teacher ltrb), weighted by the teacher's score max_k p_T * ctr_T
  ctr  mean of KL(ctr_T || ctr_S), the same weights
  top  share of the locations the teacher scores above 0.05 where the student's best class is the teacher's

per level position (student P2 / fused P3 ... P6 / P7). Reads the checkpoints; trains nothing.

    python benchmarks/output_gap.py --teacher runs/output_kd/seed0/teacher800/model_final.pth \
        --students runs/output_kd/seed0/student_nokd_t800/model_final.pth,runs/output_kd/seed0/student_outputs_t800/model_final.pth
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msad.align import HR_PAD  # noqa: E402
from msad.checkpoint import load_checkpoint  # noqa: E402
from msad.data import CocoDetection  # noqa: E402
from msad.decode import level_slices  # noqa: E402
from msad.models import frozen_teacher, model_from_checkpoint  # noqa: E402
from msad.output_kd import binary_kl, box_distance  # noqa: E402
from msad.samplers import build_eval_loader  # noqa: E402

TERMS = ("cls", "box", "ctr", "top")


@torch.no_grad()
def gaps(teacher, student, loader, max_batches: int) -> dict:
    """{term: [value per level position]} averaged over the batches."""
    sums = torch.zeros(len(TERMS), 5, dtype=torch.float64)
    weights = torch.zeros(len(TERMS), 5, dtype=torch.float64)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        t = teacher(batch.images, ("fused",))["fused"]
        s = student(batch.images)["lr"]
        p_t = torch.sigmoid(t.head.cls_logits)
        score = p_t.max(-1).values * torch.sigmoid(t.head.centerness)  # B x L
        kl_cls = binary_kl(s.head.cls_logits, t.head.cls_logits).sum(-1)  # B x L
        box = box_distance(s.head.box_regression, t.head.box_regression)
        kl_ctr = binary_kl(s.head.centerness, t.head.centerness)
        confident = (p_t.max(-1).values > 0.05).double()
        agree = (s.head.cls_logits.argmax(-1) == t.head.cls_logits.argmax(-1)).double()
        for level, (a, b) in enumerate(level_slices(t.geometry.shapes)):
            w = score[:, a:b].double()
            rows = ((kl_cls[:, a:b].double(), torch.ones_like(w)), (box[:, a:b].double(), w),
                    (kl_ctr[:, a:b].double(), w), (agree[:, a:b], confident[:, a:b]))
            for k, (value, weight) in enumerate(rows):
                sums[k, level] += (value * weight).sum()
                weights[k, level] += weight.sum()
    mean = sums / weights.clamp(min=1e-12)
    return {term: [round(v, 4) for v in mean[k].tolist()] for k, term in enumerate(TERMS)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--students", required=True, help="comma-separated student checkpoints")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--batches", type=int, default=25, help="val batches of 8 images")
    p.add_argument("--out", help="json file for the result")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    teacher = frozen_teacher(load_checkpoint(args.teacher, expected_kind="teacher"), "cpu")
    dataset = CocoDetection(os.path.join(args.data_root, "annotations", "instances_val2017.json"),
                            os.path.join(args.data_root, "val2017"), train=False, sizes=(args.test_size,),
                            max_size=args.max_size)
    result = {"teacher": args.teacher, "levels": ["P2/P3", "P3/P4", "P4/P5", "P5/P6", "P6/P7"], "students": {}}
    for path in args.students.split(","):
        student, _ = model_from_checkpoint(load_checkpoint(path, expected_kind="student"), path)
        loader = build_eval_loader(dataset, 8, 0, 1, 0, HR_PAD)
        result["students"][path] = gaps(teacher, student.eval(), loader, args.batches)
        print(json.dumps({path: result["students"][path]}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({"out": args.out, "students": len(result["students"])}))


if __name__ == "__main__":
    main()
