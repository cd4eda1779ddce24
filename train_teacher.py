"""Stage 1 of MSAD: aligned multi-scale training of the teacher with C-FF (paper Sec. 3.2-3.3),
or a vanilla FCOS baseline with --mode single.

CPU demo (no flags: generates data/synthetic, trains the demo teacher):
    python train_teacher.py
COCO, the paper's R50 teacher on 8 GPUs (released recipe: batch 8, 180k iterations):
    torchrun --nproc_per_node 8 train_teacher.py --preset coco --data-root data/coco \
        --backbone-weights weights/resnet50.pth --amp bf16 --output-dir runs/coco_teacher
Multi-node (2 x 8 GPUs): on every node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_teacher.py ...
Baselines (the paper's Table 1), vanilla FCOS on P3..P7:
    ... train_teacher.py --preset coco --mode single                       # HR, 800 px
    ... train_teacher.py --preset coco --mode single --train-sizes 320,336,352,368,384,400 --max-size 667 --test-size 400
    ... train_teacher.py --preset coco --mode single --train-sizes 320,...,800 --test-size 400   # vanilla multi-scale
"""
from msad import engine, runner
from msad.cli import model_config, resolve, run_script, show_preset_values, training_parser
from msad.models import FUSED_WEIGHT, build_model, init_backbone


def parse_args(argv=None):
    p = training_parser(__doc__, default_output="runs/teacher")
    g = p.add_argument_group("MSAD teacher")
    g.add_argument("--mode", choices=("aligned", "single"), default="aligned",
                   help="aligned: MSAD teacher (HR P3-P7 + LR P2-P6 + fused); single: vanilla FCOS on P3-P7")
    g.add_argument("--no-fusion", action="store_true", help="aligned multi-scale training without C-FF (ablation)")
    g.add_argument("--cff-hidden", type=int, help="C-FF gate hidden width (default: the preset's; 0 = FPN width / 8)")
    g.add_argument("--fused-weight", type=float, default=FUSED_WEIGHT,
                   help="loss weight of the fused branch (released: %(default)s)")
    args = show_preset_values(p, "teacher").parse_args(argv)  # --mode single takes the students' schedule
    return resolve(args, "teacher" if args.mode == "aligned" else "fcos")


def main(argv=None):
    args = parse_args(argv)
    args.fusion = not args.no_fusion
    kind = "teacher" if args.mode == "aligned" else "fcos"
    info = runner.start(args)  # output folder, process group, seeds, data checks: everything that can fail early

    # data
    train_set = runner.train_dataset(args)

    # model: the teacher (HR P3-P7 + LR P2-P6 + C-FF) or vanilla FCOS; DDP around it
    model = build_model(kind, model_config(args))
    init_backbone(model, args.backbone_weights)
    model = runner.prepare_model(model, args, info)
    model_ddp = runner.ddp(model, info)

    # optimizer and lr schedule
    optimizer, scheduler = runner.optimizer_and_schedule(model, args)

    # the loop: every step is model_ddp(batch, iteration) -> dict of losses; checkpoints, resume, log.jsonl
    result = engine.train(model_ddp, model, optimizer, scheduler, runner.train_batches(args, info, train_set),
                          runner.train_config(args, info, kind))

    # evaluation of the final model (the fused branch for the teacher) and the metrics line
    metrics = runner.final_evaluation(args, info, model, result)
    return runner.finish(args, info, result, metrics | {"kind": kind})


if __name__ == "__main__":
    run_script(main)
