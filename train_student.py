"""Stage 2 of MSAD: distil the frozen multi-scale teacher into a low-resolution student (paper Sec. 3.4).

The student is FCOS on P2..P6 of the half-size image; its pyramid imitates the teacher's fused pyramid
with L_KD = 0.2 * 3 * sum_l mean |S_l - F_l| (linear warm-up over 500 iterations; 100 in the 400-iteration
demo), on top of its FCOS loss. At 5 iterations it logs diagnostics to log.jsonl (msad/diagnostics.py).

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

import torch

from msad import runner
from msad.cli import model_config, resolve, run_script, training_parser
from msad.diagnostics import StudentProbe, probe_iterations
from msad.distill import DISTANCES, KD_WEIGHT, NORMALIZE, FeatureDistillation, build_adapters
from msad.checkpoint import load_checkpoint
from msad.engine import LOG
from msad.models import DistilledStudent, ModelConfig, build_model, init_backbone, load_partial

ARCH_KEYS = ("backbone", "width", "norm", "freeze_at", "fpn_channels", "head_convs", "p6_from", "low_res_mode")
SHAPE_KEYS = ("backbone", "width", "fpn_channels", "head_convs")  # what --init teacher needs to be the teacher's


def parse_args(argv=None):
    p = training_parser(__doc__, default_output="runs/student")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default="runs/teacher/model_final.pth", help="teacher checkpoint (kind teacher)")
    g.add_argument("--kd-weight", type=float, default=KD_WEIGHT, help="alpha * T (0.2 x 3 = %(default)s); 0 trains without KD")
    g.add_argument("--kd-warmup", type=int, help="iterations of the linear KD warm-up (the preset's; 500 on COCO)")
    g.add_argument("--kd-loss", choices=sorted(DISTANCES), default="l1", help="feature distance")
    g.add_argument("--kd-norm", choices=NORMALIZE, default="none",
                   help="none (released): mean |S-F| per level; level: divided by mean |F| of that level")
    g.add_argument("--init", choices=("teacher", "imagenet", "scratch"), default="teacher",
                   help="student initialisation: teacher backbone+FPN+head (released code), ImageNet, or random")
    return p.parse_args(argv)


def check_init(args, teacher_args: dict) -> None:
    """--init teacher copies the teacher's weights, so the student must have the teacher's shapes: one-line error."""
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)} (teacher {teacher_args[k]})" for k in SHAPE_KEYS
              if k in teacher_args and getattr(args, k) != teacher_args[k]]
    if args.init == "teacher" and differ:
        raise ValueError(f"--init teacher copies {args.teacher}'s weights, but the student differs from it: "
                         f"{', '.join(differ)}; use --init imagenet or --init scratch for this student")


def load_teacher(ckpt: dict, device) -> torch.nn.Module:
    """The frozen teacher: eval mode, no gradients, outside DDP and outside the student checkpoint."""
    teacher = build_model("teacher", ModelConfig.from_dict(ckpt["args"]))
    teacher.load_state_dict(ckpt["model"])
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def main(argv=None):
    args = parse_args(argv)
    ckpt = None
    if args.init == "teacher" or args.kd_weight > 0:
        ckpt = load_checkpoint(args.teacher, expected_kind="teacher", made_by="python train_teacher.py")
        for key in ARCH_KEYS:  # the student's architecture defaults to the teacher's
            if getattr(args, key) is None and key in ckpt["args"]:
                setattr(args, key, ckpt["args"][key])
        check_init(args, ckpt["args"])
    args = resolve(args, "student")
    info = runner.start(args)
    train_set = runner.train_dataset(args)
    student = build_model("student", model_config(args, train_set.num_classes))
    teacher = None
    if ckpt is not None:
        if ckpt["args"]["num_classes"] != train_set.num_classes:
            raise SystemExit(f"error: {args.teacher} was trained on {ckpt['args']['num_classes']} classes, "
                             f"the training data has {train_set.num_classes}")
        teacher = load_teacher(ckpt, info.device)
        if args.init == "teacher":
            load_partial(student, ckpt["model"], args.teacher)
    if args.init == "imagenet":
        init_backbone(student, args.backbone_weights)
    student = runner.prepare_model(student, args, info)
    kd = FeatureDistillation(args.kd_weight, args.kd_warmup, args.kd_loss, args.kd_norm)
    # A student thinner than the teacher distils through 1x1 adapters (trained, kept out of the student).
    adapters = build_adapters(args.fpn_channels, ckpt["args"]["fpn_channels"]) if args.kd_weight > 0 else None
    adapters = adapters.to(info.device) if adapters is not None else None
    probe = StudentProbe(probe_iterations(args.iters), os.path.join(args.output_dir, LOG))
    trainable = runner.ddp(DistilledStudent(student, kd, adapters, probe), info)

    def step(batch, iteration):
        teacher_feats = teacher.distillation_targets(batch) if args.kd_weight > 0 else None  # no_grad inside
        return trainable(batch, teacher_feats, iteration)

    result = runner.fit(args, info, "student", student, step, train_set,
                        aux={"adapters": adapters} if adapters is not None else None)
    diagnostics = {"diagnostics": probe.summary()} if probe.records else {}
    return runner.finish(args, info, student, result, {"kind": "student", "kd_weight": args.kd_weight, **diagnostics})


if __name__ == "__main__":
    run_script(main)
