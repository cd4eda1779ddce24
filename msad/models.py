"""Assembly only: the FCOS detector, the MSAD multi-scale teacher and the low-resolution student.

Every model is backbone + FPN + one shared FCOS head; what differs is which pyramid levels a branch
reads (align.branch_levels) and whether the input is halved first (align.make_low_res). All targets and
decoded boxes live in the HR frame, so one assignment serves every branch (MSAD Sec. 3.1-3.2).
"""
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from . import align
from .backbone import ResNetTrunk, load_imagenet_weights
from .checkpoint import load_checkpoint
from .imagenet import normalize
from .decode import RULES, decode, make_points
from .fcos_head import FCOSHead
from .fcos_loss import assign_targets, fcos_losses, level_ranges
from .fpn import FPN
from .fusion import CrossFeatureFusion

FUSED_WEIGHT = 0.4  # weight of the fused branch in L_T = L_HR + L_LR + 0.4 L_fused (released code)
BRANCHES = {"fcos": ("hr",), "student": ("lr",), "teacher": ("fused", "hr", "lr")}


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
    fused_weight: float = FUSED_WEIGHT
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


class FCOS(nn.Module):
    """FCOS on one pyramid. `input_scale=1` is the usual detector on P3..P7; `input_scale=0.5` halves the
    padded HR batch and reads P2..P6 (the aligned LR branch / MSAD student, Sec. 3.1 and 3.4)."""

    def __init__(self, cfg: ModelConfig, input_scale: float = 1.0, fpn_levels=None):
        super().__init__()
        self.cfg, self.input_scale = cfg, input_scale
        self.levels = align.branch_levels(input_scale)
        if cfg.decode_rule not in RULES:
            raise ValueError(f"decode_rule must be one of {RULES}, got {cfg.decode_rule!r}")
        self.backbone = ResNetTrunk(cfg.depth, cfg.norm, cfg.width, cfg.freeze_at, cfg.stride_in_1x1)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_channels, fpn_levels or self.levels, cfg.p6_from)
        self.head = FCOSHead(cfg.fpn_channels, cfg.num_classes, cfg.head_convs, len(align.HR_LEVELS))

    # -- pieces shared by every branch -------------------------------------------------------------
    def pyramid(self, x: torch.Tensor, levels) -> list:
        return self.fpn(self.backbone(x), levels)

    def low_res(self, x: torch.Tensor) -> torch.Tensor:
        return align.make_low_res(x, self.cfg.low_res_mode)

    def branch_features(self, x: torch.Tensor) -> list:
        """This detector's pyramid on a normalised HR batch (halved first when input_scale is 0.5)."""
        return self.pyramid(self.low_res(x) if self.input_scale != 1.0 else x, self.levels)

    def features(self, x: torch.Tensor) -> list:
        """The pyramid that inference decodes, on a normalised HR batch (msad/export.py runs this too)."""
        return self.branch_features(x)

    def geometry(self, feats):
        """HR-frame location grid of a pyramid: points [L, 2], strides [L], ranges [L, 2], shapes."""
        shapes = [tuple(f.shape[-2:]) for f in feats]
        points, strides = make_points(shapes, align.hr_strides(), feats[0].device, self.cfg.center_offset)
        return points, strides, level_ranges(shapes, device=feats[0].device), shapes

    def targets(self, batch, geometry):
        points, strides, ranges, shapes = geometry
        return assign_targets(points, strides, ranges, [t["boxes"] for t in batch.targets],
                              [t["labels"] for t in batch.targets], shapes=shapes)

    def decode_options(self) -> dict:
        c = self.cfg
        return dict(score_thresh=c.score_thresh, pre_nms_top_n=c.pre_nms_top_n, nms_thresh=c.nms_thresh,
                    max_dets=c.max_dets, rule=c.decode_rule)

    def detect(self, head_out, geometry, batch):
        points, strides, _, shapes = geometry
        return decode(*head_out, points, strides, shapes, batch.image_sizes, batch.orig_sizes,
                      **self.decode_options())

    # -- the single-pyramid detector ---------------------------------------------------------------
    def forward(self, batch, iteration: int = 0, return_features: bool = False):
        """Training: dict of losses (and the pyramid if asked, for distillation). Eval: detections per image.
        Every training model is called as model(batch, iteration); only the student's distillation uses it."""
        if not self.training:
            feats = self.features(normalize(batch.images))
            return self.detect(self.head(feats), self.geometry(feats), batch)
        feats = self.branch_features(normalize(batch.images))
        head_out = self.head(feats)
        geometry = self.geometry(feats)
        losses = fcos_losses(*head_out, self.targets(batch, geometry))
        return (losses, feats) if return_features else losses


