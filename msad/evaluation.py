"""Inference over a COCO loader, COCO results json, and COCOeval (bbox), sharded over processes.

Each process runs its shard; rank 0 merges the detections by image id and scores them with pycocotools,
so numbers are comparable with the paper's Table 1-4 (COCO val2017 box AP).
"""
import contextlib
import io
import math
import os
from functools import partial

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from . import dist
from .align import HR_PAD
from .coco import _column, _int_ids, load_json_file
from .checkpoint import write_json_atomic
from .engine import AMP_DTYPES
from .meinst import encode_rle, paste_masks

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def check_categories(categories, dataset, source: str) -> list[int]:
    """Refuse, in one line, to score a model on a json whose categories it was not trained on; before inference.

    The rule: every category of the json (`dataset`, a CocoDetection) is one of the model's, with the same id
    and the same name (compared ignoring case and surrounding spaces). The model may know more: scoring it on a
    subset of its categories is legitimate (COCOeval scores the json's categories only, and the detections of
    the others are left out of the results). So a model trained with ids 5, 17, 99 is refused on the demo val
    (ids 1, 2, 4, ..., 13), as is a COCO model there (id 1 is 'person' to it, 'disc' to the json), and a json
    with a category the model cannot predict. categories: (ids, names) of the model's labels 0..C-1, from
    models.checkpoint_categories or a training set; source names where they come from. Returns the model's ids
    that the json lacks (their detections are dropped)."""
    model = {int(i): str(n) for i, n in zip(*categories)}
    unknown = [i for i in dataset.cat_ids if i not in model]
    if unknown:
        shown = ", ".join(f"{i} ({dataset.class_names[dataset.cat_ids.index(i)]!r})" for i in unknown[:3])
        raise ValueError(f"{dataset.ann_file}: {len(unknown)} of its {len(dataset.cat_ids)} categories are not "
                         f"among the {len(model)} of {source} (first: {shown}; the model's ids: "
                         f"{_preview(list(model))}): evaluate it on a json of the categories it was trained on")
    for i, name in zip(dataset.cat_ids, dataset.class_names):
        if name.strip().lower() != model[i].strip().lower():
            raise ValueError(f"{dataset.ann_file}: category {i} is {name!r}, but {model[i]!r} in {source}: the "
                             f"model was trained on other categories under the same ids")
    return [i for i in model if i not in set(dataset.cat_ids)]


def _preview(ids: list, n: int = 8) -> str:
    return ", ".join(map(str, ids[:n])) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def canvas_multiple(ckpt: dict) -> int:
    """The multiple of which evaluation pads each image's canvas: HR_PAD (128, the P7 stride that keeps a half-size
    branch aligned with the full-size one, MSAD Sec. 3.1), or the padding a converted checkpoint stores from its
    source (`size_divisible`: torchvision and AdelaiDet 32, the released MSAD 256), so that its detections are
    the source's on any canvas. A single-branch detector (fcos) may take any padding; the others a multiple of 128."""
    pad = ckpt["args"].get("size_divisible")
    return int(pad) if pad and (ckpt["kind"] == "fcos" or int(pad) % HR_PAD == 0) else HR_PAD


def image_masks(det: dict, size) -> list | None:
    """The RLEs of one image's detected masks, pasted at its original size `size` (h, w); None without masks."""
    if "masks" not in det:
        return None
    return encode_rle(paste_masks(det["masks"], det["boxes"], size))


def to_coco_results(detections, image_ids, sizes, cat_ids, scored_ids=None):
    """Per-image detections (xyxy, original pixels, contiguous labels) -> COCO results (xywh, category ids), with
    each detection's mask as an RLE "segmentation" (at the original size, `sizes` (h, w) per image) when the model
    has masks.

    cat_ids: the model's category id of each label; detections of ids outside `scored_ids` (the json's, when
    the model knows more categories than the json) are left out."""
    lookup = np.asarray(cat_ids, dtype=np.int64)
    results = []
    for det, image_id, size in zip(detections, image_ids, sizes):
        cats = lookup[det["labels"].cpu().numpy()]
        if scored_ids is not None:
            scored = np.isin(cats, list(scored_ids))
            det, cats = {k: v[torch.from_numpy(scored).to(v.device)] for k, v in det.items()}, cats[scored]
        boxes = det["boxes"].float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = image_masks(det, size)
        for i, (b, c, s) in enumerate(zip(xywh, cats.tolist(), det["scores"].cpu().tolist())):
            results.append({"image_id": int(image_id), "category_id": int(c), "bbox": [round(v, 2) for v in b],
                            "score": round(float(s), 5)} | ({"segmentation": rles[i]} if rles is not None else {}))
    return results


