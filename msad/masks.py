"""MEInst's mask code (Zhang et al., CVPR 2020, "Mask Encoding for Single Shot Instance Segmentation"), the
mask output that instance segmentation adds to FCOS (one of the instance-level tasks of the paper's Sec. 1).

Each object's mask, cropped to its box and resized to M x M (M = 28), is a vector of M^2 values; a PCA basis
fitted on the training set's masks (class-agnostic, D = 60 components) turns it into a compact code that
the head regresses at every positive location. As the released MEInst (AdelaiDet, `MaskEncoding.py` and
`LME/mask_generation.py`) with its default options `WHITEN` and `SIGMOID`:

  encode(m) = ((logit(soft(m)) - mean) @ components^T) / sqrt(variances)        m: N x M^2 in {0, 1}
  decode(y) = sigmoid((y * sqrt(variances)) @ components + mean)                 -> N x M^2 in (0, 1)

soft(m) moves a binary mask off 0 and 1 by a random r in [0.01, 0.05] per element (1 -> 1 - r, 0 -> r),
so that its logit is finite. The basis is the exact PCA of the soft-logit masks (the eigenvectors of their
covariance, accumulated in float64), where the release uses scikit-learn's IncrementalPCA (an approximation
of the same). Decoded masks are binarised at 0.5.

    python -m msad.masks fit --ann data/synthetic/annotations/instances_train2017.json --out runs/codes.pt
    python -m msad.masks iou --codes runs/codes.pt --ann data/synthetic/annotations/instances_val2017.json
"""
import argparse
import json
import sys

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch import nn
from torchvision.ops import roi_align

from .checkpoint import load_refusal, save_atomic
from .coco import (DatasetError, annotations, parse_categories, parse_images, read_json, segmentations,
                   top_level_list)

MASK_SIZE = 28  # M: masks are cropped to their box and resized to M x M
DIM_MASK = 60  # D: PCA components kept
NOISE_MAX, NOISE_MIN = 0.05, 0.01  # the released soft-target noise: r = max(0.05 * U(0, 1), 0.01)


# ----------------------------------------------------------------------------------------------------
# masks in their boxes
# ----------------------------------------------------------------------------------------------------
def _polygon_crop(polygons: list, box: np.ndarray, size: int) -> np.ndarray:
    """size x size uint8 mask of COCO polygons (lists of x, y in image pixels) inside box (x0, y0, x1, y1): the
    polygons are moved to the box's frame and scaled to size, then rasterised (as detectron2's PolygonMasks
    crop_and_resize, which the released MEInst uses)."""
    x0, y0, x1, y1 = box
    sx, sy = size / max(x1 - x0, 0.1), size / max(y1 - y0, 0.1)
    moved = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # K x 2 (x, y)
        moved.append((((p - (x0, y0)) * (sx, sy))).ravel().tolist())
    rles = mask_util.frPyObjects(moved, size, size)
    return mask_util.decode(mask_util.merge(rles)).astype(np.uint8)


def _rle_crops(rles: list, boxes: np.ndarray, size: int) -> np.ndarray:
    """n x size x size uint8 masks of full-image RLEs inside their boxes: bilinear ROIAlign (aligned, as
    detectron2's BitMasks crop_and_resize) of the decoded bitmaps, then >= 0.5."""
    full = torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1)[:, None].float()  # n x 1 x H x W
    index = torch.arange(len(rles), dtype=torch.float32)[:, None]  # n x 1: the bitmap of each box
    rois = torch.cat([index, torch.as_tensor(boxes, dtype=torch.float32)], 1)  # n x 5
    crops = roi_align(full, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)  # n x 1 x s x s
    return (crops[:, 0] >= 0.5).to(torch.uint8).numpy()


def box_masks(segmentations: list, boxes: np.ndarray, height: int, width: int, size: int = MASK_SIZE) -> np.ndarray:
    """N x size x size uint8: each instance's mask inside its box (x0, y0, x1, y1, image pixels). A segmentation
    is COCO's: a list of polygons, an uncompressed RLE ({"counts": [...], "size": [h, w]}) or a compressed one
    (counts a string). Resizing the image moves the box with the mask, so these crops need computing once per
    annotation; a horizontal flip flips them (flip_box_masks)."""
    out = np.zeros((len(segmentations), size, size), dtype=np.uint8)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rle_index, rles = [], []
    for i, seg in enumerate(segmentations):
        if isinstance(seg, list):
            out[i] = _polygon_crop(seg, boxes[i], size)
        else:
            rle_index.append(i)
            rles.append(mask_util.frPyObjects(seg, height, width) if isinstance(seg.get("counts"), list) else seg)
    if rles:
        out[rle_index] = _rle_crops(rles, boxes[rle_index], size)
    return out


def flip_box_masks(masks: np.ndarray) -> np.ndarray:
    """The box crops of a horizontally flipped image: each crop mirrored (its box is mirrored with it)."""
    return masks[..., ::-1].copy()