class MultiScaleTeacher(FCOS):
    """The MSAD teacher (Sec. 3.2-3.3): one backbone+FPN+head shared by an HR branch on P3..P7, an LR branch
    on P2..P6 of the half-size image, and their C-FF fusion. L_T = L_HR + L_LR + 0.4 L_fused."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, 1.0, fpn_levels=range(2, 8))
        self.fusion = CrossFeatureFusion(cfg.fpn_channels, cfg.cff_hidden) if cfg.fusion else None
        self.branch = "fused" if cfg.fusion else "hr"  # which branch inference returns

    def pyramids(self, x: torch.Tensor):
        """HR P3..P7, LR P2..P6 and (with C-FF) the fused pyramid, all of the HR P3..P7 shapes."""
        hr = self.pyramid(x, align.branch_levels(1.0))
        lr = self.pyramid(self.low_res(x), align.branch_levels(0.5))
        align.check_aligned(hr, lr)
        fused = self.fusion(hr, lr) if self.fusion is not None else None
        return hr, lr, fused

    @torch.no_grad()
    def distillation_targets(self, batch) -> list:
        """The features a student imitates: the fused pyramid (the HR pyramid for a teacher without C-FF)."""
        hr, _, fused = self.pyramids(normalize(batch.images))
        return fused if fused is not None else hr

    def features(self, x: torch.Tensor) -> list:
        """The inference pyramid of `self.branch`: one branch alone runs only its own pyramid."""
        if self.branch == "lr":
            return self.pyramid(self.low_res(x), align.branch_levels(0.5))
        if self.branch == "hr":
            return self.pyramid(x, align.branch_levels(1.0))
        return self.pyramids(x)[2]

    def forward(self, batch, iteration: int = 0):
        if not self.training:  # detections of self.branch (FCOS.forward, through self.features)
            return super().forward(batch, iteration)
        x = normalize(batch.images)
        hr, lr, fused = self.pyramids(x)
        geometry = self.geometry(hr)
        branches = {"hr_": hr, "lr_": lr} | ({"fused_": fused} if fused is not None else {})
        # All branches have the same shapes, so the shared head runs once on their concatenation along the
        # batch (GroupNorm is per sample, so this equals three separate calls, with fewer kernel launches).
        B = x.shape[0]
        outs = self.head([torch.cat(level) for level in zip(*branches.values())])  # each: (nB) x L x ...
        targets = self.targets(batch, geometry)  # computed once, reused by every branch
        losses = {}
        for k, prefix in enumerate(branches):
            part = [o[k * B:(k + 1) * B] for o in outs]
            weight = self.cfg.fused_weight if prefix == "fused_" else 1.0
            losses |= {n: weight * v for n, v in fcos_losses(*part, targets, prefix).items()}
        return losses


class DistilledStudent(nn.Module):
    """Training wrapper of the student (Sec. 3.4): FCOS losses on the LR image + feature distillation
    towards the frozen teacher's fused pyramid (no distillation when `teacher` is None).

    The teacher is held in a plain attribute, not registered as a submodule: DDP around this wrapper sees
    only the student's and the adapters' parameters, `.train()` and `.to()` leave the teacher alone (eval
    mode, on its device) and state_dict() never holds it. Its features are computed under no_grad.
    `adapters` (distill.Adapters, a student thinner than its teacher) map the student's pyramid to the
    teacher's width first; they live here, beside the student, so they train with it but stay out of it."""

    def __init__(self, student: FCOS, distill, teacher: nn.Module | None = None, adapters: nn.Module | None = None,
                 probe=None):
        super().__init__()
        self.student, self.distill, self.adapters = student, distill, adapters
        object.__setattr__(self, "teacher", teacher)  # not a child module: outside DDP and the checkpoint
        self.probe = probe  # diagnostics.StudentProbe

    def forward(self, batch, iteration: int = 0):
        teacher_feats = self.teacher.distillation_targets(batch) if self.teacher is not None else None
        losses, feats = self.student(batch, return_features=True)
        if teacher_feats is not None:
            mapped = self.adapters(feats) if self.adapters is not None else feats  # teacher's width
            losses |= self.distill(mapped, teacher_feats, iteration)
            if self.probe is not None:
                self.probe(iteration, losses, feats, mapped, teacher_feats)
        return losses


