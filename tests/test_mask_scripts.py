"""The mask demo as a user runs it: train_teacher.py --mask-head meinst, train_student.py and evaluate.py print
mask_AP beside the box AP, on one process and under torchrun; the basis travels in the checkpoints; resume."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from msad import vis
from msad.synthetic import ensure_synthetic
from scripts_common import TINY, data_flags, last_json, read_jsonl, run

MASK_KEYS = ("mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl")
BOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny synthetic set with masks, a 3-iteration mask teacher and its student."""
    tmp = tmp_path_factory.mktemp("mask_demo")
    data = ensure_synthetic(str(tmp / "synthetic"), num_train=12, num_val=4)
    teacher = last_json(run("train_teacher.py", *TINY, *data_flags(data), "--mask-head", "meinst", "--iters", 3,
                            "--output-dir", tmp / "teacher"))
    student = last_json(run("train_student.py", *TINY, *data_flags(data), "--iters", 3, "--kd-warmup", 2,
                            "--teacher", tmp / "teacher" / "model_final.pth", "--output-dir", tmp / "student"))
    # 3 iterations leave every score under the 0.05 threshold: the same student with its classification bias at 0
    # (sigmoid 0.5) detects up to 100 objects per image, so evaluation has masks to paste, write and score
    ckpt = torch.load(tmp / "student" / "model_final.pth", weights_only=True)
    ckpt["model"]["head.cls_logits.bias"].zero_()
    torch.save(ckpt, tmp / "detecting.pth")
    return {"tmp": tmp, "data": data, "teacher": teacher, "student": student}


def weights(path):
    return torch.load(path, weights_only=True)


def test_teacher_and_student_print_mask_ap_beside_the_box_ap(demo):
    for metrics in (demo["teacher"], demo["student"]):
        assert all(k in metrics for k in BOX_KEYS + MASK_KEYS)
        assert 0 <= metrics["mask_AP"] <= 100
    log = read_jsonl(demo["tmp"] / "teacher" / "log.jsonl")
    assert {"hr_loss_mask", "lr_loss_mask", "fused_loss_mask"} <= log[-1].keys()
    assert "loss_mask" in read_jsonl(demo["tmp"] / "student" / "log.jsonl")[-1]


def test_the_basis_is_fitted_once_and_travels_in_every_checkpoint(demo):
    teacher, student = (weights(demo["tmp"] / n / "model_final.pth") for n in ("teacher", "student"))
    assert student["args"]["mask_head"] == "meinst"  # the student takes its teacher's mask branch
    for key in ("mask_code.components", "mask_code.variances", "mask_code.mean"):
        assert torch.equal(student["model"][key], teacher["model"][key])
    components = teacher["model"]["mask_code.components"]
    assert components.shape == (60, 28 * 28)
    torch.testing.assert_close(components @ components.T, torch.eye(60), atol=1e-4, rtol=0)  # a fitted basis


def test_evaluate_scores_segm_and_a_written_results_file_scores_the_same(demo):
    tmp, data = demo["tmp"], demo["data"]
    flags = ["--val-ann", f"{data}/annotations/instances_val2017.json", "--val-images", f"{data}/val2017",
             "--workers", 0, "--device", "cpu", "--test-size", 128, "--max-size", 160]
    evaluated = last_json(run("evaluate.py", "--checkpoint", tmp / "detecting.pth", *flags,
                              "--output-dir", tmp / "eval", "--vis", tmp / "vis", "--vis-count", 1))
    assert all(k in evaluated for k in MASK_KEYS)
    detections = json.loads((tmp / "eval" / "detections.json").read_text())
    images = json.loads(open(f"{data}/annotations/instances_val2017.json").read())["images"]
    sizes = {i["id"]: [i["height"], i["width"]] for i in images}
    assert detections and all(d["segmentation"]["size"] == sizes[d["image_id"]] for d in detections)  # original px
    again = last_json(run("evaluate.py", "--detections", tmp / "eval" / "detections.json", *flags[:2],
                          "--output-dir", tmp / "eval_file"))
    assert {k: again[k] for k in BOX_KEYS + MASK_KEYS} == {k: evaluated[k] for k in BOX_KEYS + MASK_KEYS}
    assert json.loads((tmp / "eval" / "metrics.json").read_text())["mask_AP"] == evaluated["mask_AP"]


