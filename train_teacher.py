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
from msad.cli import model_config, parse, resolve, run_script, show_preset_values, training_parser, with_categories
from msad.decode import Detector
from msad.fcos_loss import FCOSLoss
from msad.models import MASK_KEYS, build_model, default_branch, init_backbone, load_partial
from msad.teacher_loss import FUSED_WEIGHT, TeacherLoss

NEW_IN_TEACHER = ("fpn.lateral.p2.", "fpn.output.p2.")  # P2 (the LR branch's first level), absent from a P3-P7 FCOS


def parse_args(argv=None):
    """The flags as given, checked (cli.parse); the configuration is built from them in main (cli.resolve)."""
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
    return parse(show_preset_values(p, "teacher"), argv)  # --mode single takes the students' schedule


def load_init(flags) -> dict | None:
    """The --init-from detector, read once (None without it, and for a --resume of a started run, whose
    checkpoint.pth holds everything)."""
    if not flags.init_from or runner.resumed_args(flags) is not None:
        return None
    return load_checkpoint(flags.init_from, expected_kind="fcos",
                           made_by="train_teacher.py --mode single or python -m msad.convert")


def init_from_detector(model, args, init: dict, train_set) -> None:
    """--init-from: the detector's backbone, FPN and head (its classes must be the data's); says what it loaded."""
    source = init["args"]
    if list(source.get("cat_ids") or range(source["num_classes"])) != list(train_set.cat_ids):
        raise ValueError(f"--init-from {args.init_from} detects {source['num_classes']} classes with other category "
                         f"ids than the training data's {train_set.num_classes}; train on the same categories")
    report = load_partial(model, init["model"], f"--init-from {args.init_from}", new=NEW_IN_TEACHER + MASK_KEYS,
                          remedy="give the detector's --backbone / --width / --fpn-channels / --head-convs, or none")
    fresh = report["new"] + [k for k in model.state_dict() if k.startswith("fusion.")]
    print(f"init-from {args.init_from}: loaded {len(report['loaded'])} tensors (backbone, FPN P3-P7, head); "
          f"new: {len(fresh)} ({', '.join(fresh)})", flush=True)


def main(argv=None):
    # the configuration: preset, then the --init-from detector's architecture (or the resumed run's), then the flags
    flags = parse_args(argv)
    kind = "teacher" if flags.mode == "aligned" else "fcos"
    init = load_init(flags)
    source = runner.resumed_args(flags) or (init["args"] if init else None)
    args = resolve(flags, "teacher" if kind == "teacher" else "fcos", source)

    # the output folder (refusal to replace a run, lock), the processes, the data root: before any work
    runner.claim_output_dir(args)
    info = runner.init_processes(args)
    runner.check_data_root(args, info)

    # data: the training set; the val set of the final evaluation checked now against its categories
    train_set = runner.train_dataset(args)
    args = with_categories(args, train_set)
    runner.checked_val_set(args, (train_set.cat_ids, train_set.class_names))

    # model: the teacher (HR P3-P7 + LR P2-P6 + C-FF) or vanilla FCOS, with --mask-head its mask code's basis; DDP
    args, code = runner.mask_basis(args, info, init["model"] if init else None)
    model = build_model(kind, model_config(args))
    if init is not None:
        init_from_detector(model, args, init, train_set)
    else:
        init_backbone(model, args.backbone_weights)
    runner.set_mask_code(model, code)
    model = runner.prepare_model(model, args, info)
    model_ddp = runner.ddp(model, info)

    # the loss: L_HR + L_LR + 0.4 L_fused (Sec. 3.2), or FCOS's own; optimizer and lr schedule
    mask_code = getattr(model, "mask_code", None)
    criterion = TeacherLoss(args.fused_weight, mask_code) if kind == "teacher" else FCOSLoss(mask_code)
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
