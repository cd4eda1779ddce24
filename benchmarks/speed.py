"""Speed benchmark: our FCOS vs torchvision's, the MSAD teacher vs plain FCOS, and HR / LR / student latency.

Everything is measured side by side in one run, interleaved (A B A B ...), warm-up then the median of
`--repeats`, so ratios are meaningful even on a noisy machine; single absolute timings are not.

    python benchmarks/speed.py --device cpu               # about 8 minutes on 2 CPU cores
    python benchmarks/speed.py --device cuda --amp bf16   # the numbers that matter for training
    python benchmarks/speed.py --quick                    # smoke run at 256x384

Sections (ratio > 1 always means "ours is faster" except for the teacher/FCOS cost ratio):
  1. train step (forward + backward + SGD) of our R50 FCOS vs torchvision's fcos_resnet50_fpn, same input;
  2. inference (forward + decoding + NMS), same pair; their weights are copied from ours, so both produce
     the same detections once torchvision's locations get our half-stride offset (checked: labels, scores
     and boxes; without it its boxes are shifted by s/2), and the heads are set "dense" (every location passes the score
     threshold, top 1000 per level reach NMS), the worst case for decoding;
  3. the loss/target part alone: our assign_targets + fcos_losses vs torchvision's FCOS.compute_loss;
  4. one MSAD teacher iteration (HR + LR + fused) vs one HR-only FCOS iteration, with the FLOP split;
  5. inference latency, params and FLOPs (backbone / FPN / head) of the HR model, the naive LR model, the
     MSAD student and the light students (thinner FPN / head, LIGHT_STUDENTS); images/s of teacher and
     student training.
`--cost-only` runs section 5's latency / params / FLOPs table alone (HR, naive LR and students in one run).
Results go to benchmarks/results/speed_<device>.json and .md.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msad import align  # noqa: E402
from msad.data import ImageBatch  # noqa: E402
from msad.imagenet import normalize  # noqa: E402
from msad.distill import FeatureDistillation  # noqa: E402
from msad.fcos_head import prior_bias  # noqa: E402
from msad.fcos_loss import assign_targets, fcos_losses  # noqa: E402
from msad.models import DistilledStudent, ModelConfig, build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Light students (train_student.py --fpn-channels F --head-convs N): name -> (FPN channels, convs per head tower).
LIGHT_STUDENTS = {"light_f256_h1": (256, 1), "light_f256_h0": (256, 0), "light_f128_h0": (128, 0)}


# ----------------------------------------------------------------------------------------------- inputs
def make_batch(batch: int, height: int, width: int, num_boxes: int, num_classes: int, seed: int = 0) -> ImageBatch:
    """Random uint8 images and `num_boxes` random boxes per image, sizes log-uniform over all FCOS levels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=g)
    targets = []
    for _ in range(batch):
        size = torch.exp(torch.empty(num_boxes, 2).uniform_(2.5, 6.5, generator=g))  # ~12 .. 665 px
        size = torch.minimum(size, torch.tensor([width - 2.0, height - 2.0]))
        x0y0 = torch.rand(num_boxes, 2, generator=g) * (torch.tensor([width, height]) - size)
        targets.append({"boxes": torch.cat([x0y0, x0y0 + size], 1),
                        "labels": torch.randint(0, num_classes, (num_boxes,), generator=g)})
    sizes = [(height, width)] * batch
    return ImageBatch(images, targets, sizes, sizes, list(range(batch)))


