"""Assembly only: the FCOS detector, the MSAD multi-scale teacher and the low-resolution student.

Every model is backbone + FPN + one shared FCOS head; what differs is which pyramid levels a branch
reads (align.branch_levels) and whether the input is halved first (align.make_low_res). All targets and
decoded boxes live in the HR frame, so one assignment serves every branch (MSAD Sec. 3.1-3.2).
"""
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from torch import nn

from . import align
from .backbone import ResNetTrunk, load_imagenet_weights
from .imagenet import normalize
from .decode import RULES
from .fcos_head import FCOSHead, HeadOutputs
from .fpn import FPN
from .fusion import CrossFeatureFusion
from .masks import DIM_MASK, MaskCode
from .meinst import MASK_HEADS

KINDS = ("fcos", "student", "teacher")
MASK_KEYS = ("head.mask_pred.", "mask_code.")  # a mask branch's tensors (msad/meinst.py)


@dataclass
class ModelConfig:
    """Architecture and inference settings; saved in every checkpoint so evaluation rebuilds the same model."""
    backbone: str = "resnet50"
    width: float = 1.0
    norm: str = "frozen_bn"
    freeze_at: int = 2
    fpn_channels: int = 256
    head_convs: int = 4
    num_classes: int = 80
    p6_from: str = "c5"
    low_res_mode: str = "nearest"
    fusion: bool = True
    cff_hidden: int = 0  # C-FF gate hidden width; 0 = fpn_channels / 8 (released)
    mask_head: str = "none"  # "meinst": MEInst's mask code as one more head output (msad/meinst.py)
    mask_dim: int = DIM_MASK  # D, the length of that code (the fitted basis' components)
    score_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    max_dets: int = 100
    # Options for converted public weights (msad/convert.py); the defaults are ours and the released code's.
    stride_in_1x1: bool = False  # MSRA ResNets (detectron2, AdelaiDet): the stride in the first 1x1 conv
    center_offset: bool = True  # locations at (j*s + s//2, i*s + s//2); torchvision's FCOS uses (j*s, i*s)
    decode_rule: str = "released"  # or "torchvision": threshold sqrt(cls * ctr), keep empty boxes (decode.py)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def depth(self) -> int:
        if not self.backbone.startswith("resnet") or not self.backbone[6:].isdigit():
            raise ValueError(f"--backbone must look like resnet50, got {self.backbone!r}")
        return int(self.backbone[6:])


class BranchOutputs(NamedTuple):
    """What a model gives for one branch: the pyramid, the head's predictions on it and its location grid.

    features: list over the five level positions of B x C x h_i x w_i (HR P3..P7, LR P2..P6 or fused);
    head: fcos_head.HeadOutputs, B x L x K / B x L x 4 / B x L; geometry: align.Geometry of the L locations,
    in the HR frame (the same for every branch of one batch, MSAD Sec. 3.1).
    """
    features: list
    head: HeadOutputs
    geometry: align.Geometry


