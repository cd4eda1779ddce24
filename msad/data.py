"""COCO-format detection data: the dataset, decoding and resizing images, batching.

Any COCO-format json with an image folder works (COCO 2017, the built-in synthetic set, your own data).
The flow is: json -> `CocoDetection` (checked once, boxes kept as arrays) -> `__getitem__` (decode with
Pillow, flip, resize the short side) -> `collate` (pad to a multiple of 128, MSAD Sec. 3.1) -> `ImageBatch`
-> `normalize` on the GPU. Images stay uint8 until `normalize`, which keeps worker->GPU traffic 4x smaller.

The json is checked and parsed by msad/coco.py; batches are sampled by msad/samplers.py.
"""
import logging
import math
import os
import random
import stat
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import coco
from .coco import DatasetError
from .imagenet import IMAGENET_MEAN
from .masks import box_masks, flip_box_masks

log = logging.getLogger(__name__)

# Batches are padded in uint8 with the mean colour, so that after normalize() the padding is ~0, as when
# detectron2 pads the normalised tensor with 0.
PAD_VALUE = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the camera orientation
MAX_CONSECUTIVE_BAD_IMAGES = 10  # more than this in a row means a wrong image folder, not a few bad files


class _BadImage(Exception):
    """An image file that cannot be used (missing, corrupt, truncated, wrong size)."""


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


def check_images_exist(dataset) -> None:
    """Every image of `dataset` (a CocoDetection) is a file, checked at start rather than when it is read (a
    missing val image would otherwise end a training run after its last iteration); one DatasetError naming the
    first missing file and the count. Only os.path.isfile per image: COCO val's 5000 take milliseconds."""
    paths = [dataset.image_path(i) for i in range(len(dataset))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{dataset.ann_file}: {len(missing)} of its {len(paths)} images are not in "
                           f"{dataset.image_dir} (first: {missing[0]}); is the image folder right?")


def decode_rgb(file) -> Image.Image:
    """The 8-bit RGB image the detector gets from an image file (path or open binary file), fully decoded:
    upright (EXIF orientation applied, as detectron2 does), 16-bit scaled to 8 bits, palette transparency
    through RGBA. evaluate.py --vis draws on it too. Raises what Pillow raises (OSError, ValueError, ...)."""
    with Image.open(file) as im:
        if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
            im = ImageOps.exif_transpose(im)  # upright: the image (and size) the annotator saw
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # the documented route for palette images with transparency
        return _to_8bit(im).convert("RGB")  # forces the full decode: truncated files fail here


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
    With `masks=True` (a model with a mask branch) each target also has "masks": N x 28 x 28 uint8, every
    kept object's mask inside its box (msad.masks.box_masks), flipped with the image; a resize moves the box
    with the mask, so no full-image bitmap is made. Without it, segmentations are not even kept.
    """

    _segmentations = None  # per kept box, with masks=True (ImageFolder has none)

    def __init__(self, ann_file, image_dir, train: bool, sizes: Sequence[int], max_size: int,
                 flip_prob: float = 0.5, masks: bool = False):
        self.ann_file, self.image_dir = str(ann_file), str(image_dir)
        self.train, self.sizes, self.max_size = train, [int(s) for s in sizes], int(max_size)
        self.flip_prob = flip_prob if train else 0.0
        if not self.sizes:
            raise ValueError("sizes must name at least one short-side size")
        if train and not os.path.isdir(self.image_dir):  # eval may only need the json (scoring a results file)
            raise DatasetError(f"{self.image_dir}: image folder not found")
        data = coco.read_json(self.ann_file)
        self.cat_ids, self.class_names = coco.parse_categories(coco.top_level_list(data, "categories", self.ann_file),
                                                               self.ann_file)
        self.num_classes = len(self.cat_ids)
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        parsed = coco.parse_images(coco.top_level_list(data, "images", self.ann_file),
                                   coco.annotations(data, self.ann_file, train), self.cat_ids, self.image_dir,
                                   self.ann_file, train)
        self._boxes, self._labels = parsed["boxes"], parsed["labels"]  # M x 4 (xyxy, original pixels), M
        self._start, self._end = parsed["start"], parsed["end"]  # n, n: slices into M
        self.image_ids: list[int] = parsed["image_ids"]
        self._file_names: list[str] = parsed["file_names"]
        self._sizes = parsed["sizes"]  # n x 2, (H0, W0)
        self.coco = None if train else coco.coco_index(data)
        self._segmentations = coco.segmentations(data, parsed["ann_index"], self.ann_file) if masks else None
        self.num_skipped_images = 0

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
            with _open_inside(self.image_path(index), self.image_dir) as f:
                rgb = decode_rgb(f)
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
        if self._segmentations is not None:
            target["masks"] = self._box_masks(index, flip)  # N x 28 x 28
        return image.contiguous(), target

    def _box_masks(self, index: int, flip: bool) -> torch.Tensor:
        """The image's kept objects' masks inside their (unflipped, original-pixel) boxes, N x M x M uint8."""
        H0, W0 = self._sizes[index].tolist()
        crops = box_masks(self._segmentations[self._start[index]:self._end[index]],
                          self._boxes[self._start[index]:self._end[index]], H0, W0)
        return torch.from_numpy(flip_box_masks(crops) if flip else crops)


class ImageFolder(CocoDetection):
    """The .jpg/.jpeg/.png files directly inside a folder, for detection without annotations (evaluate.py
    --images): evaluation mode of CocoDetection, sorted by file name, image_id = position in that order.

    Sizes come from the file headers (nothing is decoded here), upright (EXIF orientation applied, as the
    decode applies it). A name that is not a regular file, or whose header cannot be read, or whose full
    decode fails later, is logged by name and skipped: `skipped` lists the former, and `__getitem__` returns
    None for the latter (the eval loader leaves it out of its batch).
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png")

    def __init__(self, folder, size: int, max_size: int):
        self.ann_file = self.image_dir = str(folder)  # errors name the folder
        self.train, self.sizes, self.max_size, self.flip_prob = False, [int(size)], int(max_size), 0.0
        if not os.path.isdir(self.image_dir):
            raise DatasetError(f"{self.image_dir}: image folder not found")
        names = sorted(n for n in os.listdir(self.image_dir) if n.lower().endswith(self.EXTENSIONS))
        self.skipped, readable, sizes = [], [], []
        for name in names:
            try:
                sizes.append(self._upright_size(name))
                readable.append(name)
            except _BadImage as e:  # a folder, FIFO or device named *.jpg, a broken link, an unreadable header
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

    def _upright_size(self, name: str) -> tuple[int, int]:
        """(h, w) of the image as it is decoded: from the header, swapped when the EXIF orientation turns it by
        90 degrees (a phone photo taken upright), as _read_image's exif_transpose will. Only regular files."""
        try:
            with _open_inside(os.path.join(self.image_dir, name), self.image_dir) as f, Image.open(f) as im:
                w, h = im.size
                turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # transpose / rotate 90 / 270
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # _BadImage passes through
            raise _BadImage(str(e)) from None
        return (w, h) if turned else (h, w)

    def file_name(self, index: int) -> str:
        return self._file_names[index]

    def __getitem__(self, key):
        try:
            return super().__getitem__(key)
        except DatasetError as e:  # the eval-mode error of an image that does not decode
            log.warning("skipping unreadable image %s", e)
            return None


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
