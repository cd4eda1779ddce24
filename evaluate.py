"""COCO box AP of any MSAD checkpoint, or of an existing detections file (paper Tables 1-4 use COCO val2017), and
mask AP (mask_AP, ...) beside it for a model with a mask branch or a results file with segmentations.

    python evaluate.py                                                    # the demo student
    python evaluate.py --checkpoint runs/coco_student/model_final.pth     # student, 400 px (HR test size 800)
    python evaluate.py --checkpoint runs/coco_teacher/model_final.pth --branch fused   # teacher, 800 + 400 px
    python evaluate.py --checkpoint runs/coco_teacher/model_final.pth --branch lr      # aligned MS training, LR
    torchrun --nproc_per_node 8 evaluate.py --checkpoint ...              # sharded, merged on rank 0
    python evaluate.py --detections dets.json --val-ann data/coco/annotations/instances_val2017.json
    python evaluate.py --images my_photos --vis runs/eval/vis    # no annotations: detections.json + pictures
    python evaluate.py --checkpoint runs/student/student.pt2      # a program of python -m msad.export
"""
import argparse
import json
import os
import sys

from msad import dist, outdir, runner, vis
from msad.align import HR_PAD
from msad.cli import add_data_args, make_output_dir, parse, print_metrics_line, resolve, run_script, show_preset_values
from msad.data import CocoDetection, ImageFolder, check_images_exist
from msad.samplers import build_eval_loader
from msad.diagnostics import CFFWeights
from msad.checkpoint import load_checkpoint, write_json_atomic
from msad.cost import model_cost
from msad.decode import Detector
from msad.engine import AMP_DTYPES
from msad.export import load_exported
from msad.evaluation import (canvas_multiple, check_categories, check_results, coco_metrics, detect_images, evaluate,
                             has_segmentation, load_results)
from msad.models import checkpoint_categories, model_from_checkpoint

DEFAULT_CHECKPOINT = "runs/student/model_final.pth"  # where the demo's train_student.py writes the student
DATA_KEYS = ("preset", "data_root", "val_ann", "val_images", "test_size", "max_size", "mask_head")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.set_defaults(preset=None)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="a model_final.pth or checkpoint.pth, or a .pt2 program of python -m msad.export")
    g.add_argument("--branch", choices=("fused", "hr", "lr"), help="teacher branch (default fused)")
    g.add_argument("--detections", help="evaluate this COCO results json against --val-ann instead of a model")
    g.add_argument("--output-dir", default="runs/eval", help="detections.json, metrics.json, visualisations")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="mixed precision on CUDA")
    g.add_argument("--images", help="detect on every .jpg/.png of this folder (no annotations): writes "
                   "OUTPUT_DIR/detections.json with file names, boxes in original pixels, scores, class ids and names")
    g.add_argument("--score-thresh", type=float, default=0.0,
                   help="keep only detections scoring at least this, in what is written, scored and drawn "
                        "(the model itself keeps sigmoid(cls) > 0.05, as in the paper)")
    g.add_argument("--vis", help="write pictures of the detections (and of the ground truth, if any) into this folder")
    g.add_argument("--vis-count", type=int, help="how many images --vis draws (default 8; all with --images)")
    g.add_argument("--vis-thresh", type=float, default=0.3, help="--vis draws detections scoring at least this")
    return parse(show_preset_values(p, None), argv)


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
    return (coco_metrics(gt.coco, results, gt.image_ids, masks=has_segmentation(results))
            | {"images": len(gt.image_ids), "detections": args.detections})


def detect_folder(args, info, model, ckpt, pad: int) -> dict | None:
    """--images: detections.json for a folder of images, pictures with --vis; the summary on rank 0."""
    dataset = ImageFolder(args.images, args.test_size, args.max_size)
    loader = build_eval_loader(dataset, args.eval_batch_size, info.rank, info.world_size, args.workers, pad)
    entries, skipped, first = detect_images(model, loader, dataset, info.device, checkpoint_categories(ckpt),
                                            args.output_dir, args.amp, args.score_thresh)
    if not info.is_main:
        return None
    metrics = {"images": len(entries), "skipped": skipped, "detections": sum(len(e["scores"]) for e in entries),
               "output": os.path.join(args.output_dir, "detections.json")} | model_cost(model, first)
    if args.vis:
        count = len(entries) if args.vis_count is None else args.vis_count
        metrics["vis"] = vis.save_pictures(vis.folder_items(dataset, entries, count), args.vis, vis_thresh(args))
    return metrics


