r"""Stage 2 of MSAD: distil the frozen multi-scale teacher into a low-resolution student (paper Sec. 3.4).

The student is FCOS on P2..P6 of the half-size image; its pyramid imitates the teacher's fused pyramid
with L_KD = w * sum_l mean |S_l - F_l|, on top of its FCOS loss: w = alpha * T = 0.2 x 3 = 0.6 in the released
code (--preset coco), 2 in the demo preset, with a linear warm-up over 500 iterations (100 in the demo).
At 5 iterations it logs diagnostics to log.jsonl (msad/diagnostics.py).

CPU demo (after `python train_teacher.py`):
    python train_student.py
COCO on 8 GPUs (students: batch 16, 90k iterations):
    torchrun --nproc_per_node 8 train_student.py --preset coco --data-root data/coco \
        --teacher runs/coco_teacher/model_final.pth --amp bf16 --output-dir runs/coco_student
Ablation without distillation (same student, same schedule):  ... --kd-weight 0
A light student (thin FPN, no head towers), distilled through 1x1 adapters, initialised from ImageNet:
    ... train_student.py --preset coco --fpn-channels 128 --head-convs 0 --init imagenet ...
"""
import os

from msad import engine, runner
from msad.checkpoint import load_checkpoint
from msad.cli import (model_config, parse, preset_value, resolve, run_script, show_preset_values, training_parser,
                      with_categories)
from msad.decode import Detector
from msad.diagnostics import StudentProbe, probe_iterations
from msad.distill import DISTANCES, NORMALIZE, DistillationLoss, FeatureDistillation, TrainableStudent, build_adapters
from msad.engine import LOG
from msad.output_kd import OutputDistillation
from msad.models import build_model, frozen_teacher, init_backbone, load_partial

SHAPE_KEYS = ("backbone", "width", "fpn_channels", "head_convs")  # what --init teacher needs to be the teacher's


def parse_args(argv=None):
    p = training_parser(__doc__, default_output="runs/student")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default="runs/teacher/model_final.pth", help="teacher checkpoint (kind teacher)")
    g.add_argument("--kd-weight", type=float,
                   help="distillation weight: alpha * T = 0.2 x 3 in the released code; 0 trains without KD")
    g.add_argument("--kd-warmup", type=int, help="iterations of the linear KD warm-up (the preset's; 500 on COCO)")
    g.add_argument("--kd-loss", choices=sorted(DISTANCES), default="l1", help="feature distance")
    g.add_argument("--kd-norm", choices=NORMALIZE, default="none",
                   help="none (released): mean |S-F| per level; level: divided by mean |F| of that level")
    g.add_argument("--kd-outputs", type=float,
                   help="output distillation weight (the fused teacher's predictions as dense targets of the "
                        "student's, msad/output_kd.py; not in the released code); 0 turns it off. Adds to --kd-weight's term")
    g.add_argument("--kd-gamma", type=float, help="focal exponent of the output classification term, |p_T - p_S|^gamma")
    g.add_argument("--kd-output-terms", type=lambda t: tuple(t.split(",")), default=("cls", "box"),
                   help="which output terms: a comma-separated subset of cls,box,ctr")
    g.add_argument("--init", choices=("teacher", "imagenet", "scratch"), default="teacher",
                   help="student initialisation: teacher backbone+FPN+head (released code), ImageNet, or random")
    return parse(show_preset_values(p, "student"), argv)


def load_teacher(flags) -> dict | None:
    """The teacher checkpoint, read once: needed to distil from it, and to start from it (--init teacher) unless
    this is a --resume of a started run. None when neither."""
    distil = preset_value(flags, "kd_weight", "student") > 0 or preset_value(flags, "kd_outputs", "student") > 0
    if not (distil or flags.init == "teacher" and runner.resumed_args(flags) is None):
        return None
    return load_checkpoint(flags.teacher, expected_kind="teacher", made_by="python train_teacher.py")


def check_init(args, teacher_ckpt: dict | None) -> None:
    """--init teacher copies the teacher's weights, so the student must have the teacher's shapes: one-line error."""
    teacher_args = teacher_ckpt["args"] if teacher_ckpt is not None else {}
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)} (teacher {teacher_args[k]})" for k in SHAPE_KEYS
              if k in teacher_args and getattr(args, k) != teacher_args[k]]
    if args.init == "teacher" and differ:
        raise ValueError(f"--init teacher copies {args.teacher}'s weights, but the student differs from it: "
                         f"{', '.join(differ)}; use --init imagenet or --init scratch for this student")


