"""The steps of the training scripts (and evaluate.py's set-up), each named for what it does: the output folder,
the process group, the data root, the data sets, device placement and DDP, the optimizer, the loop's
configuration, the final evaluation and the metrics line.

The scripts call them in order, so each reads top to bottom (configuration, output folder, processes, data,
model, loss, optimizer, loop, evaluation).
"""
import argparse
import json
import os
import signal
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from . import dist, engine, masks, outdir, samplers
from .align import HR_PAD
from .checkpoint import CHECKPOINT, load_checkpoint, write_json_atomic
from .outdir import FINAL
from .cli import PRESETS, data_paths, print_metrics_line, seed_everything
from .cost import model_cost
from .data import CocoDetection, check_images_exist
from .samplers import build_eval_loader, build_train_loader
from .evaluation import check_categories, evaluate


def claim_output_dir(args) -> None:
    """The output folder, before the process group exists, so that every rank fails alike in the first second:
    a --resume of a finished run exits 0 here (`exit_if_finished`); rank 0 refuses to replace a run, then
    creates, test-writes and locks the folder (outdir.claim_output_dir); the other ranks only check."""
    if args.resume and not args.overwrite:  # both: refused just below
        exit_if_finished(args)
    if int(os.environ.get("RANK", 0)) == 0:
        outdir.claim_output_dir(args.output_dir, args.resume, args.overwrite)
    else:  # read-only: the same refusal on every rank
        outdir.check_output_dir(args.output_dir, args.resume, args.overwrite)


def init_processes(args) -> dist.DistInfo:
    """The process group (one process without torchrun), the seeds of this rank, the configuration printed."""
    info = dist.init_distributed(args.device)
    if info.is_main:  # engine.train keeps it in config.json at the start
        print("config: " + json.dumps(plain_args(args), sort_keys=True), flush=True)
    seed_everything(args.seed, info.rank)
    return info


def resumed_args(args) -> dict | None:
    """The configuration of the run that --resume continues (OUTPUT_DIR/config.json, beside its checkpoint.pth),
    or None for a new run: a resumed run needs no --init-from or --init teacher file again."""
    config = os.path.join(args.output_dir, "config.json")
    if not (args.resume and os.path.isfile(os.path.join(args.output_dir, CHECKPOINT)) and os.path.isfile(config)):
        return None
    with open(config) as f:
        return json.load(f)


def checked_val_set(args, categories: tuple) -> CocoDetection | None:
    """The val set of the final evaluation, checked now rather than after the training (None with --no-eval): its
    json parses, its images exist, and its categories are among the training set's (`categories`: ids, names)."""
    if args.no_eval:
        return None
    dataset = val_dataset(args)
    check_images_exist(dataset)
    check_categories(categories, dataset, f"the training set {data_paths(args, 'train')[0]}")
    return dataset


def exit_if_finished(args) -> None:
    """--resume of a run that already reached --iters: nothing to do, nothing touched (every rank; exit 0).

    The final line is the run's metrics.json, so that a chain of --resume commands goes on as after training."""
    final = os.path.join(args.output_dir, FINAL)
    if not os.path.isfile(final):
        return
    done = int(load_checkpoint(final).get("iteration", 0))
    if done < args.iters:
        return  # a longer --iters continues from checkpoint.pth
    if int(os.environ.get("RANK", 0)) == 0:
        metrics_path = os.path.join(args.output_dir, "metrics.json")
        metrics = {"iterations": done}
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
        print(f"already finished at iteration {done} ({final}); nothing to do (give a larger --iters to train "
              f"longer)", file=sys.stderr, flush=True)
        print_metrics_line(metrics)
    raise SystemExit(0)


DEMO_ROOT = os.path.normpath(PRESETS["demo"]["common"]["data_root"])  # the only folder ever generated


