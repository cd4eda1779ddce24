"""FCOS inference: location grid, decoding, class-wise NMS and the map back to original pixels.

Decoding follows the released code (FCOS Sec. 3, AdelaiDet's FCOS): per level keep sigmoid(cls) > 0.05, the
top 1000 by cls * ctr, score sqrt(cls * ctr); boxes from the (l, t, r, b) regression around each location;
class-wise NMS at IoU 0.6 over all levels in the resized image's pixels; the top 100; then rescale to the
original image. Everything is tensor code without host syncs or Python-side sizes, so the same function
runs eagerly and inside a `torch.export` program (msad/export.py).

Two options exist for converted torchvision weights (msad/convert.py); the defaults are the released code's:
  * `offset=False`: locations at (j*s, i*s), torchvision's, instead of (j*s + s//2, i*s + s//2);
  * `rule="torchvision"`: keep sqrt(cls * ctr) > threshold (0.2 there) and keep boxes that clipping leaves
    empty; the released rule thresholds sigmoid(cls) and drops them (locations in the padding).
"""
import torch
from torch import nn
from torchvision.ops import nms

RULES = ("released", "torchvision")


def level_slices(shapes):
    """Start/end of each level inside the flattened location axis."""
    bounds = [0]
    for h, w in shapes:
        bounds.append(bounds[-1] + h * w)
    return list(zip(bounds[:-1], bounds[1:]))


def class_nms(boxes, scores, labels, num_classes: int, iou: float):
    """Indices kept by NMS within each class, sorted by decreasing score (ties: the earlier index first).

    One exact float32 NMS per class (torchvision's batched_nms adds a coordinate offset per class instead,
    which costs O(n^2) over all classes for n boxes and rounds the coordinates). The loop over the classes
    is static, so this exports; for 5000 boxes of 80 classes it takes ~7 ms on 2 CPU threads.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)  # n_c
        keep[idx[nms(boxes[idx], scores[idx], iou)]] = True
    kept = keep.nonzero().squeeze(1)
    return kept[scores[kept].argsort(descending=True, stable=True)]


@torch.no_grad()
def decode_image(cls, box, ctr, points, strides, shapes, image_size, score_thresh=0.05, pre_nms_top_n=1000,
                 nms_thresh=0.6, max_dets=100, rule="released", locations=False):
    """Detections of one image in its input pixels (the resized image, top-left in its padded canvas).

    cls [L, K] and ctr [L] logits, box [L, 4] (l, t, r, b) in stride units, as FCOSHead returns them for one
    image; image_size: (h, w) of the image inside the canvas, a tensor [2] (an input of an exported program).
    Returns boxes [n, 4] (x0, y0, x1, y1) clipped to the image, scores [n], labels [n] (contiguous), n <= max_dets,
    and with `locations` also the index [n] of each detection's location (where its mask code is read).
    """
    K = cls.shape[1]
    prob = torch.sigmoid(cls.float())
    joint = prob * torch.sigmoid(ctr.float())[:, None]  # L x K
    passed = prob > score_thresh if rule == "released" else joint.sqrt() > score_thresh
    locs, labels, scores = [], [], []
    for start, end in level_slices(shapes):
        j = torch.where(passed[start:end], joint[start:end], -1.0).flatten()  # n*K
        top, idx = j.topk(torch.sym_min(pre_nms_top_n, j.shape[0]))  # k, sorted
        keep = top > 0
        idx = idx[keep]
        locs.append(idx // K + start)
        labels.append(idx % K)
        scores.append(top[keep].sqrt())
    loc, labels, scores = torch.cat(locs), torch.cat(labels), torch.cat(scores)  # n
    ltrb = box[loc].float() * strides[loc, None]  # n x 4, input pixels
    boxes = torch.cat([points[loc] - ltrb[:, :2], points[loc] + ltrb[:, 2:]], dim=1)
    size = image_size.to(boxes.device, boxes.dtype).flip(0).repeat(2)  # (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), size)
    if rule == "released":  # locations in the padding leave zero-width boxes (detectron2's `nonempty`)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels, loc = boxes[nonempty], scores[nonempty], labels[nonempty], loc[nonempty]
    keep = class_nms(boxes, scores, labels, K, nms_thresh)[:max_dets]
    return (boxes[keep], scores[keep], labels[keep]) + ((loc[keep],) if locations else ())


def decode(head, geometry, image_sizes, orig_sizes, mask_code=None, **kwargs):
    """decode_image for each image of a batch, then boxes rescaled from resized to original pixels.

    head: fcos_head.HeadOutputs of the batch; geometry: align.Geometry of its locations; image_sizes,
    orig_sizes: per image (h, w) after resizing and of the file. Returns one dict per image with boxes [n, 4]
    (x0, y0, x1, y1, original pixels), scores [n], labels [n] (contiguous) and, for a head with a mask output and
    its masks.MaskCode `mask_code`, masks [n, M, M]: each detection's mask probabilities inside its box
    (meinst.paste_masks puts them in the image).
    """
    results = []
    for b, ((h, w), (h0, w0)) in enumerate(zip(image_sizes, orig_sizes)):
        boxes, scores, labels, *masks = decode_head(head.image(b), geometry, torch.tensor([h, w]), mask_code, **kwargs)
        results.append({"boxes": rescale(boxes, (h, w), (h0, w0)), "scores": scores, "labels": labels}
                       | ({"masks": masks[0]} if masks else {}))
    return results


def decode_head(head, geometry, image_size, mask_code=None, **kwargs):
    """decode_image on one image's HeadOutputs (L x K, L x 4, L) and the pyramid's Geometry: boxes, scores, labels,
    and with a mask output and its `mask_code` the masks [n, M, M] decoded from the code at each detection."""
    with_masks = mask_code is not None and head.mask_codes is not None
    out = decode_image(head.cls_logits, head.box_regression, head.centerness, geometry.points, geometry.strides,
                       geometry.shapes, image_size, locations=with_masks, **kwargs)
    if not with_masks:
        return out
    boxes, scores, labels, loc = out
    return boxes, scores, labels, mask_code.decode(head.mask_codes[loc].float())  # n x M x M


def decode_options(cfg) -> dict:
    """The decoding settings of a models.ModelConfig (the released code's, or a converted model's)."""
    return dict(score_thresh=cfg.score_thresh, pre_nms_top_n=cfg.pre_nms_top_n, nms_thresh=cfg.nms_thresh,
                max_dets=cfg.max_dets, rule=cfg.decode_rule)


class Detector(nn.Module):
    """A model and its postprocessor: ImageBatch -> detections of `branch` per image, in original pixels.

    This is what evaluation, pictures and the FLOP count run (exported programs offer the same interface). A model
    with a mask branch also gives each detection's mask in its box (`decode`).
    The model runs only the pyramids that `branch` needs; decoding is `decode` above.
    """

    def __init__(self, model: nn.Module, branch: str):
        super().__init__()
        self.model, self.branch, self.options = model, branch, decode_options(model.cfg)
        self.masks = hasattr(model, "mask_code")  # a mask branch: each detection also has its mask

    def forward(self, batch):
        out = self.model(batch.images, (self.branch,))[self.branch]
        return decode(out.head, out.geometry, batch.image_sizes, batch.orig_sizes, getattr(self.model, "mask_code", None),
                      **self.options)


def rescale(boxes, size, orig_size):
    """Boxes from the resized image's pixels (size h, w) to the original's (h0, w0)."""
    (h, w), (h0, w0) = size, orig_size
    return boxes * boxes.new_tensor([w0 / w, h0 / h, w0 / w, h0 / h])