def val_data(args, info, ckpt) -> CocoDetection:
    """The val set, checked before any inference: its images exist, and its categories are the model's."""
    dataset = runner.val_dataset(args)
    check_images_exist(dataset)
    categories = checkpoint_categories(ckpt)
    unscored = check_categories(categories, dataset, f"--checkpoint {args.checkpoint}")
    if unscored and info.is_main:
        print(f"note: {dataset.ann_file} holds {len(dataset.cat_ids)} of the model's {len(categories[0])} categories; "
              f"the detections of the other {len(unscored)} are left out", file=sys.stderr, flush=True)
    return dataset


def evaluate_val(args, info, model, dataset, ckpt, pad: int):
    """COCO evaluation on the checked val set, labels mapped through the checkpoint's category ids."""
    loader = build_eval_loader(dataset, args.eval_batch_size, info.rank, info.world_size, args.workers, pad)
    return evaluate(model, loader, dataset, info.device, args.output_dir, args.amp, args.score_thresh,
                    cat_ids=checkpoint_categories(ckpt)[0])


def vis_thresh(args) -> float:
    return max(args.vis_thresh, args.score_thresh)


def main(argv=None):
    args = parse_args(argv)  # bad flags first (cli.parse): nothing is created for a command that cannot run
    for flag in ("output_dir", "vis"):  # fail now, not after the inference
        make_output_dir(getattr(args, flag), f"--{flag.replace('_', '-')}")
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0 writes the outputs: one run at a time per folder
        outdir.lock_output_dir(args.output_dir)
    if args.detections:
        metrics = evaluate_file(args)
        write_json_atomic(metrics, os.path.join(args.output_dir, "metrics.json"))
        print_metrics_line(metrics)
        return metrics
    exported = args.checkpoint.endswith((".pt2", ".onnx"))  # a program of python -m msad.export
    if exported:
        program, ckpt = load_exported(args.checkpoint)
    else:
        ckpt = load_checkpoint(args.checkpoint, made_by="python train_student.py" if args.checkpoint ==
                               DEFAULT_CHECKPOINT else "train_teacher.py or train_student.py")
    # the configuration: the preset's data and evaluation settings, then the data the model was trained for, then
    # the flags
    args = resolve(args, None, ckpt["args"], inherit=DATA_KEYS)
    scale = program.scale if exported else 1
    if scale > 1:  # a program of python -m msad.export --input low: the image resized once to the low resolution
        args = argparse.Namespace(**{**vars(args), "test_size": args.test_size // scale, "max_size": args.max_size // scale})
    info = dist.init_distributed(args.device)
    if not args.images:  # --images reads no dataset
        runner.check_data_root(args, info, training=False)
    dataset = None if args.images else val_data(args, info, ckpt)
    pad = HR_PAD // scale if exported else canvas_multiple(ckpt)  # a program takes canvases of multiples of 128 (64)
    model = program.to_device(info.device, args.branch) if exported else \
        Detector(*model_from_checkpoint(ckpt, args.checkpoint, args.branch)).to(info.device)
    if args.images:
        metrics = detect_folder(args, info, model, ckpt, pad)
        cff_weights = None
    else:
        with CFFWeights(getattr(model, "model", None) if model.branch == "fused" else None) as cff:  # C-FF a_H, a_L
            evaluated = evaluate_val(args, info, model, dataset, ckpt, pad)
        cff_weights = cff.summary()  # a collective: every rank calls it
        metrics = None if evaluated is None else evaluated[0] | model_cost(model, evaluated[1])
        if info.is_main and args.vis:
            count = 8 if args.vis_count is None else args.vis_count
            with open(os.path.join(args.output_dir, "detections.json")) as f:
                items = vis.coco_items(dataset, json.load(f), count)
            metrics["vis"] = vis.save_pictures(items, args.vis, vis_thresh(args))
    if info.is_main:
        metrics |= {"cff_weights": cff_weights} if cff_weights else {}
        metrics |= {"checkpoint": args.checkpoint, "kind": ckpt["kind"], "branch": model.branch,
                    "test_size": args.test_size, **({"input": "low"} if scale > 1 else {})}
        write_json_atomic(metrics, os.path.join(args.output_dir, "metrics.json"))
        print_metrics_line(metrics)
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    run_script(main)
