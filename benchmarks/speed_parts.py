"""The pieces of benchmarks/speed.py: inputs, the torchvision twin of our FCOS, timing, FLOPs and params."""
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msad import align, convert  # noqa: E402
from msad.data import ImageBatch  # noqa: E402
from msad.models import build_model  # noqa: E402

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
    """Load our FCOS weights into torchvision's FCOS (same architecture once our Scales are 1): the key map of
    python -m msad.convert torchvision, run backwards."""
    if any(float(s.scale.detach()) != 1.0 for s in ours.head.scales):
        raise ValueError("torchvision's FCOS has no per-level Scale; ours must be at 1.0")
    state = ours.state_dict()
    entries = convert.entries_for("torchvision", "fcos", 1.0, state)
    theirs.load_state_dict({e.source: e.inverse(state[e.ours]) for e in entries}, strict=True)


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
        feats_lr = run("backbone", lambda: model.backbone(align.make_low_res(x)))
        hr = run("fpn", lambda: model.fpn(feats_hr, align.branch_levels(1.0)))
        lr = run("fpn", lambda: model.fpn(feats_lr, align.branch_levels(0.5)))
        fused = run("fusion", lambda: model.fusion(hr, lr))
        if train:  # HR, LR and fused pyramids through the shared head (batched, as MultiScaleTeacher does)
            run("head", lambda: model.head([torch.cat(level) for level in zip(hr, lr, fused)]))
        else:
            run("head", lambda: model.head(fused))
    else:
        inp = align.make_low_res(x) if model.input_scale != 1.0 else x
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
