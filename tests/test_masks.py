"""msad.masks, MEInst's mask code: box crops of COCO segmentations, the PCA basis, its round trip; the demo
data's masks."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from msad import masks
from msad.coco import DatasetError
from msad.synthetic import ensure_synthetic

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=12, num_val=4, seed=0)
# sha256 of the demo generator's images and of its (image, category, box, area) records before the masks were
# added: the masks must leave the detection data exactly as it was
IMAGES_SHA = "d777089cb48519eb4ec014dda2ec6d15fd7cf3010798dd367963285b8c83e864"
BOXES_SHA = {"train": "f53b49e4d927debc63e5a43bf7228f7638c0b9d7ef95fc4213f2172ad75942bf",
             "val": "d225d61dbf56f784ea498488d247f3edcb115a5664a1fd992215b25f854ff18a"}
# mean reconstruction IoU of the 60-component basis on held-out demo masks: 0.940 fitted on this module's 12
# images (91 masks, 31 held out), 0.976 on the full demo set (7498 train masks, 1494 val: python -m msad.masks)
DEMO_IOU = 0.93


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return Path(ensure_synthetic(tmp_path_factory.mktemp("masks") / "synthetic", workers=1, **SMALL))


def ann(root, split="train") -> str:
    return str(root / "annotations" / f"instances_{split}2017.json")


def test_demo_masks_leave_images_and_boxes_byte_identical(demo):
    h = hashlib.sha256()
    for p in sorted(demo.rglob("*.png")):
        h.update(p.read_bytes())
    assert h.hexdigest() == IMAGES_SHA
    for split, sha in BOXES_SHA.items():
        anns = json.loads(Path(ann(demo, split)).read_text())["annotations"]
        records = [(a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in anns]
        assert hashlib.sha256(json.dumps(records).encode()).hexdigest() == sha


def test_demo_segmentation_is_the_visible_pixels_in_the_tight_box(demo):
    data = json.loads(Path(ann(demo)).read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in data["images"]}
    rings = 0
    for a in data["annotations"]:
        m = mask_util.decode(a["segmentation"])  # H x W
        assert m.shape == sizes[a["image_id"]] and m.sum() == a["area"]
        rows, cols = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x, y, x + w, y + h)
        if a["category_id"] == 2 and w > 20:  # a ring's centre is a hole
            assert m[int(y + h / 2), int(x + w / 2)] == 0
            rings += 1
    assert rings >= 1


def square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_box_crops_of_polygons_and_both_rle_forms_agree():
    h, w = 60, 80
    full = np.zeros((h, w), dtype=np.uint8)
    full[10:40, 20:50] = 1  # a 30 x 30 square ...
    full[20:30, 30:40] = 0  # ... with a hole
    box = np.array([[20.0, 10.0, 50.0, 40.0]])
    rle = mask_util.encode(np.asfortranarray(full))
    compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
    uncompressed = {"size": [h, w], "counts": _uncompressed_counts(full)}
    a = masks.box_masks([compressed], box, h, w, size=15)
    b = masks.box_masks([uncompressed], box, h, w, size=15)
    assert a.shape == (1, 15, 15) and (a == b).all()
    expected = full[10:40, 20:50].reshape(15, 2, 15, 2).max(axis=(1, 3))  # the crop at half resolution
    assert (a[0] != expected).sum() <= 8  # borders of the hole may round either way
    poly = masks.box_masks([square_polygon(20, 10, 50, 40)], box, h, w, size=15)
    assert poly.all()  # a polygon filling its box fills the crop
    triangle = masks.box_masks([[[20, 10, 50, 40, 20, 40]]], box, h, w, size=28)
    assert abs(triangle.mean() - 0.5) < 0.05


def _uncompressed_counts(m: np.ndarray) -> list:
    flat = m.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return ([0] if flat[0] else []) + runs


def test_flipped_image_gives_flipped_crops():
    h, w = 40, 64
    poly = [[10, 5, 30, 5, 10, 35]]  # a right triangle, its right angle at the left
    flipped = [[w - 10, 5, w - 30, 5, w - 10, 35]]
    a = masks.box_masks([poly], np.array([[10.0, 5, 30, 35]]), h, w)
    b = masks.box_masks([flipped], np.array([[w - 30.0, 5, w - 10, 35]]), h, w)
    assert (masks.flip_box_masks(a) == b).mean() > 0.98 and (a != b).any()


def test_soft_logits_are_the_released_inverse_sigmoid():
    gen = torch.Generator().manual_seed(0)
    m = (torch.rand(1000, 784, generator=gen) > 0.5).float()
    x = masks.soft_logits(m, gen)
    lo, hi = np.log(0.95 / 0.05), np.log(0.99 / 0.01)  # r in [0.01, 0.05]
    assert x[m > 0].min() >= lo - 1e-4 and x[m > 0].max() <= hi + 1e-4
    assert (-x[m == 0]).min() >= lo - 1e-4 and (-x[m == 0]).max() <= hi + 1e-4
    assert not torch.equal(x, masks.soft_logits(m, gen))  # fresh noise each call


def test_full_basis_is_exact_and_codes_are_whitened():
    gen = torch.Generator().manual_seed(1)
    m = (torch.rand(500, 6, 6, generator=gen) > 0.5).to(torch.uint8)
    code = masks.fit(m, dim=36, generator=gen)
    c = code.components
    assert torch.allclose(c @ c.T, torch.eye(36), atol=1e-4)  # orthonormal
    assert masks.reconstruction_iou(code, m, gen).min() == 1  # all components: decode(encode(m)) is m
    y = code.encode(m, gen)
    assert y.shape == (500, 36) and abs(y.std(0).mean().item() - 1) < 0.1  # whitened: unit variance per component
    assert (code.variances[:-1] >= code.variances[1:]).all()  # largest first


def test_demo_basis_reconstructs_held_out_masks(demo, tmp_path):
    gen = torch.Generator().manual_seed(0)
    train, val = masks.annotation_masks(ann(demo)), masks.annotation_masks(ann(demo, "val"))
    assert train.shape[1:] == (28, 28) and len(train) > masks.DIM_MASK
    code = masks.fit(train, generator=gen)
    iou = masks.reconstruction_iou(code, val, gen).mean().item()
    assert iou >= DEMO_IOU
    fewer = masks.fit(train, dim=4, generator=gen)
    assert masks.reconstruction_iou(fewer, val, gen).mean().item() < iou  # the basis size matters


def test_crowd_ignored_and_missing_segmentation_named(tmp_path):
    data = {"images": [{"id": 1, "width": 40, "height": 30, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10], "iscrowd": 0,
                             "segmentation": square_polygon(5, 5, 25, 15)},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1,
                             "segmentation": {"size": [30, 40], "counts": [0, 1200]}}],
            "categories": [{"id": 1, "name": "a"}]}
    f = tmp_path / "a.json"
    f.write_text(json.dumps(data))
    assert masks.annotation_masks(str(f)).shape == (1, 28, 28)  # the crowd region is not a mask to learn
    del data["annotations"][0]["segmentation"]
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"a\.json: annotations\[0\] has no 'segmentation'"):
        masks.annotation_masks(str(f))


def test_cli_fit_then_iou(demo, tmp_path):
    out = tmp_path / "codes.pt"
    run = lambda *a: subprocess.run([sys.executable, "-m", "msad.masks", *a], cwd=ROOT, capture_output=True, text=True)
    fit = run("fit", "--ann", ann(demo), "--out", str(out))
    assert fit.returncode == 0, fit.stderr
    assert json.loads(fit.stdout.splitlines()[-1])["dim"] == 60
    iou = run("iou", "--codes", str(out), "--ann", ann(demo, "val"))
    assert json.loads(iou.stdout.splitlines()[-1])["mean_iou"] >= DEMO_IOU
    bad = run("iou", "--codes", ann(demo), "--ann", ann(demo, "val"))
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "error:" in bad.stderr


def test_dataset_gives_box_masks_flipped_with_the_image_and_only_when_asked(demo):
    from msad.data import CocoDetection
    paths, kw = (ann(demo), str(demo / "train2017")), dict(train=True, sizes=[128], max_size=256)
    plain = CocoDetection(*paths, **kw, flip_prob=0.0)
    upright = CocoDetection(*paths, **kw, flip_prob=0.0, masks=True)
    flipped = CocoDetection(*paths, **kw, flip_prob=1.0, masks=True)
    assert "masks" not in plain[0][1]  # detection: no masks made
    target = upright[0][1]
    assert torch.equal(target["boxes"], plain[0][1]["boxes"])  # masks=True leaves the boxes as they are
    data = json.loads(Path(paths[0]).read_text())
    im = next(i for i in data["images"] if i["id"] == upright.image_ids[0])
    segs = [a["segmentation"] for a in data["annotations"] if a["image_id"] == im["id"]]  # json order, as kept
    expected = masks.box_masks(segs, upright.ground_truth(0)[0], im["height"], im["width"])  # N x 28 x 28
    assert target["masks"].dtype == torch.uint8 and (target["masks"].numpy() == expected).all()
    assert torch.equal(flipped[0][1]["masks"], target["masks"].flip(-1))


def test_mask_dataset_without_segmentation_is_one_line_naming_the_file(demo, tmp_path):
    from msad.data import CocoDetection
    data = json.loads(Path(ann(demo)).read_text())
    del data["annotations"][3]["segmentation"]
    f = tmp_path / "no_masks.json"
    f.write_text(json.dumps(data))
    CocoDetection(str(f), str(demo / "train2017"), train=True, sizes=[128], max_size=256)  # boxes alone: fine
    with pytest.raises(DatasetError, match=r"no_masks\.json: annotations\[3\] has no 'segmentation' \(1 of "):
        CocoDetection(str(f), str(demo / "train2017"), train=True, sizes=[128], max_size=256, masks=True)
