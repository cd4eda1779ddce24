"""Batch-1 latency, the way a deployed detector runs: one image at a time, decoding and NMS included.

Every model runs on the same images at the COCO test size (short side 800, long side at most 1333; the naive
LR detector at 400 / 667), each padded to a multiple of 128 as evaluate.py pads it, eager (the model's own
forward, as evaluate.py calls it) and exported (python -m msad.export's program), beside torchvision's
fcos_resnet50_fpn on the same resized image with the same thresholds (0.05, top 1000 per level, NMS 0.6,
100 detections), and with --onnx the same program in ONNX Runtime (CPU provider; modes onnx_LEVEL, one per
graph optimisation level, intra-op threads --ort-threads). The weights are untrained; `--scores` sets how
much the decoding has to do:

  dense  every classification bias at 0 (score 0.5 everywhere): every level keeps its top 1000 and NMS gets
         5000 boxes per image, the worst case for decoding (a trained model keeps far fewer)
  none   the initial prior (0.01): nothing passes 0.05, so decoding does almost nothing

Images run in turn and, for each image, every model in turn (interleaved, so a slow minute of a shared
machine hits every model alike); the table gives the median and p90 over the images and each model's ratio
to HR FCOS beside its FLOPs ratio (GFLOPs per image on the same canvases, torch.utils.flop_counter).

    python benchmarks/latency.py                      # CPU, 2 threads, 20 images, both settings
    python benchmarks/latency.py --onnx --ort-levels all,basic --models msad_student,light_128_0   # + ONNX Runtime
    python benchmarks/latency.py --device cuda --amp bf16
"""
import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msad import export  # noqa: E402
from msad.align import HR_PAD  # noqa: E402
from msad.cost import flops_per_image  # noqa: E402
from msad.data import ImageBatch, collate, resized_hw  # noqa: E402
from msad.engine import AMP_DTYPES  # noqa: E402
from msad.decode import Detector  # noqa: E402
from msad.models import ModelConfig, build_model, default_branch  # noqa: E402
from speed_parts import commit, machine, sync  # noqa: E402

# name -> (kind, ModelConfig overrides, test size): the models of the README's cost table
MODELS = {
    "hr_fcos": ("fcos", {}, 800),
    "naive_lr_fcos": ("fcos", {}, 400),
    "msad_student": ("student", {}, 800),
    "light_256_1": ("student", {"head_convs": 1}, 800),
    "light_256_0": ("student", {"head_convs": 0}, 800),
    "light_128_0": ("student", {"fpn_channels": 128, "head_convs": 0}, 800),
}
GOALS = {"msad_student": 0.75, "light_128_0": 0.2}  # latency / HR FCOS latency at most this (and 1.2 x FLOPs ratio)
# Original sizes (h, w) with the aspect ratios common in COCO (4:3, 3:4, 3:2, 16:9, 1:1, ...)
ORIGINAL_SIZES = [(480, 640), (640, 480), (427, 640), (640, 427), (360, 640), (640, 640), (500, 375), (375, 500),
                  (512, 640), (424, 640), (480, 640), (640, 512), (333, 500), (612, 612), (480, 600), (600, 400),
                  (427, 640), (480, 640), (640, 360), (480, 480)]


def image_batch(image) -> ImageBatch:
    """One resized image padded to a multiple of 128 (its own canvas), as the evaluation loader batches it."""
    size = tuple(image.shape[-2:])
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 0,
              "orig_size": size, "size": size}
    return collate([(image.cpu(), target)], HR_PAD).to(image.device)


def max_size(test_size: int) -> int:
    return round(test_size * 1333 / 800)  # 1333 at 800, 667 at 400


def set_scores(model, scores: str):
    with torch.no_grad():
        bias = model.head.cls_logits.bias if hasattr(model.head, "cls_logits") \
            else model.head.classification_head.cls_logits.bias
        bias.fill_(0.0 if scores == "dense" else -4.59512)
    return model


def torchvision_fcos(scores: str, device):
    """fcos_resnet50_fpn, our thresholds, resize off (the input is already at the test size), normalisation on."""
    model = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, score_thresh=0.05,
                                                           nms_thresh=0.6, detections_per_img=100,
                                                           topk_candidates=1000)
    model.transform.resize = lambda image, target=None: (image, target)
    return set_scores(model, scores).eval().to(device)