def test_images_writes_one_rle_mask_per_box_and_vis_draws_them(demo):
    tmp, data = demo["tmp"], demo["data"]
    args = ["--checkpoint", tmp / "detecting.pth", "--images", f"{data}/val2017", "--workers", 0,
            "--device", "cpu", "--test-size", 128, "--max-size", 160, "--vis-count", 1, "--vis-thresh", 0]
    last_json(run("evaluate.py", *args, "--output-dir", tmp / "folder", "--vis", tmp / "folder_vis"))
    entries = json.loads((tmp / "folder" / "detections.json").read_text())
    assert entries and all(len(e["masks"]) == len(e["boxes"]) for e in entries)
    with Image.open(f"{data}/val2017/{entries[0]['file_name']}") as im:
        assert entries[0]["masks"][0]["size"] == [im.height, im.width]
    assert len(list((tmp / "folder_vis").iterdir())) == 1
    # the picture with masks against the same detections drawn as boxes alone: the masks' pixels turn orange
    e = entries[0]
    image = Image.open(f"{data}/val2017/{e['file_name']}").convert("RGB")
    args = dict(boxes=e["boxes"], names=e["category_names"], scores=e["scores"], min_score=0)
    with_masks, boxes_only = (np.asarray(vis.draw(image, **args, **extra), dtype=float)
                              for extra in ({"masks": e["masks"]}, {}))
    changed = np.abs(with_masks - boxes_only).sum(-1) > 0
    union = np.zeros(e["masks"][0]["size"], dtype=bool)
    for rle in e["masks"]:
        union |= mask_util.decode(dict(rle, counts=rle["counts"].encode())).astype(bool)
    size = (with_masks.shape[1], round(image.height * with_masks.shape[1] / image.width))  # upscaled, under a legend
    inside = np.asarray(Image.fromarray(union).resize(size, Image.Resampling.NEAREST))
    legend = with_masks.shape[0] - size[1]
    assert changed[:legend].sum() == 0 and (changed[legend:] & ~inside).sum() == 0  # only the masks' pixels change
    assert inside.sum() > 0 and changed.sum() > 0.3 * inside.sum()  # most of them (box outlines and labels on top)
    towards = np.abs(with_masks[changed] - vis.DETECTION_COLOUR).sum(-1) < np.abs(boxes_only[changed] - vis.DETECTION_COLOUR).sum(-1)
    assert towards.mean() > 0.95


def test_a_mask_teacher_trains_under_torchrun_with_the_basis_of_one_process(demo):
    tmp, data = demo["tmp"], demo["data"]
    metrics = last_json(run("train_teacher.py", *TINY, *data_flags(data), "--mask-head", "meinst", "--iters", 2,
                            "--output-dir", tmp / "teacher_ddp", nproc=2, timeout=300))
    assert all(k in metrics for k in MASK_KEYS)
    two, one = weights(tmp / "teacher_ddp" / "model_final.pth"), weights(tmp / "teacher" / "model_final.pth")
    assert torch.equal(two["model"]["mask_code.components"], one["model"]["mask_code.components"])  # rank 0's fit
    assert "hr_loss_mask" in read_jsonl(tmp / "teacher_ddp" / "log.jsonl")[-1]


def test_resume_continues_a_mask_run_with_its_own_basis(demo, tmp_path):
    data = demo["data"]
    common = [*TINY, *data_flags(data), "--mask-head", "meinst", "--no-eval", "--output-dir", tmp_path / "run"]
    last_json(run("train_teacher.py", *common, "--iters", 2, "--steps", "3,4"))
    first = weights(tmp_path / "run" / "checkpoint.pth")
    other = tmp_path / "other.pt"  # another basis given at resume: the run keeps the one it was trained with
    torch.save({"mask_code": {k[len("mask_code."):]: torch.randn_like(v) for k, v in first["model"].items()
                              if k.startswith("mask_code.")}, "source": "test"}, other)
    resumed = last_json(run("train_teacher.py", *common, "--iters", 4, "--steps", "3,4", "--resume",
                            "--mask-codes", other))
    assert resumed["start_iteration"] == 2 and resumed["iterations"] == 4
    final = weights(tmp_path / "run" / "model_final.pth")
    assert torch.equal(final["model"]["mask_code.components"], first["model"]["mask_code.components"])
    assert [r["iter"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")] == [1, 2, 3, 4]


def test_a_json_without_segmentation_is_one_line_naming_it(demo, tmp_path):
    data = demo["data"]
    ann = json.loads(open(f"{data}/annotations/instances_train2017.json").read())
    for a in ann["annotations"]:
        a.pop("segmentation", None)
    path = tmp_path / "boxes_only.json"
    path.write_text(json.dumps(ann))
    flags = data_flags(data)
    flags[1] = path
    proc = run("train_teacher.py", *TINY, *flags, "--mask-head", "meinst", "--iters", 1, "--output-dir", tmp_path / "t")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and str(path) in proc.stderr and "segmentation" in proc.stderr
