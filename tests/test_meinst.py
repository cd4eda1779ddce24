"""The MEInst mask branch (msad/meinst.py): one more head output and one more loss term, shared by the teacher's
branches and the student; mask targets, MEInst's MSE, pasting, COCOeval segm and deployment with masks."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from msad import export, masks, meinst
from msad.data import collate
from msad.decode import Detector
from msad.evaluation import check_results, coco_evaluate, load_results, to_coco_results
from msad.fcos_loss import FCOSLoss, fcos_losses, fcos_targets
from msad.models import ModelConfig, build_model, load_partial
from msad.teacher_loss import TeacherLoss

CFG = ModelConfig(backbone="resnet18", width=0.25, norm="gn", freeze_at=0, fpn_channels=32, head_convs=1,
                  num_classes=3)
MASK_CFG = replace(CFG, mask_head="meinst")
pytestmark = pytest.mark.usefixtures("one_thread")


def fitted_code(seed=0) -> masks.MaskCode:
    """A basis fitted on random blobs (rectangles and discs of random size and place)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    c = torch.rand(400, 2, 1, 1, generator=g) * 20 + 4
    r = torch.rand(400, 1, 1, generator=g) * 10 + 4
    discs = ((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2 < r ** 2)
    return masks.fit(discs.to(torch.uint8), generator=g)


def batch_with_masks(n_images=2, size=256):
    """Images with 1-3 boxes each and their box masks (a disc in each)."""
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(n_images):
        n = i + 1
        xy = torch.rand(n, 2, generator=g) * (size - 96)
        boxes = torch.cat([xy, xy + 32 + torch.rand(n, 2, generator=g) * 60], 1)
        yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        disc = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2 < 12 ** 2).to(torch.uint8)
        target = {"boxes": boxes, "labels": torch.arange(n) % 3, "masks": disc.repeat(n, 1, 1), "image_id": i,
                  "size": (size, size), "orig_size": (size, size)}
        samples.append((torch.randint(0, 256, (3, size, size), dtype=torch.uint8), target))
    return collate(samples)


def masked_model(kind: str, seed=0):
    torch.manual_seed(seed)
    model = build_model(kind, MASK_CFG)
    model.mask_code.load_state_dict(fitted_code().state_dict())
    return model


def detecting(kind: str = "student") -> Detector:
    """An untrained mask model whose scores pass the threshold (many boxes), and its mask codes spread."""
    model = masked_model(kind).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(0.0)
        model.head.cls_logits.weight.normal_(std=0.5)
        model.head.mask_pred.weight.normal_(std=0.2)
    return Detector(model, "lr")


# ---------------------------------------------------------------------------------------------------- the model
def test_a_detector_without_mask_head_is_unchanged():
    """No mask tensors in its weights, no mask output, the three FCOS terms: its checkpoints and losses as before."""
    for kind in ("fcos", "teacher", "student"):
        model = build_model(kind, CFG)
        assert not [k for k in model.state_dict() if "mask" in k]
        out = next(iter(model(batch_with_masks().images).values()))
        assert out.head.mask_codes is None
    losses = FCOSLoss()(build_model("fcos", CFG)(batch_with_masks().images), batch_with_masks())
    assert sorted(losses) == ["loss_box", "loss_cls", "loss_ctr"]


def test_the_mask_branch_is_one_conv_on_the_box_tower_shared_by_every_branch():
    model = masked_model("teacher")
    assert model.head.mask_pred.in_channels == 32 and model.head.mask_pred.out_channels == masks.DIM_MASK
    assert model.head.mask_pred.kernel_size == (3, 3)
    batch = batch_with_masks()
    out = model(batch.images)
    L = out["hr"].head.cls_logits.shape[1]
    for branch in ("hr", "lr", "fused"):
        assert out[branch].head.mask_codes.shape == (2, L, masks.DIM_MASK)
    losses = TeacherLoss(mask_code=model.mask_code)(out, batch)
    assert {"hr_loss_mask", "lr_loss_mask", "fused_loss_mask"} <= losses.keys()
    sum(losses.values()).backward()
    assert model.head.mask_pred.weight.grad.abs().sum() > 0


def test_hr_and_lr_mask_targets_are_identical_under_the_shift():
    """The teacher's HR and LR branches and the student have one location grid (Sec. 3.1): one set of mask targets."""
    batch, teacher, student = batch_with_masks(), masked_model("teacher"), masked_model("student")
    out, s = teacher(batch.images), student(batch.images)["lr"]
    targets = []
    for geometry in (out["hr"].geometry, out["lr"].geometry, s.geometry):
        torch.manual_seed(7)  # the same soft-target noise
        targets.append(fcos_targets(geometry, batch.targets, teacher.mask_code))
    for t in targets[1:]:
        assert torch.equal(t.pos, targets[0].pos) and torch.equal(t.mask_codes, targets[0].mask_codes)
    assert targets[0].pos.sum() > 0