def onnx_runs(name: str, model, test_size: int, ort: dict, folder: str) -> dict:
    """ONNX Runtime rows of one model (CPU provider), one per graph optimisation level in ort["levels"]: the
    same program as python -m msad.export --output X.onnx, on the same padded canvas as the .pt2."""
    from msad import onnx_export
    path = f"{folder}/{name}.onnx"
    onnx_export.save_onnx(onnx_export.to_onnx(export.export(model)), path, {}, ([], []))
    runs = {}
    for level in ort["levels"]:
        session = onnx_export.session(path, ort["threads"], level)
        prepare = lambda im: {"image": image_batch(im).images[0].numpy(), "size": np.array(im.shape[-2:])}
        runs[f"{name}/onnx_{level}"] = (prepare, lambda x, s=session: s.run(None, x), test_size, model)
    return runs


def build(scores: str, device, names=tuple(MODELS), ort: dict | None = None, folder: str = ""):
    """name -> (prepare(resized uint8 image) -> input, run(input), test size, our model for FLOPs or None).
    Preparing (padding to the canvas, as the data loader does) is not timed; running, decoding included, is.
    `names`: the models of MODELS to run; `ort`: ONNX Runtime rows too (CPU: levels and threads)."""
    runs = {}
    for name, (kind, overrides, test_size) in ((n, MODELS[n]) for n in names):
        cfg = ModelConfig(**overrides)
        model = Detector(set_scores(build_model(kind, cfg), scores), default_branch(kind, cfg)).eval()
        program = export.export(model).module().to(device) if device.type == "cpu" else \
            torch.export.passes.move_to_device_pass(export.export(model), device).module()
        model = model.to(device)
        runs[f"{name}/eager"] = (image_batch, model, test_size, model)
        runs[f"{name}/exported"] = (lambda im: (image_batch(im).images[0], torch.tensor(im.shape[-2:], device=device)),
                                    lambda x, p=program: p(*x), test_size, model)
        if ort:
            runs |= onnx_runs(name, model, test_size, ort, folder)
    if "hr_fcos" in names:  # torchvision's beside our HR FCOS
        tv = torchvision_fcos(scores, device)
        runs["torchvision_fcos/eager"] = (lambda im: [im.float() / 255], tv, 800, None)
    return runs


def measure(runs: dict, images, device, amp: str, warmup: int) -> dict:
    """name -> per-image seconds; each image runs every model in turn."""
    times = {k: [] for k in runs}
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none")
    with torch.no_grad(), autocast:
        for i, image in enumerate(images[:warmup] + images):
            for name, (prepare, run, test_size, _) in runs.items():
                x = prepare(resize(image, test_size))
                sync(device)
                t0 = time.perf_counter()
                run(x)
                sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return times


def resize(image, test_size: int):
    """Short side `test_size`, long side at most 1333 (667 at 400), bilinear as the data loader resizes."""
    size = resized_hw(*image.shape[-2:], test_size, max_size(test_size))
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]


def gflops(runs: dict, images) -> dict:
    """Mean GFLOPs per image of every model of ours on the images' canvases (each canvas counted once)."""
    out = {}
    for name, (_, _, test_size, model) in runs.items():
        if model is None or not name.endswith("/eager"):
            continue
        per_canvas, total = {}, 0.0
        for image in images:
            batch = image_batch(resize(image, test_size))
            key = tuple(batch.images.shape[-2:])
            if key not in per_canvas:
                per_canvas[key] = flops_per_image(model, batch) / 1e9
            total += per_canvas[key]
        out[name.split("/")[0]] = total / len(images)
    return out


