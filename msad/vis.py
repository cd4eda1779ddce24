"""Pictures of detections (evaluate.py --vis): boxes with class name and score, the masks of a mask model as
translucent fills inside their boxes, and the ground truth if any.

Small images are upscaled so that the short side is at least `MIN_SHORT_SIDE` pixels (the demo's are about
300 px), only detections scoring at least `min_score` are drawn, and a legend band on top says which
colour is which. Drawing is plain Pillow, on a copy of the image.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util

from .checkpoint import write_atomic
from .data import decode_rgb

MIN_SHORT_SIDE = 512
DETECTION_COLOUR = (255, 140, 0)  # orange
GROUND_TRUTH_COLOUR = (0, 200, 255)  # cyan: apart from orange also for red-green colour blindness
MASK_ALPHA = 0.45  # a detected mask: the detection colour over the image at this opacity


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded scalable font (pillow >= 10.1 with FreeType)


def _label(draw, font, xy, text: str, colour, above: bool, limit) -> None:
    """Text on a filled box of `colour`, just above (detections) or just below (ground truth) the point xy,
    moved inside the picture of size `limit` (w, h) where it would leave it."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0 + 4, y1 - y0 + 4
    x, y = xy[0], xy[1] - h if above else xy[1]
    x, y = min(max(x, 0), limit[0] - w), min(max(y, 0), limit[1] - h)
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    draw.text((x + 2 - x0, y + 2 - y0), text, fill=(0, 0, 0), font=font)


def _tint(image: Image.Image, rles: list, size) -> Image.Image:
    """The image (already at picture `size`) with the union of the masks (COCO RLEs at the image's own size)
    filled in the detection colour at MASK_ALPHA."""
    union = np.zeros(rles[0]["size"], dtype=np.uint8)
    for rle in rles:
        union |= mask_util.decode(dict(rle, counts=rle["counts"].encode() if isinstance(rle["counts"], str)
                                       else rle["counts"]))
    alpha = Image.fromarray(union * round(255 * MASK_ALPHA)).resize(size, Image.Resampling.NEAREST)
    return Image.composite(Image.new("RGB", size, DETECTION_COLOUR), image, alpha)


def draw(image: Image.Image, boxes, names, scores, gt_boxes=None, gt_names=None, min_score: float = 0.3, masks=None):
    """A new RGB picture: `image` upscaled to a short side >= MIN_SHORT_SIDE, a legend band on top, the
    ground truth (if given) and the detections scoring >= min_score, with their `masks` (COCO RLEs, one per
    box) when given. Boxes are xyxy in the image's pixels."""
    scale = max(1.0, MIN_SHORT_SIDE / min(image.size))
    size = (round(image.size[0] * scale), round(image.size[1] * scale))
    font_size = max(12, round(min(size) / 36))
    font, line, legend_h = _font(font_size), max(2, round(min(size) / 256)), font_size + 10
    picture = Image.new("RGB", (size[0], size[1] + legend_h), (255, 255, 255))
    shown_masks = [m for m, s in zip(masks or [], scores) if s >= min_score]
    scaled = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    picture.paste(_tint(scaled, shown_masks, size) if shown_masks else scaled, (0, legend_h))
    pen = ImageDraw.Draw(picture)

    def frame(box):  # image pixels -> picture pixels
        return [box[0] * scale, box[1] * scale + legend_h, box[2] * scale, box[3] * scale + legend_h]

    x = 4
    for text, colour in ([(f"detections (score >= {min_score:g})", DETECTION_COLOUR)]
                         + ([("ground truth", GROUND_TRUTH_COLOUR)] if gt_boxes is not None else [])):
        pen.rectangle((x, 5, x + legend_h - 10, legend_h - 5), outline=colour, width=line)
        x += legend_h - 4
        pen.text((x, legend_h / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        x += pen.textlength(text, font=font) + 16
    gt = [(frame(b), n) for b, n in zip(gt_boxes if gt_boxes is not None else [], gt_names or [])]
    shown = sorted(((frame(b), n, s) for b, n, s in zip(boxes, names, scores) if s >= min_score), key=lambda d: d[2])
    for b, _, _ in shown:
        pen.rectangle(b, outline=DETECTION_COLOUR, width=line)
    for b, _ in gt:  # thinner and on top: a detection that fits its object well stays visible around it
        pen.rectangle(b, outline=GROUND_TRUTH_COLOUR, width=max(1, line // 2))
    for b, name in gt:
        _label(pen, font, (b[0], b[3]), str(name), GROUND_TRUTH_COLOUR, False, picture.size)
    for b, name, score in shown:  # the best drawn last, on top
        _label(pen, font, (b[0], b[1]), f"{name} {score:.2f}", DETECTION_COLOUR, True, picture.size)
    return picture


def coco_items(dataset, results: list, count: int) -> list:
    """save_pictures items of the first `count` images of a CocoDetection: COCO results and ground truth."""
    names = dict(zip(dataset.cat_ids, dataset.class_names))
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    items = []
    for index in range(min(count, len(dataset))):
        dets = by_image.get(dataset.image_ids[index], [])
        gt_boxes, gt_labels = dataset.ground_truth(index)
        items.append((dataset.image_path(index), f"{dataset.image_ids[index]}.png", {
            "boxes": [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)],
            "names": [names[d["category_id"]] for d in dets], "scores": [d["score"] for d in dets],
            "gt_boxes": gt_boxes.tolist(), "gt_names": [dataset.class_names[k] for k in gt_labels]}
            | ({"masks": [d["segmentation"] for d in dets]} if dets and "segmentation" in dets[0] else {})))
    return items


def folder_items(dataset, entries: list, count: int) -> list:
    """save_pictures items of the first `count` entries of evaluate.py --images (no ground truth).
    A picture is named after its file, with .png added unless it is one already (so names stay unique)."""
    return [(dataset.image_path(e["image_id"]), e["file_name"] + ("" if e["file_name"].lower().endswith(".png")
             else ".png"), {"boxes": e["boxes"], "names": e["category_names"], "scores": e["scores"],
                            **({"masks": e["masks"]} if "masks" in e else {})})
            for e in entries[:count]]


def save_pictures(items, out_dir: str, min_score: float = 0.3) -> list:
    """items: (image path, PNG file name, dict of `draw`'s box arguments); returns the paths written.

    Each picture shows the image the detector got (data.decode_rgb: upright as the boxes are, a 16-bit image
    scaled to 8 bits) and is written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path, name, boxes in items:
        picture = draw(decode_rgb(path), min_score=min_score, **boxes)
        out = os.path.join(out_dir, name)
        write_atomic(out, lambda f: picture.save(f, format="PNG", optimize=True))
        written.append(out)
    return written
