"""COCO box AP of any MSAD checkpoint, or of an existing detections file (paper Tables 1-4 use COCO val2017).

    python evaluate.py                                                    # the demo student
    python evaluate.py --checkpoint runs/coco_student/model_final.pth     # student, 400 px (HR test size 800)
    python evaluate.py --checkpoint runs/coco_teacher/model_final.pth --branch fused   # teacher, 800 + 400 px
    python evaluate.py --checkpoint runs/coco_teacher/model_final.pth --branch lr      # aligned MS training, LR
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ...              # sharded, merged on rank 0
    python evaluate.py --detections dets.json --val-ann data/coco/annotations/instances_val2017.json
"""
import argparse
import json
import os

from msad import dist, runner
from msad.cli import add_data_args, make_output_dir, print_metrics_line, resolve, run_script
from msad.data import CocoDetection
from msad.diagnostics import CFFWeights
from msad.engine import load_checkpoint, write_json_atomic
from msad.evaluation import check_results, coco_evaluate, load_results, visualize
from msad.models import model_from_checkpoint

DEFAULT_CHECKPOINT = "runs/student/model_final.pth"  # where the demo's train_student.py writes the student
DATA_KEYS = ("preset", "data_root", "val_ann", "val_images", "test_size", "max_size")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.set_defaults(preset=None)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a model_final.pth or checkpoint.pth")
    g.add_argument("--branch", choices=("fused", "hr", "lr"), help="teacher branch (default fused)")
    g.add_argument("--detections", help="evaluate this COCO results json against --val-ann instead of a model")
    g.add_argument("--output-dir", default="runs/eval", help="detections.json, metrics.json, visualisations")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="mixed precision on CUDA")
    g.add_argument("--vis", help="write images with predicted boxes drawn into this folder")
    g.add_argument("--vis-count", type=int, default=8, help="how many images --vis draws")
    return p.parse_args(argv)


def evaluate_file(args) -> dict:
    """The single-file path: no model, just COCOeval of a results file against the annotations."""
    if not args.val_ann:
        raise SystemExit("error: --detections needs --val-ann (the ground-truth annotation json)")
    gt = CocoDetection(args.val_ann, args.val_images or "", train=False, sizes=(800,), max_size=1333)
    if not gt.coco.dataset.get("annotations"):
        raise ValueError(f"--val-ann {args.val_ann} has no annotations: there is no ground truth to score "
                         f"--detections against")
    results = load_results(args.detections)
    check_results(results, args.detections, gt)
    return coco_evaluate(gt.coco, results, gt.image_ids) | {"images": len(gt.image_ids), "detections": args.detections}


def main(argv=None):
    args = parse_args(argv)
    for flag in ("output_dir", "vis"):  # fail now, not after the inference
        make_output_dir(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if args.detections:
        metrics = evaluate_file(args)
        write_json_atomic(metrics, os.path.join(args.output_dir, "metrics.json"))
        print_metrics_line(metrics)
        return metrics
    ckpt = load_checkpoint(args.checkpoint, made_by="python train_student.py" if args.checkpoint == DEFAULT_CHECKPOINT
                           else "train_teacher.py or train_student.py")
    for key in DATA_KEYS:  # evaluate on the data the model was trained for unless told otherwise
        if getattr(args, key) is None and ckpt["args"].get(key) is not None:
            setattr(args, key, ckpt["args"][key])
    args.preset, args.seed = args.preset or "demo", 0
    args = resolve(args, "student")
    info = runner.start(args, training=False)
    model = model_from_checkpoint(ckpt, args.checkpoint, args.branch).to(info.device)
    with CFFWeights(model if getattr(model, "branch", None) == "fused" else None) as cff:  # C-FF a_H, a_L
        metrics = runner.evaluate_model(args, info, model, output_dir=args.output_dir)
    cff_weights = cff.summary()  # a collective: every rank calls it
    if info.is_main:
        metrics |= {"cff_weights": cff_weights} if cff_weights else {}
        metrics |= {"checkpoint": args.checkpoint, "kind": ckpt["kind"], "branch": getattr(model, "branch", None)
                    or ("lr" if ckpt["kind"] == "student" else "hr"), "test_size": args.test_size}
        if args.vis:
            with open(os.path.join(args.output_dir, "detections.json")) as f:
                metrics["vis"] = visualize(runner.val_dataset(args), json.load(f), args.vis, args.vis_count)
        write_json_atomic(metrics, os.path.join(args.output_dir, "metrics.json"))
        print_metrics_line(metrics)
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    run_script(main)
