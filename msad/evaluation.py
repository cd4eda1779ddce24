"""Inference over a COCO loader, COCO results json, and COCOeval (bbox), sharded over processes.

Each process runs its shard; rank 0 merges the detections by image id and scores them with pycocotools,
so numbers are comparable with the paper's Table 1-4 (COCO val2017 box AP).
"""
import contextlib
import io
import json
import math
import os

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from . import dist
from .data import _column, _int_ids

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(detections, image_ids, label_to_cat_id):
    """Per-image detections (xyxy, original pixels, contiguous labels) -> COCO results (xywh, category ids)."""
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        cats = label_to_cat_id(det["labels"].cpu())
        results += [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 2) for v in b],
                     "score": round(float(s), 5)} for b, c, s in zip(xywh, cats, det["scores"].cpu().tolist())]
    return results


@torch.no_grad()
def inference(model, loader, device, label_to_cat_id, amp: str = "none", progress: bool = True):
    """This process's COCO results and the image ids it evaluated."""
    model.eval()
    results, image_ids = [], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16) \
        if amp != "none" and device.type == "cuda" else contextlib.nullcontext()
    for batch in tqdm(loader, desc="eval", disable=not (progress and dist.is_main_process()), dynamic_ncols=True):
        batch = batch.to(device)
        with autocast:
            detections = model(batch)
        results += to_coco_results(detections, batch.image_ids, label_to_cat_id)
        image_ids += list(batch.image_ids)
    return results, image_ids


def coco_evaluate(coco_gt, results, image_ids=None, verbose: bool = True) -> dict:
    """COCOeval bbox on `results`; returns AP, AP50, AP75, APs, APm, APl in percent (0 when nothing detected)."""
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
        ev.params.imgIds = sorted(set(image_ids))
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        ev.evaluate()
        ev.accumulate()
        ev.summarize()  # prints the standard 12-number summary
    return {name: round(100 * float(v), 3) for name, v in zip(METRIC_NAMES, ev.stats[:6])}


def evaluate(model, loader, dataset, device, output_dir=None, amp="none"):
    """Sharded inference, merge on rank 0, write detections.json, COCOeval. Returns metrics on rank 0, else None."""
    results, image_ids = inference(model, loader, device, dataset.label_to_cat_id, amp)
    merged = dist.all_gather_objects((results, image_ids))
    if not dist.is_main_process():
        return None
    results = [r for part, _ in merged for r in part]
    image_ids = sorted({i for _, ids in merged for i in ids})
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "detections.json"), "w") as f:
            json.dump(results, f)
    if not dataset.coco.dataset.get("annotations"):  # e.g. test-dev image info: inference only
        print(f"{dataset.ann_file} has no annotations: no ground truth to score, detections written"
              f"{' to ' + os.path.join(output_dir, 'detections.json') if output_dir else ''}", flush=True)
        return {"images": len(image_ids), "ground_truth": False}
    return coco_evaluate(dataset.coco, results, image_ids) | {"images": len(image_ids)}


def load_results(path: str) -> list:
    """A COCO results file (list of {image_id, category_id, bbox [x, y, w, h], score}), checked field by field."""
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--detections {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--detections {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(results, list):
        raise ValueError(f"--detections {path}: expected a JSON list of detections")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"--detections {path}: detection {i} lacks {', '.join(missing)}")
        if len(r["bbox"]) != 4:
            raise ValueError(f"--detections {path}: detection {i} bbox must be [x, y, w, h]")
    return results


def check_results(results: list, path: str, gt) -> None:
    """Every detection names an image and a category of the ground truth `gt` (a CocoDetection), with
    integer ids and finite numbers as score and box; else one ValueError naming the detection and field."""
    where = f"--detections {path}"
    if not results:
        return
    for key, known in (("image_id", gt.image_ids), ("category_id", gt.cat_ids)):
        ids = _int_ids(results, key, where, "detections")  # N
        unknown = np.flatnonzero(~np.isin(ids, np.asarray(known, dtype=np.int64)))
        if unknown.size:
            raise ValueError(f"{where}: detections[{unknown[0]}] has {key} {ids[unknown[0]]}, "
                             f"which is not in {gt.ann_file}")
    for key in ("score", "bbox"):
        values = _column(results, key, object, where, "detections").reshape(len(results), -1)  # N x 1 or N x 4
        ok = np.fromiter((type(v) in (int, float) and math.isfinite(v) for v in values.ravel()), dtype=bool,
                         count=values.size).reshape(values.shape).all(axis=1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"{where}: detections[{i}] field '{key}' must hold finite numbers, got {results[i][key]!r}")


def visualize(dataset, results, out_dir: str, count: int, min_score: float = 0.3) -> list:
    """Draw the detections of the first `count` evaluated images (original pixels) into PNG files."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes
    os.makedirs(out_dir, exist_ok=True)
    names = {c["id"]: c["name"] for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    written = []
    for image_id in dataset.image_ids[:count]:
        info = dataset.coco.loadImgs(image_id)[0]
        rgb = Image.open(os.path.join(dataset.image_dir, info["file_name"])).convert("RGB")
        image = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)  # 3 x H0 x W0 uint8
        dets = [r for r in results if r["image_id"] == image_id and r["score"] >= min_score]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]).reshape(-1, 4)
        labels = [f"{names[d['category_id']]} {d['score']:.2f}" for d in dets]
        drawn = draw_bounding_boxes(image, boxes, labels, colors="red", width=2)
        path = os.path.join(out_dir, f"{image_id}.png")
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)
        written.append(path)
    return written