def check_data_root(args, info: dist.DistInfo, training: bool = True) -> None:
    """Generate the demo data at its default location (training only); any other missing root is an error.

    A mistyped COCO path, or a COCO root without --preset coco, must not silently become synthetic data.
    """
    splits = ("train", "val") if training else ("val",)
    if all(getattr(args, f"{s}_{k}") for s in splits for k in ("ann", "images")):
        return  # every path given explicitly: the root is not used
    root = args.data_root
    if training and args.preset == "demo" and os.path.normpath(root) == DEMO_ROOT:
        if info.is_main:
            from .synthetic import ensure_synthetic
            ensure_synthetic(root)
        dist.barrier()
        return
    if not os.path.isdir(root):
        hint = (" (the demo data is generated by the training scripts, in the folder they run from)" if
                os.path.normpath(root) == DEMO_ROOT else "; for COCO add --preset coco and check the path"
                if "coco" in root.lower() and args.preset != "coco" else
                " (expected annotations/instances_{train,val}2017.json, train2017/ and val2017/ under it)")
        raise FileNotFoundError(f"--data-root {root} does not exist{hint}")
    synthetic = os.path.isfile(os.path.join(root, "meta.json"))  # ours: written by msad.synthetic
    if args.preset == "demo" and not synthetic and os.path.isdir(os.path.join(root, "annotations")) and info.is_main:
        print(f"warning: the demo preset (a small CPU model) on {root}; add --preset coco for the paper's recipe",
              file=sys.stderr)


def has_masks(args) -> bool:
    """Whether the configured model has a mask branch (--mask-head meinst, or a checkpoint's)."""
    return getattr(args, "mask_head", None) == "meinst"


def train_dataset(args) -> CocoDetection:
    """The training set (its categories go into the configuration: cli.with_categories), with each object's mask in
    its box for a model with a mask branch (a json without segmentation is then one line naming it)."""
    ann, images = data_paths(args, "train")
    return CocoDetection(ann, images, train=True, sizes=args.train_sizes, max_size=args.max_size, masks=has_masks(args))


def val_dataset(args) -> CocoDetection:
    """The val set; for a mask model its json must hold segmentations (COCOeval segm reads them from it)."""
    ann, images = data_paths(args, "val")
    dataset = CocoDetection(ann, images, train=False, sizes=(args.test_size,), max_size=args.max_size,
                            masks=has_masks(args))
    if args.max_images:
        dataset.image_ids = dataset.image_ids[: args.max_images]
    return dataset


def mask_basis(args, info: dist.DistInfo, state: dict | None = None):
    """(the configuration with the code's length `mask_dim`, the masks.MaskCode for `set_mask_code`) of a model
    with a mask branch; (args, None) without one, and for a --resume of a started run (its checkpoint holds it).

    The basis is, in order: the one in `state` (the teacher's weights for a student, an --init-from detector's),
    --mask-codes, or fitted at start on the training json's masks (rank 0 fits, every rank gets its result), so
    every later stage and evaluate.py use the same basis."""
    if not has_masks(args) or resumed_args(args) is not None:
        return args, None
    if state is not None and "mask_code.components" in state:
        code, origin = masks.MaskCode.from_state(state, "mask_code."), "the source weights"
    elif args.mask_codes:
        code, origin = masks.load(args.mask_codes), args.mask_codes
    else:
        ann = data_paths(args, "train")[0]
        fitted = None
        if info.is_main:  # rank 0 fits, every rank gets its result
            generator = torch.Generator().manual_seed(args.seed)  # the soft-target noise of the fit
            fitted = masks.fit(masks.annotation_masks(ann), generator=generator).state_dict()
        code, origin = masks.MaskCode.from_state(dist.all_gather_objects(fitted)[0]), f"fitted on {ann}"
    if info.is_main:
        print(f"mask code: {code.components.shape[0]} components of {code.size}x{code.size} masks, {origin}",
              flush=True)
    return argparse.Namespace(**{**vars(args), "mask_dim": code.components.shape[0]}), code


def set_mask_code(model: torch.nn.Module, code) -> None:
    """Copy the basis of `mask_basis` into the model's mask branch (nothing when there is none to copy)."""
    if code is not None:
        model.mask_code.load_state_dict(code.state_dict())


def prepare_model(model: torch.nn.Module, args, info: dist.DistInfo) -> torch.nn.Module:
    """Device, SyncBN under DDP, channels_last on CUDA (faster convolutions), optional torch.compile."""
    if args.norm == "syncbn" and info.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics over the global batch
    model = model.to(info.device)
    if info.device.type == "cuda":  # channels_last speeds up the convolutions; GroupNorm in the head would copy it
        model.backbone.to(memory_format=torch.channels_last)
        model.fpn.to(memory_format=torch.channels_last)
    if args.compile:
        model.backbone.compile()  # in place: state_dict keys stay those of the plain module
    return model


