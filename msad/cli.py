"""Command-line plumbing shared by train_teacher.py, train_student.py and evaluate.py.

Presets hold whole recipes (the paper's COCO R50 recipe, the CPU demo); every flag left unset takes the
preset's value, and any flag given on the command line wins. Nothing here is special-cased per preset.
"""
import argparse
import json
import math
import os
import random
import re
import sys

import numpy as np
import torch

from .align import LR_MODES
from .checkpoint import WriteError
from .dist import check_batch_size
from .engine import AMP_DTYPES
from .distill import KD_WARMUP, KD_WEIGHT
from .meinst import MASK_HEADS
from .models import ModelConfig
from .outdir import test_write

COCO_SIZES = tuple(range(640, 801, 32))  # MSAD Sec. 3.2 / released code: short side drawn from {640, 672, ..., 800}
PRESETS = {
    # The paper's COCO recipe (MSAD Sec. 4 and the released code): R50, frozen BN, FPN 256, 4-conv GN towers.
    "coco": {
        "common": dict(data_root="data/coco", backbone="resnet50", width=1.0, norm="frozen_bn", freeze_at=2,
                       fpn_channels=256, head_convs=4, train_sizes=COCO_SIZES, max_size=1333, test_size=800,
                       backbone_weights="weights/resnet50.pth", warmup_iters=500, p6_from="c5",
                       low_res_mode="nearest", checkpoint_period=5000,
                       eval_batch_size=8, workers=4, cff_hidden=0, mask_head="none"),
        # Released MSAD teachers: batch 8, lr 0.01, 180k iterations, steps at 120k and 160k.
        "teacher": dict(batch_size=8, lr=0.01, iters=180000, steps=(120000, 160000)),
        # Students (and the 1x FCOS baselines): batch 16, lr 0.01, 90k iterations, steps at 60k and 80k.
        "student": dict(batch_size=16, lr=0.01, iters=90000, steps=(60000, 80000), kd_weight=KD_WEIGHT,
                        kd_warmup=KD_WARMUP, kd_outputs=0.0, kd_gamma=0.0),
    },
    # The built-in demo: a narrow ResNet-18 with GroupNorm trained from scratch on data/synthetic, on CPU.
    "demo": {
        "common": dict(data_root="data/synthetic", backbone="resnet18", width=0.25, norm="gn", freeze_at=0,
                       fpn_channels=32, head_convs=2, train_sizes=(224, 240, 256), max_size=400, test_size=256,
                       backbone_weights=None, warmup_iters=100, p6_from="c5", low_res_mode="nearest",
                       checkpoint_period=100, eval_batch_size=16, workers=1, cff_hidden=16, mask_head="none"),
        # 800 iterations: the teacher must be the better model, or distilling from it costs AP (docs/results.md),
        # and the two quick-start commands must stay within 8 minutes on 2 CPU cores
        "teacher": dict(batch_size=8, lr=0.02, iters=800, steps=(600, 740)),
        # Distillation weight 2 and warm-up 100: chosen on a tuning split (see README, Deviations).
        "student": dict(batch_size=8, lr=0.02, iters=400, steps=(300, 370), kd_weight=2.0, kd_warmup=100,
                        kd_outputs=0.0, kd_gamma=0.0),
    },
}
_PRESET_STAGE = {"teacher": "teacher", "student": "student", "fcos": "student"}


def ints(text: str):
    return tuple(int(v) for v in text.replace(",", " ").split())


def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data (COCO layout: annotations/instances_{train,val}2017.json, train2017/, val2017/)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="recipe the unset flags come from")
    g.add_argument("--data-root", help="dataset root; the demo preset generates data/synthetic on first use")
    g.add_argument("--train-ann", help="override: training annotation json")
    g.add_argument("--train-images", help="override: training image folder")
    g.add_argument("--val-ann", help="override: validation annotation json")
    g.add_argument("--val-images", help="override: validation image folder")
    g.add_argument("--test-size", type=int, help="HR short side at test time (LR branch / student get half)")
    g.add_argument("--max-size", type=int, help="longest side after resizing (HR)")
    g.add_argument("--workers", type=int, help="data loader worker processes per process")
    g.add_argument("--eval-batch-size", type=int, help="images per process at evaluation")
    g.add_argument("--max-images", type=int, help="evaluate only the first N validation images (quick checks)")


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="resnet18 | resnet34 | resnet50 | resnet101")
    g.add_argument("--width", type=float, help="channel width multiplier of the ResNet (slimmable widths)")
    g.add_argument("--norm", choices=("frozen_bn", "bn", "syncbn", "gn"), help="backbone normalisation")
    g.add_argument("--freeze-at", type=int, choices=(0, 1, 2), help="0: train all; 1: freeze stem; 2: stem + res2")
    g.add_argument("--backbone-weights", help="local torchvision ResNet state_dict (ImageNet); 'none' to skip")
    g.add_argument("--fpn-channels", type=int, help="FPN and head width (256 on COCO; a student may be thinner "
                   "than its teacher: it then distils through 1x1 adapters)")
    g.add_argument("--head-convs", type=int, help="convs per head tower (4 on COCO; 0: the predictions read the FPN)")
    g.add_argument("--p6-from", choices=("c5", "p5"), help="P6 source: c5 (released MSAD, default) or p5 (FCOS)")
    g.add_argument("--low-res-mode", choices=LR_MODES,
                   help="how the half-size image is made from the padded HR batch (default nearest, as released)")
    g.add_argument("--mask-head", choices=MASK_HEADS,
                   help="meinst: instance masks, MEInst's mask code as one more head output (a student takes its teacher's)")
    g.add_argument("--mask-codes", metavar="FILE", help="the mask code's PCA basis (python -m msad.masks fit); default: "
                   "the teacher's, or fitted on the training json at start")