def test_each_positive_location_regresses_its_objects_code():
    batch, model = batch_with_masks(), masked_model("student")
    out = model(batch.images)["lr"]
    t = fcos_targets(out.geometry, batch.targets, model.mask_code)
    b, loc = t.pos.nonzero()[0].tolist()
    same_object = t.pos[b] & (t.gt[b] == t.gt[b, loc])
    assert torch.equal(t.mask_codes[b][same_object], t.mask_codes[b, loc].expand(int(same_object.sum()), -1))
    decoded = model.mask_code.decode(t.mask_codes[b, loc][None])[0] >= 0.5
    disc = batch.targets[b]["masks"][t.gt[b, loc]].bool()
    assert (decoded & disc).sum() / (decoded | disc).sum() > 0.9


def test_mask_loss_is_meinsts_mse_weighted_by_centerness():
    pred, target = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    target[0, 0] = 1.0  # location 0: squared error 4 (sum over D = 4)
    target[0, 1] = 2.0  # location 1: 16, but not positive (centre-ness 0)
    ctr = torch.tensor([[0.5, 0.0, 1.0]])
    # sum_l ctr_l * sum_d err^2 / max(D * sum ctr, 1) = 0.5 * 4 / (4 * 1.5)
    assert meinst.mask_loss(pred, target, ctr, ctr.sum()).item() == pytest.approx(2 / 6)
    assert meinst.mask_loss(target, target, ctr, ctr.sum()).item() == 0
    assert meinst.mask_loss(pred, target, ctr * 0.01, ctr.sum() * 0.01).item() == pytest.approx(0.02, rel=1e-5)  # floor 1


def test_a_mask_head_without_mask_targets_is_an_error():
    batch, model = batch_with_masks(), masked_model("student")
    out = model(batch.images)["lr"]
    with pytest.raises(ValueError, match="no mask codes"):
        fcos_losses(out.head, fcos_targets(out.geometry, batch.targets))
    for t in batch.targets:
        del t["masks"]
    with pytest.raises(ValueError, match="masks=True"):
        fcos_targets(out.geometry, batch.targets, model.mask_code)


def test_the_student_takes_the_teachers_mask_branch_and_basis():
    teacher, student = masked_model("teacher", seed=1), build_model("student", MASK_CFG)
    load_partial(student, teacher.state_dict(), "teacher")
    assert torch.equal(student.mask_code.components, teacher.mask_code.components)
    assert torch.equal(student.head.mask_pred.weight, teacher.head.mask_pred.weight)
    box_only = build_model("student", CFG)  # a box-only student of a mask teacher: the mask branch is left out
    assert load_partial(box_only, teacher.state_dict(), "teacher")["loaded"]


# ---------------------------------------------------------------------------------------------------- decoding
def test_paste_puts_each_mask_in_its_box_at_the_image_size():
    full, left = torch.ones(28, 28), torch.zeros(28, 28)
    left[:, :14] = 1
    boxes = torch.tensor([[10.0, 20.0, 30.0, 30.0], [0.0, 0.0, 40.0, 8.0]])
    pasted = meinst.paste_masks(torch.stack([full, left]), boxes, (32, 48))
    assert pasted.shape == (2, 32, 48) and pasted.dtype == torch.bool
    expected = torch.zeros(2, 32, 48, dtype=torch.bool)
    expected[0, 20:30, 10:30] = True  # pixel centres inside the box
    expected[1, 0:8, 0:20] = True  # the left half of its box
    assert torch.equal(pasted, expected)
    assert meinst.paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 5)).shape == (0, 5, 5)


def test_detections_carry_their_masks_into_coco_results():
    detector = detecting()
    batch = batch_with_masks()
    with torch.no_grad():
        dets = detector(batch)
    assert detector.masks and dets[0]["masks"].shape == (len(dets[0]["boxes"]), 28, 28)
    results = to_coco_results(dets[:1], [0], [(256, 300)], [1, 2, 3])
    assert results and all(r["segmentation"]["size"] == [256, 300] for r in results)
    rle = dict(results[0]["segmentation"], counts=results[0]["segmentation"]["counts"].encode())
    assert mask_util.decode(rle).shape == (256, 300)