def to_image_entries(detections, image_ids, sizes, file_names, cat_ids, class_names):
    """Per-image detections -> one entry per image: file name, boxes (xyxy, original pixels), scores, the
    checkpoint's category ids and names, and for a mask model "masks", one RLE per box (evaluate.py --images).
    image_ids index file_names."""
    entries = []
    for det, image_id, size in zip(detections, image_ids, sizes):
        labels = det["labels"].cpu().numpy()
        rles = image_masks(det, size)
        entries.append({"image_id": int(image_id), "file_name": file_names[image_id],
                        "boxes": [[round(v, 2) for v in b] for b in det["boxes"].float().cpu().tolist()],
                        "scores": [round(v, 5) for v in det["scores"].float().cpu().tolist()],
                        "category_ids": [cat_ids[k] for k in labels],
                        "category_names": [class_names[k] for k in labels]}
                       | ({"masks": rles} if rles is not None else {}))
    return entries


@torch.no_grad()
def inference(model, loader, device, convert, amp: str = "none", min_score: float = 0.0):
    """This process's results, convert(detections, image_ids, original sizes) per batch, the image ids it
    evaluated, and its first batch (None if none was readable), on which the caller counts the model's cost
    (cost.model_cost): kept, not read again, so no image is decoded, or warned about, twice.

    Detections scoring below `min_score` are dropped first. A None batch (only unreadable images) is skipped.
    """
    model.eval()
    results, image_ids, first = [], [], None
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) \
        if amp != "none" and device.type == "cuda" else contextlib.nullcontext()
    for batch in tqdm(loader, desc="eval", disable=not dist.is_main_process(), dynamic_ncols=True):
        if batch is None:
            continue
        batch = batch.to(device)
        first = batch if first is None else first
        with autocast:
            detections = model(batch)
        if min_score > 0:
            detections = [{k: v[d["scores"] >= min_score] for k, v in d.items()} for d in detections]
        results += convert(detections, batch.image_ids, batch.orig_sizes)
        image_ids += list(batch.image_ids)
    return results, image_ids, first


def _merge(results, image_ids, first):
    """All processes' results and sorted image ids, and this rank's first batch, on rank 0 (None elsewhere)."""
    merged = dist.all_gather_objects((results, image_ids))
    if not dist.is_main_process():
        return None
    return [r for part, _ in merged for r in part], sorted({i for _, ids in merged for i in ids}), first


def _write_json(obj, output_dir):
    """OUTPUT_DIR/detections.json, atomically: a failed write (a full disk) leaves the previous detections.json
    and metrics.json whole. Once the new file is whole, the previous metrics.json goes, just before the rename:
    a run stopped before its scores (Ctrl-C in COCOeval) never leaves new detections beside old metrics."""
    if output_dir:
        write_json_atomic(obj, os.path.join(output_dir, "detections.json"), indent=None,
                          before_replace=partial(_remove, os.path.join(output_dir, "metrics.json")))