def add_train_args(p: argparse.ArgumentParser, default_output: str):
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, help="training iterations")
    g.add_argument("--batch-size", type=int, help="global batch over all processes")
    g.add_argument("--lr", type=float, help="base learning rate (SGD, momentum 0.9)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (none on norm layers)")
    g.add_argument("--steps", type=ints, help="iterations at which the lr is multiplied by 0.1, e.g. '60000,80000'")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up from 0.001 x lr")
    g.add_argument("--clip-grad", type=float, help="clip the global gradient norm (off by default)")
    g.add_argument("--train-sizes", type=ints, help="HR short sides drawn per image, e.g. '640,672,704,736,768,800'")
    g = p.add_argument_group("runtime")
    g.add_argument("--output-dir", default=default_output, help="checkpoints, log.jsonl, metrics.json")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="mixed precision on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone (the FPN and head stay eager)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    g.add_argument("--overwrite", action="store_true",
                   help="train from scratch into an OUTPUT_DIR that holds a run, replacing its model and log")
    g.add_argument("--checkpoint-period", type=int, help="save a checkpoint every N iterations")
    g.add_argument("--log-period", type=int, default=20, help="write log.jsonl every N iterations")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and augmentation")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end of training")


def training_parser(doc: str, default_output: str) -> argparse.ArgumentParser:
    """The flags both training scripts share: data, model, optimisation and runtime groups."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_model_args(p)
    add_train_args(p, default_output)
    return p


def show_preset_values(p: argparse.ArgumentParser, stage: str | None) -> argparse.ArgumentParser:
    """Append its default to the --help of every flag (call after adding all flags): each preset's value where
    a preset fills the flag, else the flag's own default (switches and flags without a default show none)."""
    def shown(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    values = {name: {**preset["common"], **(preset[_PRESET_STAGE[stage]] if stage else {})}
              for name, preset in sorted(PRESETS.items())}
    for action in p._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or "%(default)" in (action.help or ""):
            continue
        if any(action.dest in v for v in values.values()):
            action.help = (f"{action.help or ''} [" + "; ".join(f"{name}: {shown(v[action.dest])}"
                                                               for name, v in values.items() if action.dest in v) + "]")
        elif not (action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            action.help = f"{action.help or ''} [default: {shown(action.default)}]"
    return p


def preset_value(args: argparse.Namespace, key: str, stage: str):
    """The flag's value, or the preset's where it is unset (for the few flags needed before `resolve`)."""
    value = getattr(args, key, None)
    return PRESETS[args.preset][_PRESET_STAGE[stage]][key] if value is None else value


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The flags as given, checked once, before anything is read or created: sizes, ranges (`check_ranges`) and the
    device (`check_device`). Values from presets and checkpoints are not checked again: they were, when written."""
    args = p.parse_args(argv)
    for name in ("train_sizes", "test_size", "max_size"):
        sizes = getattr(args, name, None)
        sizes = sizes if isinstance(sizes, tuple) else (sizes,) if sizes is not None else ()
        if any(s < 32 for s in sizes):
            raise SystemExit(f"error: --{name.replace('_', '-')} {sizes}: sizes must be at least 32 pixels")
    check_ranges(args)
    check_device(args)
    return args


# The architecture a model started from a checkpoint takes from it, unless given on the command line ...
ARCH_KEYS = ("backbone", "width", "norm", "freeze_at", "fpn_channels", "head_convs", "p6_from", "low_res_mode",
             "mask_head", "mask_dim")
# ... and the options of converted public weights (msad/convert.py), which have no flags: always taken.
CONVERTED_KEYS = ("stride_in_1x1", "center_offset")


def resolve(args: argparse.Namespace, stage: str | None, source: dict | None = None,
            inherit=ARCH_KEYS) -> argparse.Namespace:
    """The run's whole configuration, built here once; `args` (the parsed flags) is left as it is.

    Each setting is the flag where given, else the `source` checkpoint's args for the keys `inherit` (a student's
    architecture from its teacher, a teacher's from its --init-from detector, evaluate.py's data from the model),
    else the preset's (its common part plus the training `stage`'s: teacher, student or fcos; None for
    evaluation). Converted weights' conventions (CONVERTED_KEYS) always come from the source. Derived: `fusion`
    (not --no-fusion) and, for training, `batch_per_process` (--batch-size over WORLD_SIZE processes).
    """
    config, source = argparse.Namespace(**vars(args)), source or {}
    for key in (*inherit, *CONVERTED_KEYS):
        if (getattr(config, key, None) is None or key in CONVERTED_KEYS) and source.get(key) is not None:
            setattr(config, key, source[key])
    config.preset = config.preset or "demo"
    preset = PRESETS[config.preset]
    for key, value in {**preset["common"], **(preset[_PRESET_STAGE[stage]] if stage else {})}.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    if getattr(config, "backbone_weights", None) in ("none", ""):
        config.backbone_weights = None
    if hasattr(config, "no_fusion"):
        config.fusion = not config.no_fusion
    if stage is not None:
        config.batch_per_process = check_batch_size(config.batch_size, int(os.environ.get("WORLD_SIZE", 1)))
    return config


def with_categories(config: argparse.Namespace, dataset) -> argparse.Namespace:
    """The configuration with the training set's category ids, names and count (saved in every checkpoint)."""
    return argparse.Namespace(**vars(config), cat_ids=dataset.cat_ids, class_names=dataset.class_names,
                              num_classes=dataset.num_classes)