def build_model(kind: str, cfg: ModelConfig) -> nn.Module:
    """fcos: FCOS on P3..P7; teacher: MultiScaleTeacher; student: FCOS on P2..P6 of the half-size image."""
    if kind == "fcos":
        return FCOS(cfg, 1.0)
    if kind == "teacher":
        return MultiScaleTeacher(cfg)
    if kind == "student":
        return FCOS(cfg, 0.5)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(BRANCHES)}")


def load_teacher(path, device) -> tuple[nn.Module, dict]:
    """The frozen teacher of a train_teacher.py checkpoint (eval mode, no gradients, on `device`) and its
    arguments. It stays outside DDP and outside the student's checkpoint."""
    ckpt = load_checkpoint(path, expected_kind="teacher", made_by="python train_teacher.py")
    teacher = build_model("teacher", ModelConfig.from_dict(ckpt["args"]))
    teacher.load_state_dict(ckpt["model"])
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), ckpt["args"]


def init_backbone(model: nn.Module, weights_path: str | None) -> None:
    if weights_path:
        load_imagenet_weights(model.backbone, weights_path)


def load_partial(model: nn.Module, state: dict, source: str, prefixes=("backbone.", "fpn.", "head."),
                 new=(), remedy="use --init imagenet or --init scratch for a different backbone") -> dict:
    """Copy `state` into every parameter/buffer of `model` under `prefixes`: teacher -> student (Sec. 3.4), or
    a trained HR detector -> teacher (train_teacher.py --init-from, with new=the P2 lateral and output).

    Every such tensor of the model must exist in `state` with the same shape, except those starting with one
    of `new` (left at their initial values); the source backbone and head must have no tensors the model lacks
    (a deeper ResNet would otherwise load silently, truncated); extra FPN keys (the teacher's P7 conv) and keys
    outside `prefixes` (its fusion module) are ignored. Mismatches are one clear error listing the keys.
    Returns {"loaded": [...], "new": [...]} (the model's keys).
    """
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    fresh = sorted(k for k in own if k not in state and k.startswith(tuple(new) or ("\0",)))
    missing = sorted(k for k in own if k not in state and k not in fresh)
    unexpected = sorted(k for k in state if k.startswith(prefixes) and not k.startswith("fpn.") and k not in own)
    shape = sorted(f"{k} {tuple(own[k].shape)} vs {tuple(state[k].shape)}" for k in own
                   if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)) if keys]
        raise ValueError(f"{source} does not match the model's architecture ({'; '.join(parts)}); {remedy}")
    loaded = [k for k in own if k in state]
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "new": fresh}


def model_from_checkpoint(ckpt: dict, path: str, branch: str | None = None) -> nn.Module:
    """Rebuild a model from a checkpoint dict and select its inference branch."""
    kind = ckpt.get("kind")
    if kind not in BRANCHES:
        raise ValueError(f"{path}: unknown checkpoint kind {kind!r}")
    cfg = ModelConfig.from_dict(ckpt["args"])
    if cfg.norm == "syncbn":
        cfg.norm = "bn"  # inference needs no cross-process statistics
    model = build_model(kind, cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit a {kind} model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    allowed = BRANCHES[kind] if kind != "teacher" or cfg.fusion else ("hr", "lr")
    if branch is not None and branch not in allowed:
        raise ValueError(f"--branch {branch}: a {kind} checkpoint{'' if cfg.fusion else ' without C-FF'} "
                         f"has branches {', '.join(allowed)}")
    if kind == "teacher":
        model.branch = branch or allowed[0]
    return model


def checkpoint_categories(ckpt: dict) -> tuple[list, list]:
    """(category ids, class names) of the model's contiguous labels 0..C-1, stored at training time (and by
    msad/convert.py)."""
    args = ckpt["args"]
    if args.get("cat_ids") is None or args.get("class_names") is None:
        raise ValueError("the checkpoint's args hold no category ids and names (cat_ids, class_names)")
    return list(args["cat_ids"]), [str(n) for n in args["class_names"]]