def table(times: dict, flops: dict) -> list:
    """One row per model and mode; ratios to HR FCOS where it ran (in the same mode), to the model's eager."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        model, mode = name.split("/")
        med, p90 = medians[name], statistics.quantiles(ts, n=10)[-1]
        hr = medians.get(f"hr_fcos/{'eager' if model == 'torchvision_fcos' else mode}")
        ratio = med / hr if hr else None
        f = flops.get(model)
        fr = f / flops["hr_fcos"] if f and flops.get("hr_fcos") else None
        goal = GOALS.get(model)
        ok = None if fr is None or ratio is None else ratio <= 1.2 * fr and (goal is None or ratio <= goal)
        rows.append({"model": model, "mode": mode, "median_ms": round(med * 1e3, 1), "p90_ms": round(p90 * 1e3, 1),
                     "ratio_to_hr": round(ratio, 3) if ratio else None, "gflops": round(f, 1) if f else None,
                     "flops_ratio": round(fr, 3) if fr else None, "ratio_to_eager": round(med / medians[
                         f"{model}/eager"], 3), "ratio_over_flops_ratio": round(ratio / fr, 2) if fr else None,
                     "goal": goal, "meets": ok})
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Batch-1 latency ({m['device']}, {m.get('gpu') or m['cpu']}, {m['threads']} threads, amp "
             f"{results['amp']}; torch {m['torch']}, commit {results['commit']})", "",
             f"`python benchmarks/latency.py {' '.join(results['argv'])}`: {results['images']} images, "
             f"{results['wall_s']:.0f} s in all. Ratio: median latency / HR FCOS's (eager to eager, exported to "
             "exported; torchvision to our eager HR FCOS). Goal: at most 1.2 x the FLOPs ratio, and the "
             "student at most 0.75, the light 128/0 at most 0.2.", ""]
    for scores, rows in results["tables"].items():
        lines += [f"## Scores: {scores}", "", "| model | mode | median ms | p90 ms | x eager | ratio to HR | GFLOPs | "
                  "FLOPs ratio | ratio / FLOPs ratio | goal met |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['mode']} | {r['median_ms']} | {r['p90_ms']} | {r['ratio_to_eager']} | "
                         f"{r['ratio_to_hr'] or '-'} | "
                         f"{r['gflops'] or '-'} | {r['flops_ratio'] or '-'} | {r['ratio_over_flops_ratio'] or '-'} | "
                         f"{'-' if r['meets'] is None else 'yes' if r['meets'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--images", type=int, default=20, help="timed images (sizes cycle through ORIGINAL_SIZES)")
    p.add_argument("--warmup", type=int, default=2, help="untimed images first")
    p.add_argument("--scores", default="dense,none", help="decoding load settings to run (see above)")
    p.add_argument("--models", default=",".join(MODELS), help="which of MODELS to run (default: all)")
    p.add_argument("--onnx", action="store_true", help="ONNX Runtime rows too (CPU; requirements-deploy.txt)")
    p.add_argument("--ort-levels", default="all", help="ONNX Runtime graph optimisation levels, one row each: "
                   "disable, basic, extended, all")
    p.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (default: --threads)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/latency_<device>[_bf16])")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, t0 = torch.device(args.device), time.time()
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *ORIGINAL_SIZES[i % len(ORIGINAL_SIZES)]), generator=g,
                            dtype=torch.uint8).to(device) for i in range(args.images)]
    names = args.models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown or (args.onnx and device.type != "cpu"):
        p.error(f"unknown --models {sorted(unknown)}" if unknown else "--onnx runs on the CPU provider only")
    ort = {"levels": args.ort_levels.split(","), "threads": args.ort_threads or args.threads} if args.onnx else None
    tables, folder = {}, tempfile.mkdtemp(prefix="latency_onnx_")
    for scores in args.scores.split(","):
        runs = build(scores, device, names, ort, folder)
        tables[scores] = table(measure(runs, images, device, args.amp, args.warmup), gflops(runs, images))
        print(json.dumps({scores: [(r["model"], r["mode"], r["median_ms"], r["ratio_to_hr"], r["flops_ratio"])
                                   for r in tables[scores]]}), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    results = {"argv": argv if argv is not None else sys.argv[1:], "machine": machine(device), "amp": args.amp,
               "commit": commit(), "images": args.images, "wall_s": time.time() - t0, "tables": tables}
    stem = args.out or str(Path(__file__).resolve().parent / "results" /
                           f"latency_{args.device}{'_bf16' if args.amp == 'bf16' else ''}")
    Path(stem + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(stem + ".md").write_text(markdown(results) + "\n")
    print(json.dumps({"out": stem + ".md", "wall_s": round(results["wall_s"], 1)}))


if __name__ == "__main__":
    main()