def main(argv=None):
    # the configuration: preset, then the teacher's architecture (the student's default), then the flags
    flags = parse_args(argv)
    teacher_ckpt = load_teacher(flags)
    args = resolve(flags, "student", teacher_ckpt["args"] if teacher_ckpt else runner.resumed_args(flags))
    check_init(args, teacher_ckpt)

    # the output folder (refusal to replace a run, lock), the processes, the data root: before any work
    runner.claim_output_dir(args)
    info = runner.init_processes(args)
    runner.check_data_root(args, info)

    # data: the training set; the val set of the final evaluation checked now against its categories
    train_set = runner.train_dataset(args)
    args = with_categories(args, train_set)
    runner.checked_val_set(args, (train_set.cat_ids, train_set.class_names))

    # model: the LR student (FCOS on P2-P6 of the half-size image) from the teacher or ImageNet (and its mask basis)
    args, code = runner.mask_basis(args, info, teacher_ckpt["model"] if teacher_ckpt else None)
    student = build_model("student", model_config(args))
    if teacher_ckpt is not None and teacher_ckpt["args"]["num_classes"] != train_set.num_classes:
        raise SystemExit(f"error: {args.teacher} was trained on {teacher_ckpt['args']['num_classes']} classes, "
                         f"the training data has {train_set.num_classes}")
    if args.init == "teacher" and teacher_ckpt is not None:  # (a resumed run's weights come from its checkpoint)
        load_partial(student, teacher_ckpt["model"], args.teacher)
    elif args.init == "imagenet":
        init_backbone(student, args.backbone_weights)
    runner.set_mask_code(student, code)  # the teacher's basis (a mask branch only)
    student = runner.prepare_model(student, args, info)

    # what trains: the student and, for a thinner student, the 1x1 adapters (saved in checkpoint.pth under
    # "aux", not in the student); DDP around both
    distil = args.kd_weight > 0 or args.kd_outputs > 0
    features = args.kd_weight > 0  # output distillation compares predictions: it needs no adapters
    adapters = build_adapters(args.fpn_channels, teacher_ckpt["args"]["fpn_channels"]) if features else None
    adapters = adapters.to(info.device) if adapters is not None else None
    trainable = TrainableStudent(student, adapters)
    model_ddp = runner.ddp(trainable, info)

    # the loss L_FCOS + L_KD: it holds the frozen teacher (eval mode, outside DDP and the checkpoint) and runs it
    teacher = frozen_teacher(teacher_ckpt, info.device) if distil else None
    probe = StudentProbe(probe_iterations(args.iters), os.path.join(args.output_dir, LOG))
    kd = FeatureDistillation(args.kd_weight, args.kd_warmup, args.kd_loss, args.kd_norm) if features else None
    kd_out = (OutputDistillation(args.kd_outputs, args.kd_gamma, args.kd_output_terms, args.kd_warmup)
              if args.kd_outputs > 0 else None)
    criterion = DistillationLoss(teacher, kd, kd_out, probe, getattr(student, "mask_code", None))

    # optimizer and lr schedule: the student's and the adapters' parameters
    optimizer, scheduler = runner.optimizer_and_schedule(trainable, args)

    # the loop: losses = criterion(model_ddp(batch.images), batch, iteration); checkpoints the student
    result = engine.train(model_ddp, criterion, student, optimizer, scheduler,
                          runner.train_batches(args, info, train_set), runner.train_config(args, info, "student"),
                          aux={"adapters": adapters} if adapters is not None else None)

    # evaluation of the final student at low resolution and the metrics line
    metrics = runner.final_evaluation(args, info, Detector(student, "lr"), result)
    diagnostics = {"diagnostics": probe.summary()} if probe.records else {}
    summary = {"kind": "student", "kd_weight": args.kd_weight, "kd_outputs": args.kd_outputs, **diagnostics}
    return runner.finish(args, info, result, metrics | summary)


if __name__ == "__main__":
    run_script(main)