def ddp(model: torch.nn.Module, info: dist.DistInfo) -> torch.nn.Module:
    """DDP around the trainable model only; every parameter is used every step, so no find_unused_parameters."""
    if info.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def optimizer_and_schedule(model: torch.nn.Module, args):
    """SGD (momentum 0.9, no weight decay on norm layers) and the warm-up multi-step schedule, as released."""
    optimizer = engine.build_optimizer(model, args.lr, weight_decay=args.weight_decay)
    return optimizer, engine.build_scheduler(optimizer, warmup_iters=args.warmup_iters, steps=args.steps)


def train_batches(args, info, train_set):
    """start_iter -> iterator over this process's training batches from that iteration on (for --resume)."""
    def batches(start_iter: int):
        return iter(build_train_loader(train_set, args.batch_per_process, info.rank, info.world_size, args.seed,
                                       args.workers, HR_PAD, start_iter))
    return batches


def train_config(args, info, kind: str) -> engine.TrainConfig:
    return engine.TrainConfig(output_dir=args.output_dir, iters=args.iters, kind=kind, args=plain_args(args),
                              checkpoint_period=args.checkpoint_period, log_period=args.log_period,
                              clip_grad=args.clip_grad, amp=args.amp, resume=args.resume,
                              overwrite=args.overwrite, device=info.device)


def evaluate_model(args, info, model, output_dir=None, min_score=0.0):
    """COCO evaluation of `model` on the validation set (sharded): (metrics, first batch) on rank 0, else None.
    The caller adds the model's cost on that batch (cost.model_cost), outside any hooks it put on the model."""
    dataset = val_dataset(args)
    loader = build_eval_loader(dataset, args.eval_batch_size, info.rank, info.world_size, args.workers, HR_PAD)
    return evaluate(model, loader, dataset, info.device, output_dir, args.amp, min_score)


def final_evaluation(args, info, model, result: dict) -> dict:
    """COCO AP of the trained model on rank 0 ({} with --no-eval, after a stop, and on the other ranks)."""
    if args.no_eval or result.get("stopped"):
        return {}
    evaluated = evaluate_model(args, info, model, output_dir=args.output_dir)
    return {} if evaluated is None else evaluated[0] | model_cost(model, evaluated[1])


def finish(args, info, result: dict, metrics: dict) -> dict | None:
    """metrics.json and the final JSON line (the loop's result, then `metrics`) on rank 0.

    A run stopped by SIGINT / SIGTERM (checkpoint saved) then exits 130 / 143, its last line saying how to resume.
    Under torchrun every rank does, together (a barrier first): torchrun stops the other ranks with SIGTERM as
    soon as one rank has exited, so a rank still closing down then exits with the same status, not killed.
    """
    metrics = {"output_dir": args.output_dir, **{k: v for k, v in result.items() if not isinstance(v, dict)},
               **metrics}
    if info.is_main:
        write_json_atomic(metrics, os.path.join(args.output_dir, "metrics.json"))
        print_metrics_line(metrics)
    if not result.get("stopped"):
        dist.cleanup()
        return metrics if info.is_main else None
    # not 0: `train_teacher.py && train_student.py` must not go on with no teacher
    code = 128 + signal.Signals[result["signal"]]  # 130 after SIGINT, 143 after SIGTERM (shell convention)
    if info.is_main:
        print(f"interrupted by {result['signal']} at iteration {result['iterations']} of {args.iters}: "
              f"rerun the same command with --resume to continue from "
              f"{os.path.join(args.output_dir, CHECKPOINT)}", file=sys.stderr, flush=True)
    if info.world_size > 1:
        # torchrun sends SIGTERM to the other ranks as soon as one has exited, and Python restores the default
        # handlers while it shuts down, so a rank still shutting down would be reported killed (-15). Everything
        # is written and said: the workers go now, and each rank leaves at once, a late SIGTERM leaving alike.
        samplers.kill_loader_workers()
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
        dist.barrier()
        dist.cleanup()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    dist.cleanup()
    raise SystemExit(code)



def plain_args(args) -> dict:
    """Arguments as plain Python values (checkpoints load with weights_only=True)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