# ----------------------------------------------------------------------------------------------------
# the PCA code
# ----------------------------------------------------------------------------------------------------
def soft_logits(masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The released inverse sigmoid of a binary mask (N x M^2): 1 -> logit(1 - r), 0 -> logit(r), with r
    drawn per element in [0.01, 0.05] (fresh at every call, as the release does for every training step)."""
    r = (torch.rand(masks.shape, generator=generator, device=masks.device) * NOISE_MAX).clamp(min=NOISE_MIN)
    soft = torch.where(masks > 0.5, 1 - r, r)
    return torch.log(soft / (1 - soft))


class MaskCode(nn.Module):
    """The fitted PCA basis as buffers, so it travels in every checkpoint that has a mask branch.

    components: D x M^2 (orthonormal rows), variances: D (explained variance of each), mean: M^2.
    encode: N x M x M binary masks -> N x D codes (whitened); decode: N x D -> N x M x M probabilities.
    """

    def __init__(self, components: torch.Tensor, variances: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("components", components.float())
        self.register_buffer("variances", variances.float())
        self.register_buffer("mean", mean.float())

    @classmethod
    def from_state(cls, state: dict, prefix: str = "") -> "MaskCode":
        """The basis held in a state dict: its own (`state_dict()`), or a model's under prefix "mask_code."."""
        return cls(*(state[prefix + k] for k in ("components", "variances", "mean")))

    @classmethod
    def empty(cls, dim: int = DIM_MASK, size: int = MASK_SIZE) -> "MaskCode":
        """A basis of the right shapes, all zeros: the place in a model that a fitted or loaded one is copied into."""
        return cls(torch.zeros(dim, size * size), torch.zeros(dim), torch.zeros(size * size))

    @property
    def size(self) -> int:
        return int(round(self.mean.numel() ** 0.5))

    def encode(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = soft_logits(masks.flatten(1).float(), generator)  # N x M^2
        return (x - self.mean) @ self.components.T / self.variances.sqrt()  # N x D

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = (codes * self.variances.sqrt()) @ self.components + self.mean  # N x M^2
        return torch.sigmoid(x).view(-1, self.size, self.size)


def fit(masks: torch.Tensor, dim: int = DIM_MASK, generator: torch.Generator | None = None,
        batch: int = 65536) -> MaskCode:
    """The exact PCA of the soft logits of N x M x M binary masks (class-agnostic): mean and covariance summed in
    float64 batch by batch (memory M^2 x M^2, whatever N), then its top `dim` eigenvectors."""
    n = masks.shape[0]
    if n <= dim:
        raise ValueError(f"fitting {dim} mask components needs more than {dim} masks; got {n}")
    k = masks[0].numel()
    total, outer = torch.zeros(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    for start in range(0, n, batch):  # batches of masks, not a loop over masks
        x = soft_logits(masks[start:start + batch].flatten(1).float(), generator).double()  # b x M^2
        total += x.sum(0)
        outer += x.T @ x
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = values.argsort(descending=True)[:dim]
    return MaskCode(vectors[:, order].T, values[order].clamp(min=1e-12), mean)


def reconstruction_iou(code: MaskCode, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per mask, the IoU of decode(encode(mask)) >= 0.5 with the mask (N x M x M binary): the ceiling the code
    puts on mask quality at M x M. Two empty masks count as IoU 1."""
    rec = code.decode(code.encode(masks, generator)) >= 0.5
    m = masks > 0.5
    inter, union = (rec & m).flatten(1).sum(1), (rec | m).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------
# from an annotation file
# ----------------------------------------------------------------------------------------------------
def annotation_masks(ann_file: str, size: int = MASK_SIZE) -> torch.Tensor:
    """N x size x size uint8: the box crops of every object a training run keeps from a COCO json (crowd and
    degenerate boxes left out, boxes clipped to the image: coco.parse_images, as CocoDetection reads it)."""
    data = read_json(ann_file)
    cat_ids, _ = parse_categories(top_level_list(data, "categories", ann_file), ann_file)
    parsed = parse_images(top_level_list(data, "images", ann_file), annotations(data, ann_file, True), cat_ids,
                          ".", ann_file, train=True)
    segs = segmentations(data, parsed["ann_index"], ann_file)
    out = [box_masks(segs[a:b], parsed["boxes"][a:b], h, w, size)  # one call per image, not per object
           for a, b, (h, w) in zip(parsed["start"], parsed["end"], parsed["sizes"].tolist())]
    return torch.from_numpy(np.concatenate(out))


def save(code: MaskCode, path: str, source: str) -> None:
    """The basis and the json it was fitted on, written atomically."""
    save_atomic({"mask_code": code.state_dict(), "source": source}, path)


def load(path: str) -> MaskCode:
    """The basis saved by `save`; a file that is not one is a one-line ValueError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except Exception as e:  # UnpicklingError, a torn zip, ...
        raise ValueError(f"{path}: {load_refusal(path, e)}") from None
    if not isinstance(state, dict) or "mask_code" not in state:
        raise ValueError(f"{path}: not a mask code file of python -m msad.masks fit")
    return MaskCode.from_state(state["mask_code"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m msad.masks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit the PCA basis on a training json's masks")
    f.add_argument("--ann", "--train-ann", dest="ann", required=True, help="the training json")
    f.add_argument("--out", required=True)
    f.add_argument("--dim", type=int, default=DIM_MASK)
    f.add_argument("--seed", type=int, default=0, help="of the soft-target noise")
    q = sub.add_parser("iou", help="mean reconstruction IoU of a basis on a json's masks")
    q.add_argument("--codes", required=True)
    q.add_argument("--ann", required=True)
    q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    try:
        masks = annotation_masks(args.ann)
        if args.command == "fit":
            code = fit(masks, args.dim, gen)
            save(code, args.out, args.ann)
            result = {"out": args.out, "masks": len(masks), "dim": args.dim}
        else:
            iou = reconstruction_iou(load(args.codes), masks, gen)
            result = {"masks": len(masks), "mean_iou": round(iou.mean().item(), 4)}
    except (DatasetError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