def test_a_mask_program_gives_the_models_masks():
    detector = detecting()
    program = export.export(detector).module()
    image, size = torch.randint(0, 256, (3, 256, 384), dtype=torch.uint8), torch.tensor([256, 384])
    eager = export.Deployable(detector)(image, size)
    exported = program(image, size)
    assert len(eager) == len(exported) == 4 and eager[3].shape[1:] == (28, 28) and len(eager[3]) > 0
    assert torch.equal(eager[2], exported[2])
    torch.testing.assert_close(exported[3], eager[3], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- COCOeval segm
def coco_with_masks(tmp_path, crowd=False):
    """One 40 x 60 image with two objects (and with `crowd` a crowd region), as RLE."""
    h, w = 40, 60
    objects = [np.zeros((h, w), np.uint8) for _ in range(3 if crowd else 2)]
    objects[0][5:20, 5:25] = 1
    objects[1][22:38, 30:55] = 1
    if crowd:
        objects[2][2:12, 40:58] = 1
    anns = []
    for i, m in enumerate(objects):
        rle = mask_util.encode(np.asfortranarray(m))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": int(i == 2),
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                     "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1, "width": w, "height": h, "file_name": "a.png"}],
                                "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    with open(path):
        return COCO(str(path)), objects


def results_of(objects, shift=0, score=0.9):
    out = []
    for m in objects:
        rle = mask_util.encode(np.asfortranarray(np.roll(m, shift, axis=1)))
        out.append({"image_id": 1, "category_id": 1, "score": score, "segmentation":
                    {"size": list(m.shape), "counts": rle["counts"].decode()}})
    return out


def test_perfect_masks_score_segm_ap_100_and_shifted_ones_less(tmp_path):
    gt, objects = coco_with_masks(tmp_path)
    perfect = coco_evaluate(gt, results_of(objects), verbose=False, iou_type="segm")
    assert perfect["mask_AP"] == 100.0
    shifted = coco_evaluate(gt, results_of(objects, shift=4), verbose=False, iou_type="segm")
    assert 0 < shifted["mask_AP"] < perfect["mask_AP"]


def test_crowd_masks_are_ignored_as_cocoeval_does(tmp_path):
    """A detection on a crowd region is neither a hit nor a false positive; the same detection elsewhere is one."""
    gt, objects = coco_with_masks(tmp_path, crowd=True)
    on_crowd = results_of(objects[:2]) + results_of(objects[2:], score=0.95)
    assert coco_evaluate(gt, on_crowd, verbose=False, iou_type="segm")["mask_AP"] == 100.0
    elsewhere = np.zeros_like(objects[2])
    elsewhere[25:35, 2:15] = 1
    assert coco_evaluate(gt, results_of(objects[:2]) + results_of([elsewhere], score=0.95), verbose=False,
                         iou_type="segm")["mask_AP"] < 100.0


def test_a_results_file_with_bad_segmentations_is_one_line(tmp_path):
    gt, objects = coco_with_masks(tmp_path)

    class Gt:  # what check_results reads of a CocoDetection
        image_ids, cat_ids, ann_file, coco = [1], [1], str(tmp_path / "gt.json"), gt

    good = results_of(objects)
    path = tmp_path / "dets.json"
    cases = {"must be an RLE": [dict(good[0], segmentation={"counts": "x"})],
             r"size \[10, 10\] is not its image's \[40, 60\]": [dict(good[0], segmentation={"size": [10, 10], "counts": "x"})],
             "polygons of at least 3 points": [dict(good[0], segmentation=[[1, 2, 3]])]}
    for message, results in cases.items():
        path.write_text(json.dumps(results))
        with pytest.raises(ValueError, match=message):
            check_results(load_results(str(path)), str(path), Gt)
    path.write_text(json.dumps([good[0], {**good[1], "bbox": [1, 2, 3, 4]}]))
    with pytest.raises(ValueError, match="the same fields"):
        load_results(str(path))


def test_an_onnx_mask_program_gives_the_models_masks(tmp_path):
    pytest.importorskip("onnxruntime")
    from msad import onnx_export
    detector = detecting()
    path = tmp_path / "masks.onnx"
    onnx_export.save_onnx(onnx_export.to_onnx(export.export(detector), masks=True), path,
                          {"kind": "student", "branch": "lr", "args": {"mask_head": "meinst"}}, ([1, 2, 3], list("abc")))
    ours = onnx_export.OnnxDetector(str(path))
    image, size = torch.randint(0, 256, (3, 256, 384), dtype=torch.uint8), torch.tensor([256, 384])
    eager, onnx = export.Deployable(detector)(image, size), ours.run(image, size)
    assert ours.masks and len(onnx) == 4 and len(onnx[0]) == len(eager[0]) > 0
    order = [int(((onnx[0] - b).abs().amax(1) + (onnx[1] - s).abs()).argmin()) for b, s in zip(eager[0], eager[1])]
    torch.testing.assert_close(onnx[3][order], eager[3], atol=1e-4, rtol=1e-3)  # each detection's mask