def pyramid_shapes(height: int, width: int, levels=align.HR_LEVELS):
    """Spatial size of P_l for an HxW input: every stride-2 conv/pool of ResNet+FPN rounds up."""
    return [(-(-height // 2 ** l), -(-width // 2 ** l)) for l in levels]


# -------------------------------------------------------------------------------------- torchvision
class _NoResizeNoNormalize(GeneralizedRCNNTransform):
    """torchvision's transform minus resize and normalisation: it only batches (800x1216 is a multiple of 32)."""

    def normalize(self, image):
        return image

    def resize(self, image, target=None):
        return image, target


def torchvision_fcos(num_classes: int) -> torchvision.models.detection.FCOS:
    """fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes) but with FrozenBN and the stem and
    res2 frozen, as torchvision builds it when backbone weights are given (and as our freeze_at=2 does)."""
    backbone = torchvision.models.resnet50(weights=None, norm_layer=torchvision.ops.FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    model = torchvision.models.detection.FCOS(backbone, num_classes, score_thresh=0.05)
    t = model.transform
    model.transform = _NoResizeNoNormalize(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible)
    return model


class HalfStrideAnchors(torch.nn.Module):
    """torchvision's FCOS locations (j*s, i*s) moved to ours and the released code's (j*s + s//2, i*s + s//2).

    Its anchors are s x s squares (sizes = strides), so half the anchor width is the missing offset. Without
    it every box of torchvision is shifted by half its level's stride, so only its scores match ours.
    """

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, images, features):
        return [a + (a[:, 2:3] - a[:, 0:1]) / 2 for a in self.generator(images, features)]


def same_detections(a: dict, b: dict, atol: float = 1e-3) -> bool:
    """Same number of detections, and each of `a` has one in `b` with the same label, score and box (to atol
    in score and atol x the image size in box coordinates); pairing by value, so ties in order do not matter."""
    if len(a["scores"]) != len(b["scores"]):
        return False
    scale = float(max(a["boxes"].abs().max(), 1.0))
    diff = torch.maximum((a["scores"].float()[:, None] - b["scores"].float()[None]).abs(),  # n x n
                         (a["boxes"].float()[:, None] - b["boxes"].float()[None]).abs().amax(-1) / scale)
    diff[a["labels"][:, None] != b["labels"][None]] = float("inf")
    return bool((diff.min(1).values <= atol).all() and (diff.min(0).values <= atol).all())


def copy_weights_to_torchvision(ours, theirs) -> None:
    """Load our FCOS weights into torchvision's FCOS (same architecture once our Scales are 1)."""
    if any(float(s.scale.detach()) != 1.0 for s in ours.head.scales):
        raise ValueError("torchvision's FCOS has no per-level Scale; ours must be at 1.0")
    fpn = {"lateral": "inner_blocks", "output": "layer_blocks"}
    head = {"cls_tower": "classification_head.conv", "cls_logits": "classification_head.cls_logits",
            "box_tower": "regression_head.conv", "box_pred": "regression_head.bbox_reg",
            "ctr_pred": "regression_head.bbox_ctrness"}
    state = {}
    for k, v in ours.state_dict().items():
        part, rest = k.split(".", 1)
        if part == "backbone":
            state[f"backbone.body.{rest}"] = v
        elif part == "fpn" and rest.startswith(("p6.", "p7.")):
            state[f"backbone.fpn.extra_blocks.{rest}"] = v
        elif part == "fpn":
            kind, name, p = rest.split(".", 2)  # lateral.p3.weight -> inner_blocks.0.0.weight
            state[f"backbone.fpn.{fpn[kind]}.{int(name[1]) - 3}.0.{p}"] = v
        elif part == "head" and not rest.startswith("scales"):
            mod, p = rest.split(".", 1)
            state[f"head.{head[mod]}.{p}"] = v
    theirs.load_state_dict(state, strict=True)


def set_dense_head(*heads_biases) -> None:
    """Inference stress setting: cls prob 0.5 everywhere (all locations pass 0.05) and boxes 4 strides wide."""
    for cls_bias, box_bias in heads_biases:
        with torch.no_grad():
            cls_bias.zero_()
            box_bias.fill_(2.0)


# ---------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fns: dict, warmup: int, repeats: int, device) -> dict:
    """Interleaved timing: each round runs every fn once; returns name -> median seconds over `repeats` rounds."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def count_syncs(fn, device):
    """Host-device synchronisations during one call of fn, from CUDA's sync debug mode (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def train_step(model, optimizer, forward, amp_dtype, device):
    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = forward()
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                           weight_decay=1e-4)


# ----------------------------------------------------------------------------------------------- FLOPs
def _count(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def _leaf(t, like):
    """A fresh graph input standing for `like` (so each part's backward is counted alone)."""
    return t.detach().requires_grad_(like.requires_grad)


def flops_split(model, kind: str, images: torch.Tensor, train: bool) -> dict:
    """FLOPs of backbone / FPN / (fusion) / head for one forward (train=False) or forward+backward (train=True),
    counted part by part on the meta device (no compute). Backward of a part = grads of its trainable weights
    and of its inputs where the real graph needs them; losses are elementwise and not counted."""
    x = images.to("meta", torch.float32)
    flops = {"backbone": 0, "fpn": 0, "fusion": 0, "head": 0}

    def run(part, fn, *inputs):
        out, f = _count(fn)
        outs = out if isinstance(out, (list, tuple)) else [out]
        if train and any(o.requires_grad for o in outs):
            _, b = _count(lambda: torch.autograd.backward([o for o in outs if o.requires_grad],
                                                          [torch.ones_like(o) for o in outs if o.requires_grad]))
            f += b
        flops[part] += f
        return [_leaf(o, o) for o in outs] if isinstance(out, (list, tuple)) else _leaf(out, out)

    if kind == "teacher":
        feats_hr = run("backbone", lambda: model.backbone(x))
        feats_lr = run("backbone", lambda: model.backbone(model.low_res(x)))
        hr = run("fpn", lambda: model.fpn(feats_hr, align.branch_levels(1.0)))
        lr = run("fpn", lambda: model.fpn(feats_lr, align.branch_levels(0.5)))
        fused = run("fusion", lambda: model.fusion(hr, lr))
        if train:  # HR, LR and fused pyramids through the shared head (batched, as MultiScaleTeacher does)
            run("head", lambda: model.head([torch.cat(level) for level in zip(hr, lr, fused)]))
        else:
            run("head", lambda: model.head(fused))
    else:
        inp = model.low_res(x) if model.input_scale != 1.0 else x
        feats = run("backbone", lambda: model.backbone(inp))
        pyr = run("fpn", lambda: model.fpn(feats, model.levels))
        run("head", lambda: model.head(pyr))
    if kind != "teacher":
        del flops["fusion"]
    flops["total"] = sum(flops.values())
    return flops


def param_split(model) -> dict:
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("backbone", "fpn", "head") + (("fusion",) if getattr(model, "fusion", None) else ())}
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def meta_copy(kind, cfg):
    with torch.device("meta"):
        return build_model(kind, cfg)


# ------------------------------------------------------------------------------------------------ main
def commit() -> str:
    """The measured code: git commit, with '+dirty' when the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine(device) -> dict:
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpu"], info["cpu_count"] = cpu, os.cpu_count()
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast dtype (bf16 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 on CPU, 3 on CUDA)")
    p.add_argument("--batch", type=int, default=2, help="images per batch")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"),
                   help="HR input size; the COCO recipe's largest short side with a 1.5 aspect (1216 <= 1333)")
    p.add_argument("--boxes", type=int, default=50, help="ground-truth boxes per image")
    p.add_argument("--quick", action="store_true", help="smoke run: 256x384, 20 boxes, 1 warm-up + 1 round")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last for every model (auto: on for CUDA, as scripts do)")
    p.add_argument("--cost-only", action="store_true",
                   help="only the latency / params / FLOPs table of HR, naive LR and student models")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/speed_<device>)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.quick:
        args.size, args.boxes = (256, 384), 20
        args.warmup = 1 if args.warmup is None else args.warmup
        args.repeats = 1 if args.repeats is None else args.repeats
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.repeats = (10 if cuda else 2) if args.repeats is None else args.repeats
    if args.amp == "bf16" and not cuda:
        p.error("--amp bf16 is for --device cuda")
    if args.size[0] % 32 or args.size[1] % 32:  # torchvision pads to 32: a multiple of 32 reaches it unpadded
        p.error("--size must be multiples of 32")
    return args


def fmt_ms(s):
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def inference_section(args, models: dict, hr_batch, lr_batch, tv_images, device, amp) -> dict:
    """2 + 5a. inference: ours vs torchvision (same weights), naive LR, student, light students."""
    ours, theirs, student, light = models["ours"], models["theirs"], models["student"], models["light"]
    set_dense_head(*[(m.head.cls_logits.bias, m.head.box_pred.bias) for m in (ours, student, *light.values())])
    copy_weights_to_torchvision(ours, theirs)
    for m in (ours, theirs, student, *light.values()):
        m.eval()

    def infer(fn):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return fn()
        return run

    inf_fns = {"ours_hr": infer(lambda: ours(hr_batch)), "ours_naive_lr": infer(lambda: ours(lr_batch)),
               "ours_student": infer(lambda: student(hr_batch)),
               **{k: infer(lambda m=m: m(hr_batch)) for k, m in light.items()}}
    if not args.cost_only:
        inf_fns["torchvision_hr"] = infer(lambda: theirs(tv_images))
        with torch.no_grad():  # in fp32 whatever --amp says: the two networks must compute the same thing
            det_ours = ours(hr_batch)
            theirs.anchor_generator = HalfStrideAnchors(theirs.anchor_generator)  # for this check only
            det_theirs = theirs(tv_images)
            theirs.anchor_generator = theirs.anchor_generator.generator
        same = all(same_detections(a, b) for a, b in zip(det_ours, det_theirs))
    inf = bench(inf_fns, args.warmup, args.repeats, device)
    section = {"seconds": inf}
    if not args.cost_only:
        section |= {"torchvision_over_ours": inf["torchvision_hr"] / inf["ours_hr"],
                    "detections_per_image": [len(d["scores"]) for d in det_ours],
                    "same_detections_as_torchvision": same}
    return section


def loss_section(args, ours, theirs, hr_batch, tv_targets, device) -> dict:
    """3. the loss/target part alone: our assign_targets + fcos_losses vs torchvision's FCOS.compute_loss."""
    B, (H, W), K = args.batch, args.size, ours.cfg.num_classes
    shapes = pyramid_shapes(H, W)
    geometry = ours.geometry([torch.empty(B, 1, h, w, device=device) for h, w in shapes])
    points, strides, ranges, _ = geometry
    L = points.shape[0]
    g = torch.Generator(device=device).manual_seed(0)
    cls = (torch.randn(B, L, K, device=device, generator=g) - 4.0).requires_grad_()
    box = (torch.rand(B, L, 4, device=device, generator=g) * 4 + 0.1).requires_grad_()
    ctr = torch.randn(B, L, device=device, generator=g).requires_grad_()
    head_out = {"cls_logits": cls, "bbox_regression": box, "bbox_ctrness": ctr[..., None]}
    feats = [torch.empty(B, 1, h, w, device=device) for h, w in shapes]
    anchors = theirs.anchor_generator(ImageList(torch.empty(B, 3, H, W, device=device), [(H, W)] * B), feats)
    num_per_level = [h * w for h, w in shapes]
    boxes_l, labels_l = [t["boxes"] for t in hr_batch.targets], [t["labels"] for t in hr_batch.targets]

    def ours_loss():  # as FCOS.targets calls it: with the level shapes, so nothing is read back from the device
        targets = assign_targets(points, strides, ranges, boxes_l, labels_l, shapes=shapes)
        return fcos_losses(cls, box, ctr, targets)

    def theirs_loss():
        return theirs.compute_loss(tv_targets, head_out, anchors, num_per_level)

    def backward(fn):
        def run():
            sum(fn().values()).backward()
            cls.grad = box.grad = ctr.grad = None
        return run

    loss_reps = max(5, 5 * args.repeats)
    loss_fwd = bench({"ours": ours_loss, "torchvision": theirs_loss}, 2, loss_reps, device)
    loss_bwd = bench({"ours": backward(ours_loss), "torchvision": backward(theirs_loss)}, 2, loss_reps, device)
    return {"locations": L, "forward_seconds": loss_fwd, "forward_backward_seconds": loss_bwd,
            "forward_torchvision_over_ours": loss_fwd["torchvision"] / loss_fwd["ours"],
            "forward_backward_torchvision_over_ours": loss_bwd["torchvision"] / loss_bwd["ours"]}


def train_section(args, models: dict, frozen_teacher, hr_batch, tv_images, tv_targets, device, amp) -> dict:
    """1 + 4 + 5b. training: ours vs torchvision, teacher, student (with its frozen teacher)."""
    ours, theirs, student, teacher = models["ours"], models["theirs"], models["student"], models["teacher"]
    for m in (ours, student):  # back to the FCOS prior init for training
        with torch.no_grad():
            m.head.cls_logits.bias.fill_(prior_bias())
            m.head.box_pred.bias.zero_()
    copy_weights_to_torchvision(ours, theirs)
    distilled = DistilledStudent(student, FeatureDistillation(), frozen_teacher)
    for m in (ours, theirs, teacher, distilled):
        m.train()

    def student_forward():
        return distilled(hr_batch, 1000)  # the teacher's features under no_grad inside, as in train_student.py

    train_fns = {
        "ours_fcos": train_step(ours, sgd(ours), lambda: ours(hr_batch), amp, device),
        "torchvision_fcos": train_step(theirs, sgd(theirs), lambda: theirs(tv_images, tv_targets), amp, device),
        "ours_teacher": train_step(teacher, sgd(teacher), lambda: teacher(hr_batch), amp, device),
        "ours_student_with_teacher": train_step(distilled, sgd(distilled), student_forward, amp, device),
    }
    tr = bench(train_fns, args.warmup, args.repeats, device)
    syncs = {k: count_syncs(train_fns[k], device) for k in ("ours_fcos", "torchvision_fcos", "ours_teacher")}
    return {"seconds": tr, "torchvision_over_ours": tr["torchvision_fcos"] / tr["ours_fcos"],
            "host_device_syncs_per_step": syncs, "teacher_over_fcos": tr["ours_teacher"] / tr["ours_fcos"],
            "images_per_second": {k: args.batch / v for k, v in tr.items()}}


def cost_section(args, cfg, light_cfgs: dict, hr_batch, lr_batch, inf: dict) -> dict:
    """FLOPs and params (meta device: no compute) of every model, with the latencies measured above."""
    H, W = args.size
    hr_meta, lr_meta = hr_batch.images.to("meta"), lr_batch.images.to("meta")
    fcos_m, student_m, teacher_m = meta_copy("fcos", cfg), meta_copy("student", cfg), meta_copy("teacher", cfg)
    models = {
        "hr_fcos": {"input": [H, W], "levels": list(fcos_m.levels), "params": param_split(fcos_m),
                    "flops_inference": flops_split(fcos_m, "fcos", hr_meta, False),
                    "head_grid": pyramid_shapes(H, W), "latency_s": inf["ours_hr"]},
        "naive_lr_fcos": {"input": [H // 2, W // 2], "levels": list(fcos_m.levels), "params": param_split(fcos_m),
                          "flops_inference": flops_split(fcos_m, "fcos", lr_meta, False),
                          "head_grid": pyramid_shapes(H // 2, W // 2), "latency_s": inf["ours_naive_lr"]},
        "msad_student": {"input": [H // 2, W // 2], "levels": list(student_m.levels), "params": param_split(student_m),
                         "flops_inference": flops_split(student_m, "student", hr_meta, False),
                         "head_grid": pyramid_shapes(H // 2, W // 2, student_m.levels),
                         "latency_s": inf["ours_student"]},
    }
    for name, c in light_cfgs.items():  # P2-P6 of the half image, like the MSAD student, with a thinner FPN / head
        m = meta_copy("student", c)
        models[name] = {
            "input": [H // 2, W // 2], "levels": list(m.levels), "fpn_channels": c.fpn_channels,
            "head_convs": c.head_convs, "params": param_split(m), "flops_inference": flops_split(m, "student",
                                                                                                 hr_meta, False),
            "head_grid": pyramid_shapes(H // 2, W // 2, m.levels), "latency_s": inf[name]}
    train_flops = {"fcos": flops_split(fcos_m, "fcos", hr_meta, True),
                   "teacher": flops_split(teacher_m, "teacher", hr_meta, True)}
    train_flops["teacher_over_fcos"] = train_flops["teacher"]["total"] / train_flops["fcos"]["total"]
    return {"models": models, "train_flops": train_flops}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    B, (H, W) = args.batch, args.size
    cfg = ModelConfig(backbone="resnet50", norm="frozen_bn", p6_from="p5")
    K = cfg.num_classes
    config = {"batch": B, "size": [H, W], "boxes": args.boxes, "warmup": args.warmup, "repeats": args.repeats,
              "amp": args.amp, "channels_last": channels_last, "model": cfg.to_dict()}
    results = {"machine": machine(device), "commit": commit(), "config": config}
    print(json.dumps(results["machine"]))
    t_start = time.perf_counter()

    def prep(m):
        m = m.to(device)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    hr_batch = make_batch(B, H, W, args.boxes, K).to(device)
    lr_batch = make_batch(B, H // 2, W // 2, args.boxes, K, seed=1).to(device)  # the naive LR model's own input
    tv_images = list(normalize(hr_batch.images))  # torchvision gets the same normalised tensor, unresized
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in hr_batch.targets]

    models = {"ours": prep(build_model("fcos", cfg)), "theirs": prep(torchvision_fcos(K))}
    seen, _ = models["theirs"].transform(tv_images)  # torchvision must get exactly our tensor: no resize or normalising
    if seen.tensors.shape[-2:] != (H, W) or not torch.equal(seen.tensors, torch.stack(tv_images)):
        raise RuntimeError(f"torchvision's transform changed the input ({tuple(seen.tensors.shape)})")
    models["student"] = prep(build_model("student", cfg))
    models["teacher"] = prep(build_model("teacher", cfg))
    light_cfgs = {k: replace(cfg, fpn_channels=f, head_convs=n) for k, (f, n) in LIGHT_STUDENTS.items()}
    models["light"] = {k: prep(build_model("student", c)) for k, c in light_cfgs.items()}

    results["inference"] = inference_section(args, models, hr_batch, lr_batch, tv_images, device, amp)
    print(f"inference done ({time.perf_counter() - t_start:.0f}s): {results['inference']['seconds']}")
    if not args.cost_only:  # sections 1, 3 and 4: the comparisons with torchvision and the teacher
        results["loss_targets"] = loss_section(args, models["ours"], models["theirs"], hr_batch, tv_targets, device)
        print(f"loss done ({time.perf_counter() - t_start:.0f}s): {results['loss_targets']['forward_seconds']} "
              f"{results['loss_targets']['forward_backward_seconds']}")
        frozen_teacher = prep(build_model("teacher", cfg)).eval().requires_grad_(False)
        results["train"] = train_section(args, models, frozen_teacher, hr_batch, tv_images, tv_targets, device, amp)
        print(f"train done ({time.perf_counter() - t_start:.0f}s): {results['train']['seconds']}")
    results |= cost_section(args, cfg, light_cfgs, hr_batch, lr_batch, results["inference"]["seconds"])
    results["total_seconds"] = time.perf_counter() - t_start

    md = markdown(results)
    print(md)
    stem = Path(args.out) if args.out else RESULTS / "_".join(
        ["speed", device.type] + ([args.amp] if amp else []) + (["quick"] if args.quick else [])
        + (["cost"] if args.cost_only else []))
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.json and {stem}.md")
    return results


def markdown(r) -> str:
    """The results as markdown: the comparisons (unless --cost-only), the cost table, training throughput."""
    c, m = r["config"], r["machine"]
    B, (H, W) = c["batch"], c["size"]
    dev = m.get("gpu", m["cpu"])
    lines = [
        f"# Speed ({m['device']}: {dev}, {m['threads']} threads, torch {m['torch']}, torchvision {m['torchvision']})",
        "",
        f"Code: {r.get('commit', 'unknown')}. `python benchmarks/speed.py --device {m['device']}"
        f"{' --amp ' + c['amp'] if c['amp'] != 'none' else ''}{' --cost-only' if 'train' not in r else ''}`.",
        "",
        f"Batch {B} at {H}x{W}, {c['boxes']} GT boxes per image, amp {c['amp']}, channels_last "
        f"{c['channels_last']}; median of {c['repeats']} interleaved rounds after {c['warmup']} warm-up. "
        "Times in ms. Ratio = torchvision / ours (> 1: ours faster). Inference uses a dense head (every "
        "location passes the score threshold, 1000 candidates per level reach NMS), the worst case for decoding.",
        "",
    ]
    if "train" in r:
        lines += markdown_comparisons(r)
    lines += markdown_cost(r)
    if "train" in r:
        lines += ["## Training throughput", "", "| | images/s |", "|---|---|"]
        for key, name in (("ours_fcos", "FCOS (HR)"), ("torchvision_fcos", "torchvision FCOS (HR)"),
                          ("ours_teacher", "MSAD teacher"),
                          ("ours_student_with_teacher", "MSAD student (incl. frozen teacher forward)")):
            lines.append(f"| {name} | {r['train']['images_per_second'][key]:.2f} |")
    lines += ["", f"Total benchmark time {r['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def markdown_comparisons(r) -> list:
    """Sections 1-4: ours vs torchvision, and the teacher iteration vs the FCOS iteration."""
    inf, tr, loss = r["inference"], r["train"], r["loss_targets"]
    gf = lambda f: f"{f / 1e9:.0f}"  # noqa: E731
    lines = [
        "| what | ours | torchvision | ratio |",
        "|---|---|---|---|",
        f"| train step (fwd + bwd + SGD), R50 FCOS | {fmt_ms(tr['seconds']['ours_fcos'])} | "
        f"{fmt_ms(tr['seconds']['torchvision_fcos'])} | {tr['torchvision_over_ours']:.2f} |",
        f"| inference (fwd + decode + NMS), dense head | {fmt_ms(inf['seconds']['ours_hr'])} | "
        f"{fmt_ms(inf['seconds']['torchvision_hr'])} | {inf['torchvision_over_ours']:.2f} |",
        f"| loss + targets, forward ({loss['locations']} locations) | {fmt_ms(loss['forward_seconds']['ours'])} | "
        f"{fmt_ms(loss['forward_seconds']['torchvision'])} | {loss['forward_torchvision_over_ours']:.2f} |",
        f"| loss + targets, forward + backward | {fmt_ms(loss['forward_backward_seconds']['ours'])} | "
        f"{fmt_ms(loss['forward_backward_seconds']['torchvision'])} | "
        f"{loss['forward_backward_torchvision_over_ours']:.2f} |",
        "",
        f"Same detections (labels, scores and boxes) as torchvision with copied weights (fp32), once its "
        f"locations get the half-stride offset: {inf['same_detections_as_torchvision']} "
        f"({inf['detections_per_image']} per image)."
        + ("" if tr["host_device_syncs_per_step"]["ours_fcos"] is None else
           " Host-device syncs per train step (CUDA sync debug mode): ours {ours_fcos}, torchvision "
           "{torchvision_fcos}, teacher {ours_teacher}.".format(**tr["host_device_syncs_per_step"])),
        "",
        "## Teacher iteration vs HR-only FCOS iteration",
        "",
        "| | time (ms) | images/s | train GFLOPs (fwd+bwd): backbone / FPN / fusion / head = total |",
        "|---|---|---|---|",
    ]
    tf = r["train_flops"]
    for name, key, fl in (("FCOS (HR, P3-P7)", "ours_fcos", tf["fcos"]), ("MSAD teacher (HR + LR + fused)",
                                                                          "ours_teacher", tf["teacher"])):
        lines.append(f"| {name} | {fmt_ms(tr['seconds'][key])} | {tr['images_per_second'][key]:.2f} | "
                     f"{gf(fl['backbone'])} / {gf(fl['fpn'])} / {gf(fl.get('fusion', 0))} / {gf(fl['head'])} "
                     f"= {gf(fl['total'])} |")
    lines += [
        "",
        f"Teacher / FCOS: time {tr['teacher_over_fcos']:.2f}x, FLOPs {tf['teacher_over_fcos']:.2f}x. "
        "The teacher runs the shared head on three pyramids of the HR grid (HR, LR, fused), so its head "
        f"alone costs {tf['teacher']['head'] / tf['fcos']['head']:.1f}x the FCOS head and "
        f"{tf['teacher']['head'] / tf['fcos']['total']:.2f}x the whole FCOS step: where the step is compute-bound "
        "(CPU, or a GPU kept busy) no implementation of this method gets the teacher under that. A GPU step "
        "bound by kernel launches (small batch) hides part of the extra work, since the teacher runs its three "
        "heads as one batched call.",
        "",
    ]
    return lines


def markdown_cost(r) -> list:
    """Section 5: latency, params and FLOPs of the HR model, the naive LR model and the students."""
    B, inf = r["config"]["batch"], r["inference"]
    gf = lambda f: f"{f / 1e9:.0f}"  # noqa: E731
    hr_total = r["models"]["hr_fcos"]["flops_inference"]["total"]
    lines = [
        "## Inference latency, params and FLOPs (backbone / FPN / head)",
        "",
        f"| model | input | levels | head grid (P_first) | latency (ms, batch {B}) | params (M) | "
        "GFLOPs backbone / FPN / head = total | GFLOPs / HR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"hr_fcos": "HR FCOS", "naive_lr_fcos": "naive LR FCOS", "msad_student": "MSAD student"}
    for key, v in r["models"].items():
        name = names.get(key) or f"light student, FPN {v['fpn_channels']}, {v['head_convs']} head convs"
        p, f = v["params"], v["flops_inference"]
        lines.append(f"| {name} | {v['input'][0]}x{v['input'][1]} | P{v['levels'][0]}-P{v['levels'][-1]} | "
                     f"{v['head_grid'][0][0]}x{v['head_grid'][0][1]} | {fmt_ms(v['latency_s'])} | "
                     f"{p['total'] / 1e6:.1f} | {gf(f['backbone'])} / {gf(f['fpn'])} / {gf(f['head'])} = "
                     f"{gf(f['total'])} | {f['total'] / hr_total:.2f} |")
    lines += [
        "",
        f"FLOPs are for the batch of {B} (FlopCounterMode: 2 per multiply-add). The student's head runs on the "
        "same grid as the HR model's (its P2 is the HR P3 grid), so only its backbone is ~4x cheaper. The light "
        "students (`train_student.py --fpn-channels F --head-convs N`) thin that FPN and head.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