class FCOS(nn.Module):
    """FCOS on one pyramid: the HR detector on P3..P7 (`input_scale=1`, branch "hr") or the aligned LR detector
    on P2..P6 of the half-size image (`input_scale=0.5`, branch "lr": the MSAD student, Sec. 3.1 and 3.4).

    forward(images, branches=None): images, the padded uint8 RGB batch B x 3 x H x W (H, W multiples of 128),
    -> {branch: BranchOutputs}; `pyramids` is the same without the head. No losses (fcos_loss.FCOSLoss,
    teacher_loss.TeacherLoss, distill.DistillationLoss) and no decoding (decode.Detector) here.
    """

    def __init__(self, cfg: ModelConfig, input_scale: float = 1.0, fpn_levels=None):
        super().__init__()
        self.cfg, self.input_scale = cfg, input_scale
        self.levels = align.branch_levels(input_scale)
        self.branches = ("hr",) if input_scale == 1.0 else ("lr",)
        if cfg.decode_rule not in RULES:
            raise ValueError(f"decode_rule must be one of {RULES}, got {cfg.decode_rule!r}")
        self.backbone = ResNetTrunk(cfg.depth, cfg.norm, cfg.width, cfg.freeze_at, cfg.stride_in_1x1)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_channels, fpn_levels or self.levels, cfg.p6_from)
        if cfg.mask_head not in MASK_HEADS:
            raise ValueError(f"--mask-head must be one of {', '.join(MASK_HEADS)}, got {cfg.mask_head!r}")
        masks = cfg.mask_head == "meinst"
        self.head = FCOSHead(cfg.fpn_channels, cfg.num_classes, cfg.head_convs, len(align.HR_LEVELS),
                             mask_dim=cfg.mask_dim if masks else 0)
        if masks:  # the PCA basis of the code, as buffers: fitted or loaded before training, saved with the weights
            self.mask_code = MaskCode.empty(cfg.mask_dim)

    def pyramid(self, x: torch.Tensor, levels) -> list:
        """FPN levels `levels` of a normalised batch."""
        return self.fpn(self.backbone(x), levels)

    def branch_pyramid(self, x: torch.Tensor, branch: str) -> list:
        """HR P3..P7 of the normalised HR batch x, or LR P2..P6 of its half (align.make_low_res)."""
        if branch == "lr":
            return self.pyramid(align.make_low_res(x, self.cfg.low_res_mode), align.branch_levels(0.5))
        return self.pyramid(x, align.branch_levels(1.0))

    def outputs(self, pyramids: dict, canvas=None) -> dict:
        """{branch: pyramid} -> {branch: BranchOutputs}. Branches of one batch have the same shapes (Sec. 3.1),
        so the shared head runs once on their concatenation along the batch: GroupNorm is per sample, so this
        equals one call per branch, with fewer kernel launches. canvas: see `forward`."""
        feats = list(pyramids.values())
        head = self.head([torch.cat(level) for level in zip(*feats)] if len(feats) > 1 else feats[0])
        geometry = align.locations(feats[0], self.cfg.center_offset, canvas)
        return {name: BranchOutputs(f, h, geometry)
                for (name, f), h in zip(pyramids.items(), head.chunk(len(feats)))}

    def pyramids(self, images: torch.Tensor, branches=None) -> dict:
        """{branch: pyramid} of the uint8 batch, without the head (what feature distillation reads)."""
        (branch,) = check_branches(self, branches)
        return {branch: self.branch_pyramid(normalize(images), branch)}

    def forward(self, images: torch.Tensor, branches=None) -> dict:
        """A converted torchvision FCOS (decode_rule "torchvision") places its locations on the canvas as
        torchvision does (align.make_points); every other model on the strides alone."""
        canvas = tuple(images.shape[-2:]) if self.cfg.decode_rule == "torchvision" else None
        return self.outputs(self.pyramids(images, branches), canvas)


