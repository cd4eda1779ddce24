"""COCO-format detection data: loading and checking the json, decoding and resizing images, batching.

Any COCO-format json with an image folder works (COCO 2017, the built-in synthetic set, your own data).
The flow is: json -> `CocoDetection` (checked once, boxes kept as arrays) -> `__getitem__` (decode with
Pillow, flip, resize the short side) -> `collate` (pad to a multiple of 128, MSAD Sec. 3.1) -> `ImageBatch`
-> `normalize` on the GPU. Images stay uint8 until `normalize`, which keeps worker->GPU traffic 4x smaller.

Training is iteration based (as in detectron2 and the released MSAD code): `TrainBatchSampler` is an
infinite, deterministic stream of batches, so `--resume` at iteration k sees exactly the batches that an
uninterrupted run would have seen, including their augmentation (each sample carries its own aug seed).
"""
import functools
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import stat
from contextlib import redirect_stdout
from dataclasses import dataclass
from functools import partial
from io import StringIO
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pycocotools.coco import COCO

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, 0..1 scale (torchvision ResNet weights)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Batches are padded in uint8 with the mean colour, so that after normalize() the padding is ~0, as when
# detectron2 pads the normalised tensor with 0.
PAD_VALUE = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the camera orientation
MAX_CONSECUTIVE_BAD_IMAGES = 10  # more than this in a row means a wrong image folder, not a few bad files


class DatasetError(ValueError):
    """A problem with the data, explained in one line that names the file and/or field."""


class _BadImage(Exception):
    """An image file that cannot be used (missing, corrupt, truncated, wrong size)."""


