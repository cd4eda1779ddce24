"""Inference as a user meets it (issue: evaluation independent of the batch, detection on a folder of images,
pictures): a tiny student trained here for a few steps on demo images, so that it detects something."""
import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import evaluate
from msad.data import CocoDetection, collate
from msad.decode import Detector
from msad.fcos_loss import FCOSLoss
from msad.samplers import build_eval_loader
from msad.models import ModelConfig, build_model
from msad.synthetic import ensure_synthetic
from msad.vis import MIN_SHORT_SIDE

TEST_SIZE, MAX_SIZE = 128, 160


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Six demo val images (landscape and portrait), a tiny student fitted to them, and its checkpoint."""
    tmp = tmp_path_factory.mktemp("inference")
    root = ensure_synthetic(str(tmp / "synthetic"), num_train=2, num_val=6)
    val = (f"{root}/annotations/instances_val2017.json", f"{root}/val2017")
    ds = CocoDetection(*val, train=False, sizes=(TEST_SIZE,), max_size=MAX_SIZE)
    cfg = ModelConfig(backbone="resnet18", width=0.25, norm="gn", freeze_at=0, fpn_channels=32, head_convs=2,
                      num_classes=ds.num_classes)
    torch.manual_seed(0)
    model = build_model("student", cfg)
    batch = collate([ds[i] for i in range(len(ds))])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(20):
        loss = sum(FCOSLoss()(model(batch.images), batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    args = {**cfg.to_dict(), "preset": "demo", "test_size": TEST_SIZE, "max_size": MAX_SIZE,
            "cat_ids": ds.cat_ids, "class_names": ds.class_names}  # as train_student.py saves them
    ckpt = tmp / "student.pth"
    torch.save({"kind": "student", "model": model.state_dict(), "args": args, "iteration": 20}, ckpt)
    return {"tmp": tmp, "val": val, "dataset": ds, "model": Detector(model, "lr"), "checkpoint": ckpt}


def detections_by_image(model, loader):
    with torch.no_grad():
        return {i: d for batch in loader for i, d in zip(batch.image_ids, model(batch))}


def max_difference(a, b, box_scale):
    """Largest score / box difference (boxes in units of box_scale) over the best pairing of two detection sets."""
    if len(a["scores"]) != len(b["scores"]):
        return float("inf")
    d = torch.maximum((a["scores"][:, None] - b["scores"][None]).abs(),  # n x n
                      (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1) / box_scale)
    d[a["labels"][:, None] != b["labels"][None]] = float("inf")
    return max(d.min(1).values.max().item(), d.min(0).values.max().item())


def test_an_images_detections_do_not_depend_on_its_batch(trained):
    ds, model = trained["dataset"], trained["model"]
    shapes = {tuple(s) for s in ds.padded_shapes(128).tolist()}
    assert len(shapes) == 2  # landscape and portrait canvases: a batch of all six would mix them
    alone = detections_by_image(model, build_eval_loader(ds, 1, 0, 1, workers=0))
    batched = detections_by_image(model, build_eval_loader(ds, len(ds), 0, 1, workers=0))
    assert sorted(alone) == sorted(batched) == ds.image_ids
    for index, image_id in enumerate(ds.image_ids):
        assert len(alone[image_id]["scores"]) > 0
        box_scale = max(ds[index][1]["orig_size"])  # boxes to 1e-4 of the image size (float32 noise)
        assert max_difference(alone[image_id], batched[image_id], box_scale) < 1e-4, image_id


def run_evaluate(*argv):
    return evaluate.main([*map(str, argv), "--device", "cpu", "--workers", "0"])


def test_images_folder_gives_detections_with_names_and_skips_unreadable_files(trained, tmp_path, caplog):
    ds = trained["dataset"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in (0, 1, 2):
        shutil.copy(ds.image_path(index), folder / f"photo{index}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")  # fails when its header is read
    data = (folder / "photo0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[:len(data) // 2])  # header fine, fails at decode
    (folder / "notes.txt").write_text("not a picture: ignored")
    os.mkfifo(folder / "fifo.jpg")  # not a regular file: listed, never opened (it would block)
    thresh = 0.2
    metrics = run_evaluate("--checkpoint", trained["checkpoint"], "--images", folder, "--score-thresh", thresh,
                           "--output-dir", tmp_path / "out", "--eval-batch-size", 1, "--vis", tmp_path / "vis")
    assert metrics["skipped"] == ["broken.jpg", "fifo.jpg", "truncated.png"] and metrics["images"] == 3
    for name in ("broken.jpg", "fifo.jpg", "truncated.png"):  # each reported by name, once
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    entries = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [e["file_name"] for e in entries] == ["photo0.png", "photo1.png", "photo2.png"]
    assert len(metrics["vis"]) == 3 and all(p.endswith(".png") for p in metrics["vis"])

    # the same images through COCO evaluation: the same detections, in original pixels and category ids
    run_evaluate("--checkpoint", trained["checkpoint"], "--val-ann", trained["val"][0], "--val-images",
                 trained["val"][1], "--output-dir", tmp_path / "coco", "--eval-batch-size", 1)
    results = json.loads((tmp_path / "coco" / "detections.json").read_text())
    names = dict(zip(ds.cat_ids, ds.class_names))
    assert sum(len(e["scores"]) for e in entries) > 0
    for index, entry in enumerate(entries):
        expected = [r for r in results if r["image_id"] == ds.image_ids[index] and r["score"] >= thresh]
        assert entry["scores"] == [r["score"] for r in expected]
        assert entry["category_ids"] == [r["category_id"] for r in expected]
        assert entry["category_names"] == [names[r["category_id"]] for r in expected]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in expected)]
        assert torch.allclose(torch.tensor(entry["boxes"]).reshape(-1, 4), torch.tensor(xyxy).reshape(-1, 4),
                              atol=0.02)


def test_a_phone_photo_with_exif_orientation_is_detected_upright(trained, tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate to display) is processed as it is displayed:
    the same detections as its upright pixels saved plainly, boxes in the upright image's pixels."""
    folder = tmp_path / "phone"
    folder.mkdir()
    with Image.open(trained["dataset"].image_path(0)) as im:
        upright = im.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "a_phone.jpg", exif=exif, quality=95)  # portrait raw
    with Image.open(folder / "a_phone.jpg") as im:
        ImageOps.exif_transpose(im).save(folder / "b_upright.png")  # the pixels a viewer shows, without EXIF
    metrics = run_evaluate("--checkpoint", trained["checkpoint"], "--images", folder, "--output-dir", tmp_path / "out",
                           "--vis", tmp_path / "vis", "--vis-thresh", 0.05)
    assert metrics["skipped"] == [] and metrics["images"] == 2
    phone, plain = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert phone["scores"] and phone["boxes"] == plain["boxes"] and phone["scores"] == plain["scores"]
    boxes = torch.tensor(phone["boxes"])
    assert (boxes[:, 2] <= upright.width).all() and (boxes[:, 3] <= upright.height).all()
    assert upright.width != upright.height
    with Image.open(tmp_path / "vis" / "a_phone.jpg.png") as picture:  # drawn upright too (and upscaled)
        assert picture.width == round(upright.width * max(1.0, MIN_SHORT_SIDE / min(upright.size)))