def _remove(path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def coco_evaluate(coco_gt, results, image_ids=None, verbose: bool = True, iou_type: str = "bbox") -> dict:
    """COCOeval of `results` (iou_type bbox, or segm on their "segmentation"); returns AP, AP50, AP75, APs, APm,
    APl in percent (0 when nothing detected), prefixed "mask_" for segm.

    For segm the boxes are left out of the results, so that COCOeval takes each detection's area (for APs, APm,
    APl) from its mask, not its box (as detectron2 does); crowd regions are COCOeval's own (ignored)."""
    prefix = "mask_" if iou_type == "segm" else ""
    if not results:
        return {prefix + name: 0.0 for name in METRIC_NAMES}
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        ev.params.imgIds = sorted(set(image_ids))
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        ev.evaluate()
        ev.accumulate()
        ev.summarize()  # prints the standard 12-number summary
    # COCOeval gives -1 where the ground truth has no object of a size (e.g. no large ones): null, not -100
    return {prefix + name: round(100 * float(v), 3) if v >= 0 else None for name, v in zip(METRIC_NAMES, ev.stats[:6])}


def coco_metrics(coco_gt, results, image_ids=None, masks: bool = False) -> dict:
    """Box metrics (AP, ...) and, for results with masks, mask metrics (mask_AP, ...) beside them."""
    metrics = coco_evaluate(coco_gt, results, image_ids)
    return metrics | (coco_evaluate(coco_gt, results, image_ids, iou_type="segm") if masks else {})


def evaluate(model, loader, dataset, device, output_dir=None, amp="none", min_score=0.0, cat_ids=None):
    """Sharded inference, merge on rank 0, write detections.json, COCOeval. Returns (metrics, first batch) on
    rank 0, else None. cat_ids: the model's category id of each label (default: the dataset's, for a model
    trained on it); check_categories first."""
    convert = partial(to_coco_results, cat_ids=dataset.cat_ids if cat_ids is None else cat_ids,
                      scored_ids=set(dataset.cat_ids))
    merged = _merge(*inference(model, loader, device, convert, amp, min_score=min_score))
    if merged is None:
        return None
    results, image_ids, first = merged
    _write_json(results, output_dir)
    if not dataset.coco.dataset.get("annotations"):  # e.g. test-dev image info: inference only
        print(f"{dataset.ann_file} has no annotations: no ground truth to score, detections written"
              f"{' to ' + os.path.join(output_dir, 'detections.json') if output_dir else ''}", flush=True)
        return {"images": len(image_ids), "ground_truth": False}, first
    masks = getattr(model, "masks", False)
    return coco_metrics(dataset.coco, results, image_ids, masks) | {"images": len(image_ids)}, first


def detect_images(model, loader, dataset, device, categories, output_dir=None, amp="none", min_score=0.0):
    """Detections on an ImageFolder (no annotations): OUTPUT_DIR/detections.json, one entry per readable image.

    categories: (category ids, names) of the model's contiguous labels, from the checkpoint. Returns the
    entries, the file names that were skipped as unreadable and the first batch on rank 0, Nones elsewhere.
    """
    convert = partial(to_image_entries, file_names=[dataset.file_name(i) for i in range(len(dataset))],
                      cat_ids=categories[0], class_names=categories[1])
    merged = _merge(*inference(model, loader, device, convert, amp, min_score=min_score))
    if merged is None:
        return None, None, None
    entries, image_ids, first = merged
    entries.sort(key=lambda e: e["image_id"])
    _write_json(entries, output_dir)
    missing = sorted(set(range(len(dataset))) - set(image_ids))  # failed to decode in the loader
    return entries, sorted(dataset.skipped + [dataset.file_name(i) for i in missing]), first


def load_results(path: str) -> list:
    """A COCO results file (list of {image_id, category_id, bbox [x, y, w, h], score}, or with "segmentation", an RLE
    or polygons, in place of or beside the box), checked field by field; every problem is one ValueError naming
    --detections, the file and the detection."""
    where = f"--detections {path}"
    results = load_json_file(path, where)
    if not isinstance(results, list):
        raise ValueError(f"{where}: expected a JSON list of detections")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score") if not isinstance(r, dict) or k not in r]
        if not missing and "bbox" not in r and "segmentation" not in r:
            missing = ["bbox (or segmentation)"]
        if missing:
            raise ValueError(f"{where}: detections[{i}] lacks {', '.join(missing)}")
        if "bbox" in r and (not isinstance(r["bbox"], list) or len(r["bbox"]) != 4):
            raise ValueError(f"{where}: detections[{i}] field 'bbox' must be a list [x, y, w, h], got {r['bbox']!r}")
    if len({("bbox" in r, "segmentation" in r) for r in results}) > 1:
        raise ValueError(f"{where}: every detection must have the same fields (bbox, segmentation or both); "
                         f"detections[0] has {', '.join(k for k in ('bbox', 'segmentation') if k in results[0])}")
    return results


def has_segmentation(results: list) -> bool:
    return bool(results) and "segmentation" in results[0]


def _check_segmentation(seg, i: int, size, where: str) -> None:
    """An RLE ({"size": [h, w], "counts": ...}) of its image's size, or a list of polygons (lists of x, y)."""
    if isinstance(seg, dict):
        if not ("counts" in seg and isinstance(seg.get("size"), list) and len(seg["size"]) == 2):
            raise ValueError(f"{where}: detections[{i}] field 'segmentation' must be an RLE with 'size' [h, w] and "
                             f"'counts', or a list of polygons")
        if [int(v) for v in seg["size"]] != list(size):
            raise ValueError(f"{where}: detections[{i}] segmentation size {seg['size']} is not its image's "
                             f"{list(size)}")
    elif not (isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                                   and all(type(v) in (int, float) for v in p) for p in seg)):
        raise ValueError(f"{where}: detections[{i}] field 'segmentation' must be an RLE with 'size' [h, w] and "
                         f"'counts', or a list of polygons of at least 3 points (x, y, ...)")


def check_results(results: list, path: str, gt) -> None:
    """Every detection names an image and a category of the ground truth `gt` (a CocoDetection), with
    integer ids and finite numbers as score and box, and a segmentation of its image's size; else one ValueError
    naming the detection and field."""
    where = f"--detections {path}"
    if not results:
        return
    for key, known in (("image_id", gt.image_ids), ("category_id", gt.cat_ids)):
        ids = _int_ids(results, key, where, "detections")  # N
        unknown = np.flatnonzero(~np.isin(ids, np.asarray(known, dtype=np.int64)))
        if unknown.size:
            raise ValueError(f"{where}: detections[{unknown[0]}] has {key} {ids[unknown[0]]}, "
                             f"which is not in {gt.ann_file}")
    for key in ("score", "bbox") if "bbox" in results[0] else ("score",):
        values = _column(results, key, object, where, "detections").reshape(len(results), -1)  # N x 1 or N x 4
        ok = np.fromiter((type(v) in (int, float) and math.isfinite(v) for v in values.ravel()), dtype=bool,
                         count=values.size).reshape(values.shape).all(axis=1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"{where}: detections[{i}] field '{key}' must hold finite numbers, got {results[i][key]!r}")
    if has_segmentation(results):
        sizes = {img["id"]: (img["height"], img["width"]) for img in gt.coco.dataset["images"]}
        for i, r in enumerate(results):
            _check_segmentation(r["segmentation"], i, sizes[int(r["image_id"])], where)