# ----------------------------------------------------------------------------------------------------
# json parsing and checks
# ----------------------------------------------------------------------------------------------------
def _read_json(ann_file: str) -> dict:
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{ann_file}: not UTF-8 JSON (byte {e.start})") from None
    except OSError as e:
        raise DatasetError(f"{ann_file}: cannot read annotation file: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    return data


def _section(data: dict, key: str, ann_file: str) -> list:
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


def _open_inside(path: str, folder: str):
    """Open `path` for reading if, links resolved, it is a regular file inside `folder`; else _BadImage.

    O_NONBLOCK so that opening a FIFO returns at once (it is then refused), instead of waiting for a writer.
    """
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise _BadImage(f"links to {real}, outside the image folder {root}")
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _BadImage("not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG "I;16*" / "I") -> 8-bit "L", scaled by 255 / 65535; Pillow would clip it to 255."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    values = np.asarray(im, dtype=np.float64)  # H x W, 0..65535
    return Image.fromarray(np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


# ----------------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------------
def resized_hw(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """Output size for a short side of `short` and a long side of at most `max_size` (detectron2 rounding)."""
    scale = min(short / min(h, w), max_size / max(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset (json checked at construction, images decoded on demand).

    Training (`train=True`): crowd boxes are ignored, boxes are clipped to the image, boxes of zero or
    negative size are dropped (one warning with the count), images without a usable box are dropped; each
    sample draws its short side from `sizes` and flips with `flip_prob`, from `random.Random(aug_seed)`.
    An unreadable image is logged, counted in `num_skipped_images` (per process: each loader worker has its
    own copy) and replaced by the next readable one. Evaluation (`train=False`): every image, sorted by id,
    at short side `sizes[-1]`, no flip; an unreadable image raises DatasetError. The pycocotools index
    of the json is kept as `coco` for COCOeval in eval mode (None in training, to save memory).

    Labels are contiguous 0..C-1 in the order of sorted category ids; `label_to_cat_id` maps them back.
    """

    def __init__(self, ann_file, image_dir, train: bool, sizes: Sequence[int], max_size: int,
                 flip_prob: float = 0.5):
        self.ann_file, self.image_dir = str(ann_file), str(image_dir)
        self.train, self.sizes, self.max_size = train, [int(s) for s in sizes], int(max_size)
        self.flip_prob = flip_prob if train else 0.0
        if not self.sizes:
            raise ValueError("sizes must name at least one short-side size")
        if train and not os.path.isdir(self.image_dir):  # eval may only need the json (scoring a results file)
            raise DatasetError(f"{self.image_dir}: image folder not found")
        data = _read_json(self.ann_file)
        self._parse_categories(_section(data, "categories", self.ann_file))
        self._parse(_section(data, "images", self.ann_file), self._annotations(data))
        self.coco = None if train else self._coco_index(data)
        self.num_skipped_images = 0

    # -- construction ---------------------------------------------------------------------------------
    def _annotations(self, data: dict) -> list:
        # An eval json without annotations (e.g. COCO test-dev image info) is fine: inference only.
        if "annotations" not in data and not self.train:
            return []
        return _section(data, "annotations", self.ann_file)

    def _parse_categories(self, cats: list) -> None:
        f = self.ann_file
        if not cats:
            raise DatasetError(f"{f}: 'categories' is empty")
        ids = _int_ids(cats, "id", f, "categories")
        names = _column(cats, "name", object, f, "categories")
        order = _unique_sorted(ids, f, "categories")
        self.cat_ids: list[int] = ids[order].tolist()
        self.class_names: list[str] = [str(n) for n in names[order]]
        self.num_classes = len(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}

    def _parse(self, images: list, anns: list) -> None:
        """Check the json and keep, per kept image, its boxes (xyxy, original pixels) and labels as arrays."""
        f = self.ann_file
        img_ids = _int_ids(images, "id", f, "images")
        widths = _column(images, "width", np.float64, f, "images")
        heights = _column(images, "height", np.float64, f, "images")
        names = _column(images, "file_name", object, f, "images")
        bad = np.flatnonzero(~((widths >= 1) & (heights >= 1)))  # also catches NaN
        if bad.size:
            i = bad[0]
            raise DatasetError(f"{f}: images[{i}] has a bad size: width {images[i]['width']!r}, "
                               f"height {images[i]['height']!r}")
        _check_file_names(names, self.image_dir, f)
        order = _unique_sorted(img_ids, f, "images")  # images in sorted id order
        img_ids, widths, heights, names = img_ids[order], widths[order], heights[order], names[order]

        a_img = _int_ids(anns, "image_id", f, "annotations")
        a_cat = _int_ids(anns, "category_id", f, "annotations")
        if not self.train:  # COCOeval indexes ground truth by annotation id: each must be a unique integer
            _unique_sorted(_int_ids(anns, "id", f, "annotations"), f, "annotations")
        bbox = _column(anns, "bbox", np.float64, f, "annotations").reshape(len(anns), -1 if anns else 4)  # N x 4, xywh
        if bbox.shape[1] != 4:
            raise DatasetError(f"{f}: annotations[0] field 'bbox' must be [x, y, width, height]")
        crowd = np.asarray([a.get("iscrowd", 0) for a in anns], dtype=bool)
        rows = _lookup(img_ids, a_img, f, "image_id")  # N, row of the annotation's image
        labels = _lookup(np.asarray(self.cat_ids), a_cat, f, "category_id")  # N, contiguous labels

        # xywh -> xyxy, clipped to the image; then drop crowd and degenerate boxes (no loop over boxes)
        boxes = np.concatenate([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], axis=1)  # N x 4
        limits = np.stack([widths[rows], heights[rows]], axis=1)  # N x 2
        boxes = np.clip(boxes, 0, np.tile(limits, 2))  # NaN stays NaN and fails the test below
        usable = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        degenerate = int((~crowd & ~usable).sum())
        keep = usable & ~crowd
        if degenerate and self.train:
            log.warning("%s: dropped %d boxes of zero or negative size after clipping to the image", f, degenerate)

        counts = np.bincount(rows[keep], minlength=len(img_ids))  # boxes per image
        img_keep = counts > 0 if self.train else np.ones(len(img_ids), dtype=bool)
        if self.train and not img_keep.all():
            log.info("%s: dropped %d of %d images without usable boxes", f, int((~img_keep).sum()), len(img_ids))
        if not img_keep.any():
            raise DatasetError(f"{f}: no training images with usable boxes" if self.train else f"{f}: no images")

        by_image = np.argsort(rows[keep], kind="stable")  # kept annotations grouped by image, json order inside
        self._boxes = boxes[keep][by_image].astype(np.float32)  # M x 4
        self._labels = labels[keep][by_image].astype(np.int64)  # M
        offsets = np.concatenate([[0], np.cumsum(counts)])
        self._start, self._end = offsets[:-1][img_keep], offsets[1:][img_keep]  # n, n: slices into M
        self.image_ids: list[int] = img_ids[img_keep].tolist()
        self._file_names: list[str] = names[img_keep].tolist()
        self._sizes = np.stack([heights, widths], axis=1)[img_keep].astype(np.int64)  # n x 2, (H0, W0)

    @staticmethod
    def _coco_index(data: dict) -> COCO:
        """pycocotools index of the (already checked) json, for COCOeval; built quietly.

        COCOeval needs `area` (it sorts ground truth into small/medium/large by it) and `iscrowd`;
        COCO-format files of other datasets often lack them, so they default to the box area and 0.
        """
        for ann in data.get("annotations", []):
            if "area" not in ann:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            ann.setdefault("iscrowd", 0)
        coco = COCO()
        coco.dataset = data
        with redirect_stdout(StringIO()):
            coco.createIndex()
        return coco

    # -- public helpers -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    def label_to_cat_id(self, labels) -> list[int]:
        """Contiguous labels 0..C-1 -> COCO category ids (the only place of this mapping)."""
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        return np.asarray(self.cat_ids, dtype=np.int64)[np.asarray(labels, dtype=np.int64)].tolist()

    def aspect_ratios(self) -> list[float]:
        """w / h of every kept image, from the json (no image is opened)."""
        return (self._sizes[:, 1] / self._sizes[:, 0]).tolist()

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self._file_names[index])

    def ground_truth(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Kept boxes [N, 4] (xyxy, original pixels) and contiguous labels [N] of one image (no image read)."""
        return self._boxes[self._start[index]:self._end[index]], self._labels[self._start[index]:self._end[index]]

    def padded_shapes(self, size_divisible: int) -> np.ndarray:
        """[n, 2] (H, W) of each image's own padded canvas at evaluation, from the sizes alone (no image read).

        The resize is `resized_hw` at short side sizes[-1] (the same float64 arithmetic, vectorised), then
        each side is rounded up to a multiple of `size_divisible`, as `collate` pads a batch of one.
        """
        H0, W0 = self._sizes[:len(self)].T.astype(np.float64)  # n, n
        short = self.sizes[-1]
        scale = np.minimum(short / np.minimum(H0, W0), self.max_size / np.maximum(H0, W0))  # n
        hw = np.stack([(H0 * scale + 0.5).astype(np.int64), (W0 * scale + 0.5).astype(np.int64)], axis=1)  # n x 2
        d = max(int(size_divisible), 1)
        return -(-hw // d) * d

    # -- samples --------------------------------------------------------------------------------------
    def __getitem__(self, key):
        """key: index, or (index, aug_seed) from TrainBatchSampler -> (uint8 image [3, h, w], target dict).

        A plain index uses aug_seed = index, so that even then the augmentation is deterministic.
        """
        index, aug_seed = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), int(key))
        bad_in_a_row = 0
        while True:
            try:
                return self._load(index, aug_seed)
            except _BadImage as e:
                if not self.train:
                    raise DatasetError(f"{self.image_path(index)}: {e}") from None
                self.num_skipped_images += 1
                bad_in_a_row += 1
                log.warning("skipping unreadable image %s (%s); %d skipped so far in this process",
                            self.image_path(index), e, self.num_skipped_images)
                if bad_in_a_row >= MAX_CONSECUTIVE_BAD_IMAGES:
                    raise DatasetError(f"{self.image_dir}: {bad_in_a_row} unreadable images in a row, last "
                                       f"{self.image_path(index)}; is the image folder right?") from None
                index = (index + 1) % len(self)  # deterministic replacement: the next image

    def _read_image(self, index: int) -> Image.Image:
        """Decode fully to RGB, upright (EXIF orientation applied, as detectron2 does); any problem is _BadImage.

        Only a regular file inside the image folder is opened, after resolving links (a link pointing out
        of the folder, or a FIFO that would block forever, is refused). 16-bit images are scaled to 8 bits.
        """
        H0, W0 = self._sizes[index].tolist()
        try:
            with _open_inside(self.image_path(index), self.image_dir) as f, Image.open(f) as im:
                if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    im = ImageOps.exif_transpose(im)  # upright: the image (and size) the annotator saw
                if im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")  # the documented route for palette images with transparency
                rgb = _to_8bit(im).convert("RGB")  # forces the full decode: truncated files fail here
        except FileNotFoundError:
            raise _BadImage("file not found") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _BadImage(f"cannot decode: {e}") from None
        if rgb.size != (W0, H0):
            raise _BadImage(f"decoded size {rgb.size[0]}x{rgb.size[1]} (EXIF orientation applied) differs from "
                            f"the json's {W0}x{H0}")
        return rgb

    def _load(self, index: int, aug_seed: int):
        rng = random.Random(aug_seed)
        short = rng.choice(self.sizes) if self.train else self.sizes[-1]
        flip = self.train and rng.random() < self.flip_prob
        im = self._read_image(index)
        H0, W0 = self._sizes[index].tolist()
        h, w = resized_hw(H0, W0, short, self.max_size)
        boxes = torch.from_numpy(self._boxes[self._start[index]:self._end[index]])  # N x 4, original pixels
        if flip:  # before the resize, on the smaller image; resizing commutes with the flip
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = torch.stack([W0 - boxes[:, 2], boxes[:, 1], W0 - boxes[:, 0], boxes[:, 3]], dim=1)
        boxes = boxes * torch.tensor([w / W0, h / H0, w / W0, h / H0])  # N x 4, resized pixels
        image = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # H0 x W0 x 3 -> 3 x H0 x W0 (a view)
        if (h, w) != (H0, W0):
            # Bilinear, anti-aliased when shrinking: the result matches PIL's resize to +-1 grey level, and
            # torch's uint8 kernel is ~3x faster than PIL's (data loading is the bottleneck on COCO).
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True)[0]  # 3 x h x w
        labels = torch.from_numpy(self._labels[self._start[index]:self._end[index]].copy())  # N
        target = {"boxes": boxes, "labels": labels, "image_id": self.image_ids[index], "orig_size": (H0, W0),
                  "size": (h, w)}
        return image.contiguous(), target


class ImageFolder(CocoDetection):
    """The .jpg/.jpeg/.png files directly inside a folder, for detection without annotations (evaluate.py
    --images): evaluation mode of CocoDetection, sorted by file name, image_id = position in that order.

    Sizes come from the file headers (nothing is decoded here). A file whose header cannot be read, or
    whose full decode fails later, is logged by name and skipped: `skipped` lists the former, and
    `__getitem__` returns None for the latter (the eval loader leaves it out of its batch).
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png")

    def __init__(self, folder, size: int, max_size: int):
        self.ann_file = self.image_dir = str(folder)  # errors name the folder
        self.train, self.sizes, self.max_size, self.flip_prob = False, [int(size)], int(max_size), 0.0
        if not os.path.isdir(self.image_dir):
            raise DatasetError(f"{self.image_dir}: image folder not found")
        names = sorted(n for n in os.listdir(self.image_dir) if n.lower().endswith(self.EXTENSIONS)
                       and os.path.isfile(os.path.join(self.image_dir, n)))
        self.skipped, readable, sizes = [], [], []
        for name in names:
            try:
                with Image.open(os.path.join(self.image_dir, name)) as im:
                    w, h = im.size
                readable.append(name)
                sizes.append((h, w))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                log.warning("skipping unreadable image %s (%s)", os.path.join(self.image_dir, name), e)
                self.skipped.append(name)
        if not readable:
            raise DatasetError(f"{self.image_dir}: no readable .jpg or .png image"
                               + (f" ({len(self.skipped)} unreadable)" if self.skipped else ""))
        n = len(readable)
        self._file_names, self.image_ids = readable, list(range(n))
        self._sizes = np.asarray(sizes, dtype=np.int64).reshape(n, 2)  # n x 2, (H0, W0)
        self._boxes, self._labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)  # no annotations
        self._start = self._end = np.zeros(n, dtype=np.int64)
        self.coco, self.num_skipped_images = None, 0

    def file_name(self, index: int) -> str:
        return self._file_names[index]

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except DatasetError as e:  # the eval-mode error of an image that does not decode
            log.warning("skipping unreadable image %s", e)
            return None


def coco_paths(data_root, split: str) -> tuple[str, str]:
    """(ann_file, image_dir) in the COCO 2017 layout: annotations/instances_{split}2017.json, {split}2017/."""
    root = Path(data_root)
    return str(root / "annotations" / f"instances_{split}2017.json"), str(root / f"{split}2017")


# ----------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------
@dataclass
class ImageBatch:
    """A padded batch. Images are uint8 and top-left aligned; `normalize` turns them into model input."""

    images: torch.Tensor  # B x 3 x H x W uint8, H and W multiples of size_divisible, padded with PAD_VALUE
    targets: list  # per image: boxes [N, 4] xyxy resized pixels, labels [N], image_id, orig_size, size
    image_sizes: list  # per image (h, w) after resizing, before padding
    orig_sizes: list  # per image (H0, W0) of the file
    image_ids: list

    def _map(self, fn) -> "ImageBatch":
        targets = [{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in self.targets]
        return ImageBatch(fn(self.images), targets, self.image_sizes, self.orig_sizes, self.image_ids)

    def to(self, device, non_blocking: bool = True) -> "ImageBatch":
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ImageBatch":
        """Called by DataLoader(pin_memory=True), which does not look inside dataclasses."""
        return self._map(lambda x: x.pin_memory())

    def __len__(self) -> int:
        return len(self.image_ids)


def collate(samples, size_divisible: int = 128) -> ImageBatch:
    """Pad images to a common size, a multiple of `size_divisible` (128 = the P7 stride, MSAD Sec. 3.1)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images, targets = zip(*samples)
    d = max(int(size_divisible), 1)
    H = math.ceil(max(im.shape[1] for im in images) / d) * d
    W = math.ceil(max(im.shape[2] for im in images) / d) * d
    pad = torch.tensor(PAD_VALUE, dtype=torch.uint8).view(1, 3, 1, 1)
    batch = pad.repeat(len(images), 1, H, W)  # B x 3 x H x W
    for b, im in zip(batch, images):
        b[:, :im.shape[1], :im.shape[2]].copy_(im)
    return ImageBatch(batch, list(targets), [tuple(t["size"]) for t in targets],
                      [tuple(t["orig_size"]) for t in targets], [t["image_id"] for t in targets])


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device):
    """ImageNet mean and std on `device`, 0..255 scale: made once, so normalize never waits on a copy."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1).mul(255).to(device)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1).mul(255).to(device)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) B x 3 x H x W -> float32 (x / 255 - mean) / std, on the images' device."""
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


# ----------------------------------------------------------------------------------------------------
# samplers and loaders
# ----------------------------------------------------------------------------------------------------
class TrainBatchSampler(torch.utils.data.Sampler):
    """Infinite, deterministic, distributed stream of batches of (index, aug_seed) (the detectron2 way).

    Epoch e shuffles with torch.Generator seeded seed + e (the same on every rank), pads to a multiple of
    world_size and gives rank r the indices r::world_size, as DistributedSampler does. With aspect grouping,
    indices fill one bucket per orientation (w >= h, w < h) and a bucket is emitted when full; what is left
    at the end of an epoch carries over, so nothing is dropped. aug_seed is drawn from the same generator
    per (epoch, index). `start_iter` skips that many batches without loading any image, so a resumed run
    continues with exactly the batches of an uninterrupted one. An int instead of aspect ratios means no
    orientation information, hence no grouping.
    """

    def __init__(self, dataset_len_or_aspect_ratios, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, group_by_aspect: bool = True, start_iter: int = 0):
        if isinstance(dataset_len_or_aspect_ratios, int):
            self.n, self.groups = dataset_len_or_aspect_ratios, None
        else:
            ratios = np.asarray(dataset_len_or_aspect_ratios, dtype=np.float64)
            self.n = len(ratios)
            self.groups = (ratios < 1).astype(np.int64) if group_by_aspect else None  # 0: w >= h, 1: w < h
        if self.n <= 0 or batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: n={self.n} batch_size={batch_size} rank={rank}/{world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_iter = seed, start_iter

    def _epoch(self, epoch: int) -> tuple[list, list]:
        """This rank's (indices, aug_seeds) for one epoch."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)  # n
        aug_seeds = torch.randint(2 ** 62, (self.n,), generator=g)  # n, aug seed of each index this epoch
        total = math.ceil(self.n / self.world_size) * self.world_size
        perm = perm.repeat(math.ceil(total / self.n))[:total]  # pad like DistributedSampler
        mine = perm[self.rank::self.world_size]  # total / world_size
        return mine.tolist(), aug_seeds[mine].tolist()

    def _batches(self) -> Iterator[list]:
        buckets = [[], []]
        for epoch in itertools.count():  # infinite; epochs are only a shuffling unit
            indices, seeds = self._epoch(epoch)
            for i, s in zip(indices, seeds):
                bucket = buckets[self.groups[i] if self.groups is not None else 0]
                bucket.append((i, s))
                if len(bucket) == self.batch_size:
                    yield bucket[:]
                    bucket.clear()

    def __iter__(self) -> Iterator[list]:
        batches = self._batches()
        for _ in range(self.start_iter):  # index arithmetic only: no image is loaded
            next(batches)
        yield from batches


class EvalBatchSampler(torch.utils.data.Sampler):
    """Evaluation batches of one rank: strided shard (no padding, no image twice), grouped by padded shape.

    A batch only holds images whose own padded canvas (`padded_shapes`) is the same, so every image is
    evaluated on exactly the canvas it would get alone: the head's GroupNorm and C-FF's global pooling
    both see the padding, and a bigger canvas would change the detections (the released code evaluates
    one image at a time). Groups keep the order of their first image; on COCO a few shapes cover most
    images, so batches stay full.
    """

    def __init__(self, padded_shapes: np.ndarray, batch_size: int, rank: int, world_size: int):
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad eval sampler arguments: batch_size={batch_size} rank={rank}/{world_size}")
        mine = np.arange(rank, len(padded_shapes), world_size)  # this rank's indices
        if not len(mine):  # more processes than images
            self.batches = []
            return
        _, first, group = np.unique(padded_shapes[mine], axis=0, return_index=True, return_inverse=True)
        group = np.argsort(np.argsort(first))[group.ravel()]  # groups renumbered by first appearance
        order = mine[np.argsort(group, kind="stable")]  # indices grouped, shard order inside a group
        sizes = np.bincount(group, minlength=len(first))  # images per group
        self.batches = [chunk.tolist() for g in np.split(order, np.cumsum(sizes)[:-1])
                        for chunk in np.split(g, range(batch_size, len(g), batch_size))]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: loader workers ignore SIGINT / SIGTERM.

    Ctrl-C, `kill -TERM -PGID` and schedulers (scancel) signal every process of the job. The main process
    then finishes its iteration, saves a checkpoint and shuts the workers down; a worker that died of the
    signal first would make it fail with "DataLoader worker exited unexpectedly" instead, losing the run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader(dataset, workers: int, size_divisible: int, collate_fn=collate, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        collate_fn=partial(collate_fn, size_divisible=size_divisible), worker_init_fn=_ignore_stop_signals, **kwargs)


def _collate_readable(samples, size_divisible: int = 128):
    """`collate` of the samples that are not None (unreadable images of an ImageFolder); None if none is left."""
    samples = [s for s in samples if s is not None]
    return collate(samples, size_divisible) if samples else None


def build_train_loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, workers: int,
                       size_divisible: int = 128, start_iter: int = 0) -> torch.utils.data.DataLoader:
    """Infinite training loader: iterate it with next(); batch_size is per process."""
    sampler = TrainBatchSampler(dataset.aspect_ratios(), batch_size, rank, world_size, seed, True, start_iter)
    return _loader(dataset, workers, size_divisible, batch_sampler=sampler)


def build_eval_loader(dataset, batch_size: int, rank: int, world_size: int, workers: int,
                      size_divisible: int = 128) -> torch.utils.data.DataLoader:
    """Evaluation loader over this rank's share of the images (strided, no duplicates), in batches of images
    with the same padded shape (EvalBatchSampler). A batch whose images were all unreadable is None."""
    sampler = EvalBatchSampler(dataset.padded_shapes(size_divisible), batch_size, rank, world_size)
    return _loader(dataset, workers, size_divisible, _collate_readable, batch_sampler=sampler)
