"""The flow both training scripts share: process group, data, DDP, the engine, final evaluation, metrics.

train_teacher.py and train_student.py differ only in the model they build and the step they run;
everything around that lives here, once.
"""
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from . import dist, engine
from .align import HR_PAD
from .cli import data_paths, print_metrics_line, seed_everything
from .data import CocoDetection, build_eval_loader, build_train_loader
from .evaluation import evaluate


def start(args, demo_data: bool = True) -> dist.DistInfo:
    """Process group, per-process batch check, seeds, and the demo data (generated once, by rank 0, unless
    demo_data is False: evaluate.py --images needs no dataset)."""
    if hasattr(args, "batch_size"):  # checked before the process group exists: every rank fails the same way
        args.batch_per_process = dist.check_batch_size(args.batch_size, int(os.environ.get("WORLD_SIZE", 1)))
    info = dist.init_distributed(args.device)
    seed_everything(args.seed, info.rank)
    if demo_data and args.preset == "demo" and not (args.train_ann or args.val_ann):
        if info.is_main:
            from .synthetic import ensure_synthetic
            ensure_synthetic(args.data_root)
        dist.barrier()
    return info


def train_dataset(args) -> CocoDetection:
    """The training set; its category ids and names go into args, hence into every checkpoint."""
    ann, images = data_paths(args, "train")
    dataset = CocoDetection(ann, images, train=True, sizes=args.train_sizes, max_size=args.max_size)
    args.cat_ids, args.class_names = dataset.cat_ids, dataset.class_names
    return dataset


def val_dataset(args, test_size=None) -> CocoDetection:
    ann, images = data_paths(args, "val")
    size = test_size or args.test_size
    dataset = CocoDetection(ann, images, train=False, sizes=(size,), max_size=args.max_size * size // args.test_size)
    if args.max_images:
        dataset.image_ids = dataset.image_ids[: args.max_images]
    return dataset


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


def fit(args, info, kind: str, model: torch.nn.Module, step_fn, train_set, extra_state_fn=None) -> dict:
    """SGD + warm-up multi-step schedule + the shared engine loop (method.md Sec. 6 recipe)."""
    optimizer = engine.build_optimizer(model, args.lr, weight_decay=args.weight_decay)
    scheduler = engine.build_scheduler(optimizer, warmup_iters=args.warmup_iters, steps=args.steps)

    def data_iter(start_iter: int):
        return iter(build_train_loader(train_set, args.batch_per_process, info.rank, info.world_size, args.seed,
                                       args.workers, HR_PAD, start_iter))

    cfg = engine.TrainConfig(output_dir=args.output_dir, iters=args.iters, kind=kind, args=plain_args(args),
                             checkpoint_period=args.checkpoint_period, log_period=args.log_period,
                             clip_grad=args.clip_grad, amp=args.amp, resume=args.resume, device=info.device)
    return engine.train(step_fn, model, optimizer, scheduler, data_iter, cfg, extra_state_fn)


def evaluate_model(args, info, model, test_size=None, output_dir=None, min_score=0.0):
    """COCO evaluation of `model` on the validation set (sharded; metrics on rank 0, None elsewhere)."""
    dataset = val_dataset(args, test_size)
    loader = build_eval_loader(dataset, args.eval_batch_size, info.rank, info.world_size, args.workers, HR_PAD)
    return evaluate(model, loader, dataset, info.device, output_dir, args.amp, min_score)


def finish(args, info, model, result: dict, extra: dict | None = None) -> dict | None:
    """Final evaluation (unless --no-eval or stopped early), metrics.json and the final JSON line on rank 0."""
    metrics = {"output_dir": args.output_dir, **{k: v for k, v in result.items() if not isinstance(v, dict)}}
    if not args.no_eval and not result.get("stopped"):
        ap = evaluate_model(args, info, model, output_dir=args.output_dir)
        if info.is_main:
            metrics |= ap
    metrics |= extra or {}
    if info.is_main:
        engine.write_json_atomic(metrics, os.path.join(args.output_dir, "metrics.json"))
        print_metrics_line(metrics)
    dist.cleanup()
    return metrics if info.is_main else None


def plain_args(args) -> dict:
    """Arguments as plain Python values (checkpoints load with weights_only=True)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
