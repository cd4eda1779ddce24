"""COCO-format annotation json: reading, checking and parsing into arrays (no loop over annotations).

Every problem is a one-line `DatasetError` that names the file, the record and the field. Ids must be JSON
integers; boxes are converted from xywh to xyxy, clipped to the image; in training, crowd and degenerate
boxes and the images left without a box are dropped.
"""
import json
import logging
import re
from contextlib import redirect_stdout
from io import StringIO

import numpy as np
from pycocotools.coco import COCO

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A problem with the data, explained in one line that names the file and/or field."""


def load_json_file(path: str, where: str, error=ValueError):
    """The parsed JSON of `path`, or `error` with one line naming `where` and what is wrong (missing file, invalid
    JSON with its line and column, bytes that are not UTF-8, an unreadable file). Annotations and results files."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{where}: file not found") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise error(f"{where}: cannot read it ({e.strerror or e})") from None


def read_json(ann_file: str) -> dict:
    data = load_json_file(ann_file, ann_file, DatasetError)
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    return data


def top_level_list(data: dict, key: str, ann_file: str) -> list:
    if key not in data:
        raise DatasetError(f"{ann_file}: missing top-level key '{key}'")
    if not isinstance(data[key], list):
        raise DatasetError(f"{ann_file}: '{key}' must be a list")
    return data[key]


def _column(records: list, key: str, kind, ann_file: str, section: str) -> np.ndarray:
    """records[i][key] for all i as an array of `kind`; a missing or ill-typed field names its record."""
    try:
        return np.asarray([r[key] for r in records], dtype=kind)
    except (KeyError, TypeError, ValueError):
        pass
    for i, r in enumerate(records):  # slow path, only to find the first bad record for the message
        if not isinstance(r, dict):
            raise DatasetError(f"{ann_file}: {section}[{i}] is not an object")
        if key not in r:
            raise DatasetError(f"{ann_file}: {section}[{i}] has no '{key}' field")
        try:
            np.asarray(r[key], dtype=kind)
        except (TypeError, ValueError):
            raise DatasetError(f"{ann_file}: {section}[{i}] field '{key}' has a bad value {r[key]!r}") from None
    shape0 = np.shape(records[0][key])  # every value converts alone: the shapes differ (e.g. a short bbox)
    i = next((i for i, r in enumerate(records) if np.shape(r[key]) != shape0), 0)
    raise DatasetError(f"{ann_file}: {section}[{i}] field '{key}' has {len(np.ravel(records[i][key]))} values, "
                       f"{section}[0] has {len(np.ravel(records[0][key]))}")


def _int_ids(records: list, key: str, ann_file: str, section: str) -> np.ndarray:
    """records[i][key] as int64. Ids must be JSON integers: "1", 1.5 or true are refused with the record named
    (COCOeval would silently match nothing). Never parsed through float64, so ids >= 2**53 stay distinct."""
    values = _column(records, key, object, ann_file, section)  # N, the JSON values as they are
    ok = np.fromiter((type(v) is int and -2**63 <= v < 2**63 for v in values.ravel()), dtype=bool, count=values.size)
    if values.ndim != 1 or not ok.all():
        i = int(np.flatnonzero(~ok)[0]) if values.ndim == 1 else 0
        raise DatasetError(f"{ann_file}: {section}[{i}] field '{key}' must be an integer, got {records[i][key]!r}")
    return values.astype(np.int64)


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray, ann_file: str, what: str) -> np.ndarray:
    """Row of each id in `sorted_ids`; an unknown id raises naming the first annotation that has it."""
    rows = np.searchsorted(sorted_ids, ids).clip(max=max(len(sorted_ids) - 1, 0))
    unknown = np.flatnonzero(sorted_ids[rows] != ids) if len(sorted_ids) else np.arange(len(ids))
    if unknown.size:
        i = unknown[0]
        raise DatasetError(f"{ann_file}: annotations[{i}] refers to unknown {what} {ids[i]}")
    return rows


def _unique_sorted(ids: np.ndarray, ann_file: str, section: str) -> np.ndarray:
    """argsort of ids; duplicates raise."""
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(np.diff(ids[order]) == 0)
    if dup.size:
        raise DatasetError(f"{ann_file}: {section}: duplicate id {ids[order][dup[0]]}")
    return order


def _check_file_names(names: list, image_dir: str, ann_file: str) -> None:
    """Image paths must be relative and stay inside image_dir (no absolute path, drive or '..')."""
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{ann_file}: images[{i}] field 'file_name' must be a non-empty string")
        if (name.startswith(("/", "\\")) or name[1:2] == ":"
                or (".." in name and ".." in re.split(r"[\\/]", name))):
            raise DatasetError(f"{ann_file}: images[{i}] file_name {name!r} escapes the image folder {image_dir}")


def annotations(data: dict, ann_file: str, train: bool) -> list:
    """The 'annotations' list; an eval json without one (e.g. COCO test-dev image info) is fine: inference only."""
    if "annotations" not in data and not train:
        return []
    return top_level_list(data, "annotations", ann_file)


