r"""Stage 1 of MSAD: aligned multi-scale training of the teacher with C-FF (paper Sec. 3.2-3.3),
or a vanilla FCOS baseline with --mode single.

CPU demo (no flags: generates data/synthetic, trains the demo teacher):
    python train_teacher.py
COCO, the paper's R50 teacher on 8 GPUs (released recipe: batch 8, 180k iterations):
    torchrun --nproc_per_node 8 train_teacher.py --preset coco --data-root data/coco \
        --backbone-weights weights/resnet50.pth --amp bf16 --output-dir runs/coco_teacher
Multi-node (2 x 8 GPUs): on every node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_teacher.py ...
From a trained HR detector (ours with --mode single, or public weights converted by python -m msad.convert):
    ... train_teacher.py --preset coco --init-from weights/fcos_torchvision.pth ...
Baselines (the paper's Table 1), vanilla FCOS on P3..P7:
    ... train_teacher.py --preset coco --mode single                       # HR, 800 px
    ... train_teacher.py --preset coco --mode single --train-sizes 320,336,352,368,384,400 --max-size 667 --test-size 400
    ... train_teacher.py --preset coco --mode single --train-sizes 320,...,800 --test-size 400   # vanilla multi-scale
"""
from msad import engine, runner
from msad.checkpoint import load_checkpoint
from msad.cli import inherit_architecture, model_config, resolve, run_script, show_preset_values, training_parser
from msad.decode import Detector
from msad.fcos_loss import FCOSLoss
from msad.models import build_model, default_branch, init_backbone, load_partial
from msad.teacher_loss import FUSED_WEIGHT, TeacherLoss

NEW_IN_TEACHER = ("fpn.lateral.p2.", "fpn.output.p2.")  # P2 (the LR branch's first level), absent from a P3-P7 FCOS


def parse_args(argv=None):
    p = training_parser(__doc__, default_output="runs/teacher")
    g = p.add_argument_group("MSAD teacher")
    g.add_argument("--mode", choices=("aligned", "single"), default="aligned",
                   help="aligned: MSAD teacher (HR P3-P7 + LR P2-P6 + fused); single: vanilla FCOS on P3-P7")
    g.add_argument("--no-fusion", action="store_true", help="aligned multi-scale training without C-FF (ablation)")
    g.add_argument("--cff-hidden", type=int, help="C-FF gate hidden width (default: the preset's; 0 = FPN width / 8)")
    g.add_argument("--fused-weight", type=float, default=FUSED_WEIGHT,
                   help="loss weight of the fused branch (released: %(default)s)")
    g.add_argument("--init-from", metavar="CKPT",
                   help="start from a trained HR detector (kind fcos: --mode single, or python -m msad.convert): "
                        "its backbone, FPN P3-P7 and head; P2 and C-FF start new. Its architecture is the default")
    args = show_preset_values(p, "teacher").parse_args(argv)  # --mode single takes the students' schedule
    if args.init_from:  # before resolve: the detector's architecture fills the unset flags, not the preset
        inherit_architecture(args, load_init(args)["args"])
    return resolve(args, "teacher" if args.mode == "aligned" else "fcos")


def load_init(args) -> dict:
    return load_checkpoint(args.init_from, expected_kind="fcos",
                           made_by="train_teacher.py --mode single or python -m msad.convert")


def init_from_detector(model, args, train_set) -> None:
    """--init-from: the detector's backbone, FPN and head (its classes must be the data's); says what it loaded."""
    init = load_init(args)
    source = init["args"]
    if list(source.get("cat_ids") or range(source["num_classes"])) != list(train_set.cat_ids):
        raise ValueError(f"--init-from {args.init_from} detects {source['num_classes']} classes with other category "
                         f"ids than the training data's {train_set.num_classes}; train on the same categories")
    report = load_partial(model, init["model"], f"--init-from {args.init_from}", new=NEW_IN_TEACHER,
                          remedy="give the detector's --backbone / --width / --fpn-channels / --head-convs, or none")
    fresh = report["new"] + [k for k in model.state_dict() if k.startswith("fusion.")]
    print(f"init-from {args.init_from}: loaded {len(report['loaded'])} tensors (backbone, FPN P3-P7, head); "
          f"new: {len(fresh)} ({', '.join(fresh)})", flush=True)


def main(argv=None):
    args = parse_args(argv)
    args.fusion = not args.no_fusion
    kind = "teacher" if args.mode == "aligned" else "fcos"
    info = runner.start(args)  # output folder, process group, seeds, data checks: everything that can fail early

    # data
    train_set = runner.train_dataset(args)

    # model: the teacher (HR P3-P7 + LR P2-P6 + C-FF) or vanilla FCOS; DDP around it
    model = build_model(kind, model_config(args))
    if args.init_from:
        init_from_detector(model, args, train_set)
    else:
        init_backbone(model, args.backbone_weights)
    model = runner.prepare_model(model, args, info)
    model_ddp = runner.ddp(model, info)

    # the loss: L_HR + L_LR + 0.4 L_fused (Sec. 3.2), or FCOS's own; optimizer and lr schedule
    criterion = TeacherLoss(args.fused_weight) if kind == "teacher" else FCOSLoss()
    optimizer, scheduler = runner.optimizer_and_schedule(model, args)

    # the loop: losses = criterion(model_ddp(batch.images), batch, iteration); checkpoints, resume, log.jsonl
    result = engine.train(model_ddp, criterion, model, optimizer, scheduler,
                          runner.train_batches(args, info, train_set), runner.train_config(args, info, kind))

    # evaluation of the final model (the fused branch for the teacher) and the metrics line
    detector = Detector(model, default_branch(kind, model.cfg))
    metrics = runner.final_evaluation(args, info, detector, result)
    return runner.finish(args, info, result, metrics | {"kind": kind})


if __name__ == "__main__":
    run_script(main)