def test_evaluation_on_a_full_disk_keeps_the_previous_outputs_whole(trained, tmp_path, monkeypatch):
    from msad import checkpoint
    flags = ["--checkpoint", trained["checkpoint"], "--val-ann", trained["val"][0], "--val-images", trained["val"][1],
             "--output-dir", tmp_path / "out"]
    run_evaluate(*flags)
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("detections.json", "metrics.json")}

    def full(path, mode="r", *args, **kwargs):  # the disk fills up while detections.json is written
        f = open(path, mode, *args, **kwargs)
        if "detections.json" in str(path) and "w" in mode:
            f.write(b"[{\"image_id\": 1")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(checkpoint, "open", full, raising=False)
    with pytest.raises(checkpoint.DiskFullError, match="detections.json; the previous detections.json is kept"):
        run_evaluate(*flags, "--score-thresh", 0.5)
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "detections.json", "metrics.json"]  # no temp file


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. NumPy's "non-writable array" warning
def test_vis_pictures_are_upscaled_with_a_legend_band(trained, tmp_path):
    ds = trained["dataset"]
    metrics = run_evaluate("--checkpoint", trained["checkpoint"], "--val-ann", trained["val"][0], "--val-images",
                           trained["val"][1], "--output-dir", tmp_path / "out", "--vis", tmp_path / "vis",
                           "--vis-count", 2, "--vis-thresh", 0.1)
    assert [p.split("/")[-1] for p in metrics["vis"]] == [f"{i}.png" for i in ds.image_ids[:2]]
    for path, (H0, W0) in zip(metrics["vis"], ds._sizes[:2].tolist()):
        with Image.open(path) as im:
            w, h = im.size
            pixels = torch.tensor(np.array(im.convert("RGB"))).reshape(-1, 3)
        scale = MIN_SHORT_SIDE / min(H0, W0)  # the demo images are smaller than 512 px
        assert w == round(W0 * scale) and min(w, h) >= MIN_SHORT_SIDE and h > round(H0 * scale)  # + legend
        for colour in ((255, 140, 0), (0, 200, 255)):  # detections and ground truth are drawn
            assert (pixels == torch.tensor(colour)).all(1).any(), colour