def parse_categories(cats: list, f: str) -> tuple[list[int], list[str]]:
    """Category ids in sorted order and their names; labels 0..C-1 follow this order."""
    if not cats:
        raise DatasetError(f"{f}: 'categories' is empty")
    ids = _int_ids(cats, "id", f, "categories")
    names = _column(cats, "name", object, f, "categories")
    order = _unique_sorted(ids, f, "categories")
    return ids[order].tolist(), [str(n) for n in names[order]]


def parse_images(images: list, anns: list, cat_ids: list[int], image_dir: str, f: str, train: bool) -> dict:
    """Check the json and keep, per kept image, its boxes (xyxy, original pixels) and labels as arrays."""
    img_ids = _int_ids(images, "id", f, "images")
    widths = _column(images, "width", np.float64, f, "images")
    heights = _column(images, "height", np.float64, f, "images")
    names = _column(images, "file_name", object, f, "images")
    bad = np.flatnonzero(~((widths >= 1) & (heights >= 1)))  # also catches NaN
    if bad.size:
        i = bad[0]
        raise DatasetError(f"{f}: images[{i}] has a bad size: width {images[i]['width']!r}, "
                           f"height {images[i]['height']!r}")
    _check_file_names(names, image_dir, f)
    order = _unique_sorted(img_ids, f, "images")  # images in sorted id order
    img_ids, widths, heights, names = img_ids[order], widths[order], heights[order], names[order]

    a_img = _int_ids(anns, "image_id", f, "annotations")
    a_cat = _int_ids(anns, "category_id", f, "annotations")
    if not train:  # COCOeval indexes ground truth by annotation id: each must be a unique integer
        _unique_sorted(_int_ids(anns, "id", f, "annotations"), f, "annotations")
    bbox = _column(anns, "bbox", np.float64, f, "annotations").reshape(len(anns), -1 if anns else 4)  # N x 4, xywh
    if bbox.shape[1] != 4:
        raise DatasetError(f"{f}: annotations[0] field 'bbox' must be [x, y, width, height]")
    crowd = np.asarray([a.get("iscrowd", 0) for a in anns], dtype=bool)
    rows = _lookup(img_ids, a_img, f, "image_id")  # N, row of the annotation's image
    labels = _lookup(np.asarray(cat_ids), a_cat, f, "category_id")  # N, contiguous labels

    # xywh -> xyxy, clipped to the image; then drop crowd and degenerate boxes (no loop over boxes)
    boxes = np.concatenate([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], axis=1)  # N x 4
    limits = np.stack([widths[rows], heights[rows]], axis=1)  # N x 2
    boxes = np.clip(boxes, 0, np.tile(limits, 2))  # NaN stays NaN and fails the test below
    usable = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    degenerate = int((~crowd & ~usable).sum())
    keep = usable & ~crowd
    if degenerate and train:
        log.warning("%s: dropped %d boxes of zero or negative size after clipping to the image", f, degenerate)

    counts = np.bincount(rows[keep], minlength=len(img_ids))  # boxes per image
    img_keep = counts > 0 if train else np.ones(len(img_ids), dtype=bool)
    if train and not img_keep.all():
        log.info("%s: dropped %d of %d images without usable boxes", f, int((~img_keep).sum()), len(img_ids))
    if not img_keep.any():
        raise DatasetError(f"{f}: no training images with usable boxes" if train else f"{f}: no images")

    by_image = np.argsort(rows[keep], kind="stable")  # kept annotations grouped by image, json order inside
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return {"boxes": boxes[keep][by_image].astype(np.float32),  # M x 4
            "ann_index": np.flatnonzero(keep)[by_image],  # M: each kept box's position in the json's annotations
            "labels": labels[keep][by_image].astype(np.int64),  # M
            "start": offsets[:-1][img_keep], "end": offsets[1:][img_keep],  # n, n: slices into M
            "image_ids": img_ids[img_keep].tolist(), "file_names": names[img_keep].tolist(),
            "sizes": np.stack([heights, widths], axis=1)[img_keep].astype(np.int64)}  # n x 2, (H0, W0)


def segmentations(data: dict, ann_index: np.ndarray, ann_file: str) -> list:
    """The `segmentation` of each kept annotation, in the dataset's box order; one DatasetError naming the file
    and the first annotation without one (a mask model cannot learn from a box)."""
    anns = data.get("annotations", [])
    missing = [int(i) for i in ann_index if not isinstance(anns[i], dict) or "segmentation" not in anns[i]]
    if missing:
        raise DatasetError(f"{ann_file}: annotations[{missing[0]}] has no 'segmentation' ({len(missing)} of "
                           f"{len(ann_index)} kept objects lack one); a model with a mask branch needs one per object")
    return [anns[i]["segmentation"] for i in ann_index]


def coco_index(data: dict) -> COCO:
    """pycocotools index of the (already checked) json, for COCOeval; built quietly.

    COCOeval needs `area` (it sorts ground truth into small/medium/large by it) and `iscrowd`;
    COCO-format files of other datasets often lack them, so they default to the box area and 0.
    """
    for ann in data.get("annotations", []):
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    index = COCO()
    index.dataset = data
    with redirect_stdout(StringIO()):
        index.createIndex()
    return index