# flag -> (smallest allowed value, what it is); a flag a script does not have, or left unset, is skipped.
_MINIMUM = {"iters": (1, "training iterations"), "batch_size": (1, "images"), "eval_batch_size": (1, "images"),
            "workers": (0, "worker processes"), "max_images": (1, "images"), "fpn_channels": (1, "channels"),
            "head_convs": (0, "convolutions per tower"), "checkpoint_period": (1, "iterations"), "log_period": (1, "iterations"),
            "warmup_iters": (0, "iterations"), "kd_warmup": (0, "iterations"), "kd_weight": (0, "0 trains without KD"),
            "kd_outputs": (0, "0 turns output distillation off"), "kd_gamma": (0, "0: plain KL"),
            "fused_weight": (0, "0 drops the fused branch's loss"), "cff_hidden": (0, "0 means FPN width / 8"),
            "weight_decay": (0, "0 for none"), "vis_count": (0, "images")}
_POSITIVE = ("lr", "width", "clip_grad")  # finite and > 0
_UNIT = ("score_thresh", "vis_thresh")  # scores: finite, in [0, 1]


def check_ranges(args) -> None:
    """One line for the first flag outside its range (e.g. --iters 0, --lr nan, --kd-weight inf, --max-images 0).
    Every comparison is written so that NaN fails it, and floats must be finite."""
    flag = lambda name: f"--{name.replace('_', '-')}"
    for name, (low, unit) in _MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and not (value >= low and math.isfinite(value)):
            raise SystemExit(f"error: {flag(name)} {value}: must be a finite number of at least {low} ({unit})")
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SystemExit(f"error: {flag(name)} {value}: must be a finite number above 0")
    for name in _UNIT:
        value = getattr(args, name, None)
        if value is not None and not (0 <= value <= 1):
            raise SystemExit(f"error: {flag(name)} {value}: must be a score from 0 to 1")


def check_device(args) -> None:
    """--device auto | cpu | cuda | cuda:N, and --amp only where it does what it says (on CUDA)."""
    device = args.device
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise SystemExit(f"error: --device {device}: expected auto, cpu, cuda or cuda:N")
    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise SystemExit(f"error: --device {device}: CUDA is not available on this machine (use --device cpu)")
    if getattr(args, "amp", "none") != "none" and (device == "cpu" or not cuda):
        raise SystemExit(f"error: --amp {args.amp} is mixed precision on CUDA; on CPU use --amp none")


def make_output_dir(path, flag: str) -> None:
    """Create an output folder now and test-write it (None: not asked for), or stop with one line naming the flag:
    a folder that cannot take a file (/proc, read-only, full) fails before any work, not after the inference."""
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
        test_write(path)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write into this folder ({e.strerror or e})") from None


def model_config(args) -> ModelConfig:
    """The architecture from the resolved flags (and the training set's num_classes, see runner.train_dataset)."""
    return ModelConfig.from_dict(vars(args))


def data_paths(args, split: str):
    """Annotation json and image folder of a split, from --data-root unless overridden."""
    ann = getattr(args, f"{split}_ann") or os.path.join(args.data_root, "annotations", f"instances_{split}2017.json")
    images = getattr(args, f"{split}_images") or os.path.join(args.data_root, f"{split}2017")
    return ann, images


def seed_everything(seed: int, rank: int = 0):
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts them)


def print_metrics_line(metrics: dict):
    """The final machine-readable line of every script."""
    print(json.dumps(metrics, sort_keys=True), flush=True)


# Errors a user can cause (bad data, flags, files, a diverging run): reported in one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, WriteError)


def run_script(main, argv=None):
    """Run a script's main(); a user error becomes `error: ...` on stderr and exit status 1, Ctrl-C one line and
    exit status 130 (the shell's 128 + SIGINT). Set MSAD_DEBUG=1 to see the full traceback instead."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        if os.environ.get("MSAD_DEBUG"):
            raise
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits 130 itself)
        if os.environ.get("MSAD_DEBUG"):
            raise
        print("interrupted by SIGINT (Ctrl-C); no file was left half-written", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
