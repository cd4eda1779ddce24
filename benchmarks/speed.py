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
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.models.detection.image_list import ImageList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msad import align  # noqa: E402
from msad.decode import Detector  # noqa: E402
from msad.distill import DistillationLoss, FeatureDistillation, TrainableStudent  # noqa: E402
from msad.fcos_head import HeadOutputs, prior_bias  # noqa: E402
from msad.fcos_loss import FCOSLoss, assign_targets, fcos_losses  # noqa: E402
from msad.imagenet import normalize  # noqa: E402
from msad.models import ModelConfig, build_model  # noqa: E402
from msad.output_kd import OutputDistillation  # noqa: E402
from msad.teacher_loss import TeacherLoss  # noqa: E402
from speed_parts import (HalfStrideAnchors, bench, commit, copy_weights_to_torchvision, cost_section,  # noqa: E402
                         count_syncs, machine, make_batch, pyramid_shapes, same_detections, set_dense_head, sgd,
                         torchvision_fcos, train_step)
from speed_report import markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Light students (train_student.py --fpn-channels F --head-convs N): name -> (FPN channels, convs per head tower).
LIGHT_STUDENTS = {"light_f256_h1": (256, 1), "light_f256_h0": (256, 0), "light_f128_h0": (128, 0)}


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

    ours_hr, student_lr = Detector(ours, "hr"), Detector(student, "lr")
    inf_fns = {"ours_hr": infer(lambda: ours_hr(hr_batch)), "ours_naive_lr": infer(lambda: ours_hr(lr_batch)),
               "ours_student": infer(lambda: student_lr(hr_batch)),
               **{k: infer(lambda m=Detector(m, "lr"): m(hr_batch)) for k, m in light.items()}}
    if not args.cost_only:
        inf_fns["torchvision_hr"] = infer(lambda: theirs(tv_images))
        with torch.no_grad():  # in fp32 whatever --amp says: the two networks must compute the same thing
            det_ours = ours_hr(hr_batch)
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
    points, strides, ranges, _ = align.locations([torch.empty(B, 1, h, w, device=device) for h, w in shapes])
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

    def ours_loss():  # as fcos_targets calls it: with the level shapes, so nothing is read back from the device
        targets = assign_targets(points, strides, ranges, boxes_l, labels_l, shapes=shapes)
        return fcos_losses(HeadOutputs(cls, box, ctr), targets)

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
    trainable, distillation = TrainableStudent(student), DistillationLoss(frozen_teacher, FeatureDistillation())
    # + output distillation: the frozen teacher's head also runs, on its fused pyramid (msad/output_kd.py)
    with_outputs = DistillationLoss(frozen_teacher, FeatureDistillation(), OutputDistillation(1.0))
    for m in (ours, theirs, teacher, trainable):
        m.train()

    def student_forward():  # the teacher's features under no_grad inside the loss, as in train_student.py
        return distillation(trainable(hr_batch.images), hr_batch, 1000)

    def student_outputs_forward():
        return with_outputs(trainable(hr_batch.images), hr_batch, 1000)

    train_fns = {
        "ours_fcos": train_step(ours, sgd(ours), lambda: FCOSLoss()(ours(hr_batch.images), hr_batch), amp, device),
        "torchvision_fcos": train_step(theirs, sgd(theirs), lambda: theirs(tv_images, tv_targets), amp, device),
        "ours_teacher": train_step(teacher, sgd(teacher), lambda: TeacherLoss()(teacher(hr_batch.images), hr_batch),
                                   amp, device),
        "ours_student_with_teacher": train_step(trainable, sgd(trainable), student_forward, amp, device),
        "ours_student_with_teacher_outputs": train_step(trainable, sgd(trainable), student_outputs_forward, amp,
                                                        device),
    }
    tr = bench(train_fns, args.warmup, args.repeats, device)
    syncs = {k: count_syncs(train_fns[k], device) for k in ("ours_fcos", "torchvision_fcos", "ours_teacher")}
    return {"seconds": tr, "torchvision_over_ours": tr["torchvision_fcos"] / tr["ours_fcos"],
            "host_device_syncs_per_step": syncs, "teacher_over_fcos": tr["ours_teacher"] / tr["ours_fcos"],
            "student_outputs_kd_over_feature_kd": tr["ours_student_with_teacher_outputs"] / tr["ours_student_with_teacher"],
            "images_per_second": {k: args.batch / v for k, v in tr.items()}}


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


if __name__ == "__main__":
    main()