class MultiScaleTeacher(FCOS):
    """The MSAD teacher (Sec. 3.2-3.3): one backbone, FPN (P2..P7) and head shared by an HR branch on P3..P7, an
    LR branch on P2..P6 of the half-size image, and their C-FF fusion (no "fused" branch with fusion off).

    forward(images, branches=None) -> {branch: BranchOutputs} for `branches` (default: all, in the order hr,
    lr, fused), each B x ... as in FCOS; only the pyramids they need are computed. Its loss is
    teacher_loss.TeacherLoss (L_HR + L_LR + 0.4 L_fused).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, 1.0, fpn_levels=range(2, 8))
        self.fusion = CrossFeatureFusion(cfg.fpn_channels, cfg.cff_hidden) if cfg.fusion else None
        self.branches = ("hr", "lr", "fused") if cfg.fusion else ("hr", "lr")

    def pyramids(self, images: torch.Tensor, branches=None) -> dict:
        """{branch: pyramid} for `branches`: HR P3..P7, LR P2..P6 and their C-FF fusion, all of the HR shapes."""
        branches = check_branches(self, branches)
        x = normalize(images)
        pyramids = {b: self.branch_pyramid(x, b) for b in ("hr", "lr") if b in branches or "fused" in branches}
        if "fused" in branches:
            align.check_aligned(pyramids["hr"], pyramids["lr"])
            pyramids["fused"] = self.fusion(pyramids["hr"], pyramids["lr"])
        return {b: pyramids[b] for b in branches}


def check_branches(model: FCOS, branches) -> tuple:
    """The requested branches (default: all of the model's), refused in one line if the model has not one."""
    branches = model.branches if branches is None else tuple(branches)
    unknown = [b for b in branches if b not in model.branches]
    if unknown or not branches:
        raise ValueError(f"branch {', '.join(unknown) or '(none)'}: this model has {', '.join(model.branches)}")
    return branches


def build_model(kind: str, cfg: ModelConfig) -> nn.Module:
    """fcos: FCOS on P3..P7; teacher: MultiScaleTeacher; student: FCOS on P2..P6 of the half-size image."""
    if kind == "fcos":
        return FCOS(cfg, 1.0)
    if kind == "teacher":
        return MultiScaleTeacher(cfg)
    if kind == "student":
        return FCOS(cfg, 0.5)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def default_branch(kind: str, cfg: ModelConfig) -> str:
    """The branch a checkpoint is evaluated and exported with unless told: a teacher's fused branch (its HR branch
    without C-FF), a student's LR, a detector's HR."""
    return {"fcos": "hr", "student": "lr"}.get(kind, "fused" if cfg.fusion else "hr")


def frozen_teacher(ckpt: dict, device) -> nn.Module:
    """The teacher of a train_teacher.py checkpoint dict, frozen: eval mode, no gradients, on `device`. The student's
    distillation loss holds it (distill.DistillationLoss), outside DDP and outside the student's checkpoint."""
    teacher = build_model("teacher", ModelConfig.from_dict(ckpt["args"]))
    teacher.load_state_dict(ckpt["model"])
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def init_backbone(model: nn.Module, weights_path: str | None) -> None:
    if weights_path:
        load_imagenet_weights(model.backbone, weights_path)


def load_partial(model: nn.Module, state: dict, source: str, prefixes=("backbone.", "fpn.", "head.", "mask_code."),
                 new=(), remedy="use --init imagenet or --init scratch for a different backbone") -> dict:
    """Copy `state` into every parameter/buffer of `model` under `prefixes`: teacher -> student (Sec. 3.4), or
    a trained HR detector -> teacher (train_teacher.py --init-from, with new=the P2 lateral and output).

    Every such tensor of the model must exist in `state` with the same shape, except those starting with one
    of `new` (left at their initial values); the source backbone and head must have no tensors the model lacks
    (a deeper ResNet would otherwise load silently, truncated); extra FPN keys (the teacher's P7 conv), a mask
    branch the model lacks (MASK_KEYS: a box-only student of a mask teacher) and keys outside `prefixes` (its fusion
    module) are ignored. Mismatches are one clear error listing the keys.
    Returns {"loaded": [...], "new": [...]} (the model's keys).
    """
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    fresh = sorted(k for k in own if k not in state and any(k.startswith(n) for n in new))
    missing = sorted(k for k in own if k not in state and k not in fresh)
    unexpected = sorted(k for k in state if k.startswith(prefixes) and not k.startswith(("fpn.", *MASK_KEYS))
                        and k not in own)
    shape = sorted(f"{k} {tuple(own[k].shape)} vs {tuple(state[k].shape)}" for k in own
                   if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)) if keys]
        raise ValueError(f"{source} does not match the model's architecture ({'; '.join(parts)}); {remedy}")
    loaded = [k for k in own if k in state]
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "new": fresh}


def model_from_checkpoint(ckpt: dict, path: str, branch: str | None = None) -> tuple[nn.Module, str]:
    """Rebuild a model from a checkpoint dict: (model, the branch to run: `branch`, checked, or the default)."""
    kind = ckpt.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown checkpoint kind {kind!r}")
    cfg = ModelConfig.from_dict(ckpt["args"])
    if cfg.norm == "syncbn":
        cfg.norm = "bn"  # inference needs no cross-process statistics
    model = build_model(kind, cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit a {kind} model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if branch is not None and branch not in model.branches:
        raise ValueError(f"--branch {branch}: a {kind} checkpoint{'' if cfg.fusion else ' without C-FF'} "
                         f"has branches {', '.join(model.branches)}")
    return model, branch or default_branch(kind, cfg)


def checkpoint_categories(ckpt: dict) -> tuple[list, list]:
    """(category ids, class names) of the model's contiguous labels 0..C-1, stored at training time (and by
    msad/convert.py)."""
    args = ckpt["args"]
    if args.get("cat_ids") is None or args.get("class_names") is None:
        raise ValueError("the checkpoint's args hold no category ids and names (cat_ids, class_names)")
    return list(args["cat_ids"]), [str(n) for n in args["class_names"]]
