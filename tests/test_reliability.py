"""The fourth reliability round as a user meets it: evaluation with the checkpoint's categories (or a one-line
refusal), val images checked at start, one evaluate.py per output folder, Ctrl-C leaves consistent outputs and
exits 130, concurrent and interrupted atomic writes, and pictures of 16-bit images."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from msad import checkpoint, cli, evaluation, vis
from msad.data import CocoDetection, DatasetError, check_images_exist, decode_rgb
from msad.evaluation import check_categories
from msad.models import ModelConfig, build_model
from msad.synthetic import ensure_synthetic
from scripts_common import ROOT

TEST_SIZE, MAX_SIZE = 128, 160
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    """Four demo val images (8 shape categories, ids 1-8) and a tiny untrained student that detects plenty
    (its class prior raised), saved with the demo's categories."""
    tmp = tmp_path_factory.mktemp("reliability")
    root = ensure_synthetic(str(tmp / "synthetic"), num_train=2, num_val=4)
    ann, images = f"{root}/annotations/instances_val2017.json", f"{root}/val2017"
    ds = CocoDetection(ann, images, train=False, sizes=(TEST_SIZE,), max_size=MAX_SIZE)
    return {"tmp": tmp, "ann": ann, "images": images, "dataset": ds, "data": json.loads(Path(ann).read_text()),
            "checkpoint": save_student(tmp / "student.pth", ds.cat_ids, ds.class_names)}


def save_student(path, cat_ids, names):
    cfg = ModelConfig(backbone="resnet18", width=0.25, norm="gn", freeze_at=0, fpn_channels=32, head_convs=1,
                      num_classes=len(cat_ids))
    torch.manual_seed(0)
    model = build_model("student", cfg)
    state = model.state_dict()
    state["head.cls_logits.weight"] = torch.randn(state["head.cls_logits.weight"].shape)  # classes vary by place
    state["head.cls_logits.bias"] = torch.zeros(len(cat_ids))
    args = {**cfg.to_dict(), "preset": "demo", "test_size": TEST_SIZE, "max_size": MAX_SIZE,
            "cat_ids": list(cat_ids), "class_names": list(names)}  # as train_student.py saves them
    torch.save({"kind": "student", "model": state, "args": args, "iteration": 1}, path)
    return path


def run_evaluate(demo, out, ann=None, checkpoint=None, extra=()):
    return evaluate.main(["--checkpoint", str(checkpoint or demo["checkpoint"]), "--val-ann", str(ann or demo["ann"]),
                          "--val-images", demo["images"], "--output-dir", str(out), "--workers", "0",
                          "--device", "cpu", *extra])


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------- categories
def test_evaluation_maps_labels_through_the_checkpoints_categories(demo, tmp_path):
    """A val json holding 4 of the model's 8 categories is a legitimate evaluation: each detection keeps the
    category the model gave it (the full val's detections of those 4), the other 4 are left out."""
    run_evaluate(demo, tmp_path / "all")
    ids = demo["dataset"].cat_ids
    kept = ids[::2]
    data = dict(demo["data"], categories=[c for c in demo["data"]["categories"] if c["id"] in kept],
                annotations=[a for a in demo["data"]["annotations"] if a["category_id"] in kept])
    metrics = run_evaluate(demo, tmp_path / "subset", ann=write_json(tmp_path / "four.json", data))
    full = json.loads((tmp_path / "all" / "detections.json").read_text())
    subset = json.loads((tmp_path / "subset" / "detections.json").read_text())
    assert {d["category_id"] for d in full} == set(ids)
    assert subset == [d for d in full if d["category_id"] in kept] and metrics["AP"] is not None


@pytest.mark.parametrize("model,words", [
    ("ids 5, 17, 99", "7 of its 8 categories are not among the 3 of --checkpoint"),  # the demo's ids 1, 2, 4, 5, ...
    ("4 of the 8", "4 of its 8 categories are not among the 4 of --checkpoint"),
    ("converted COCO", "category 1 is 'disc', but 'person' in --checkpoint"),  # the demo's ids are COCO ids too
])
def test_a_checkpoint_of_other_categories_is_refused_before_inference(demo, tmp_path, model, words):
    from msad.convert import COCO_IDS, COCO_NAMES
    ids, names = {"ids 5, 17, 99": ([5, 17, 99], ["a", "b", "c"]), "converted COCO": (COCO_IDS, COCO_NAMES),
                  "4 of the 8": (demo["dataset"].cat_ids[:4], demo["dataset"].class_names[:4])}[model]
    ckpt = save_student(tmp_path / "other.pth", ids, names)
    with pytest.raises(ValueError, match=words) as e:
        run_evaluate(demo, tmp_path / "out", checkpoint=ckpt)
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "detections.json").exists()


def test_the_category_rule_for_training_and_evaluation(demo):
    """check_categories(model categories, val set, source): the val json's categories must be among the
    model's, same ids, same names up to case; the model may know more."""
    ds, ids, names = demo["dataset"], demo["dataset"].cat_ids, demo["dataset"].class_names
    assert check_categories((ids, names), ds, "the training set") == []
    assert check_categories((ids + [42], names + ["kite"]), ds, "the training set") == [42]
    assert check_categories((ids, [n.upper() for n in names]), ds, "the training set") == []
    with pytest.raises(ValueError, match=f"among the 7 of the training set .*first: {ids[-1]}"):
        check_categories((ids[:-1], names[:-1]), ds, "the training set")
    with pytest.raises(ValueError, match=f"category {ids[0]} is {names[0]!r}, but 'dog' in the training set"):
        check_categories((ids, ["dog"] + names[1:]), ds, "the training set")


# ----------------------------------------------------------------------------------------------- val images
def test_a_missing_val_image_is_found_before_any_work(demo, tmp_path):
    data = json.loads(json.dumps(demo["data"]))
    data["images"][1]["file_name"] = "gone.png"
    data["images"][3]["file_name"] = "also_gone.png"
    ann = write_json(tmp_path / "val.json", data)
    ds = CocoDetection(ann, demo["images"], train=False, sizes=(TEST_SIZE,), max_size=MAX_SIZE)
    with pytest.raises(DatasetError, match=rf"2 of its 4 images are not in .*first: .*gone\.png"):
        check_images_exist(ds)
    check_images_exist(demo["dataset"])
    with pytest.raises(DatasetError, match="2 of its 4 images"):
        run_evaluate(demo, tmp_path / "out", ann=ann)
    assert not (tmp_path / "out" / "detections.json").exists()


# ----------------------------------------------------------------------------------------------- outputs
def test_a_second_evaluation_into_a_busy_output_dir_is_refused(demo, tmp_path):
    out = tmp_path / "eval"
    holder = subprocess.Popen([sys.executable, "-c", f"from msad import outdir; outdir.lock_output_dir({str(out)!r}); "
                               "print('locked', flush=True); input()"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"--output-dir {out} is in use by another run \(pid {holder.pid}"):
            run_evaluate(demo, out)
        assert not (out / "detections.json").exists()
    finally:
        holder.communicate("\n")
    run_evaluate(demo, out)  # the lock went with its process
    assert (out / "metrics.json").exists()


def test_ctrl_c_during_cocoeval_never_leaves_new_detections_beside_old_metrics(demo, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    run_evaluate(demo, out, extra=["--max-images", "2"])
    old = (out / "detections.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "coco_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(demo, out)
    assert (out / "detections.json").read_text() != old  # the new detections, with no metrics beside them
    assert not (out / "metrics.json").exists()


def test_ctrl_c_is_one_line_and_exit_status_130(capsys, monkeypatch):
    monkeypatch.delenv("MSAD_DEBUG", raising=False)

    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run_script(main)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted by SIGINT (Ctrl-C); no file was left "
                                                           "half-written"]


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_two_writers_of_one_file_each_write_their_own_temp_file(tmp_path):
    """A second writer starting while the first is half-way (two evaluate.py --vis, an export beside a
    conversion) neither tears the first's file nor makes it fail: the last rename wins, whole."""
    path = tmp_path / "detections.json"

    def first(f):
        f.write(b"first, half")
        checkpoint.write_atomic(path, lambda g: g.write(b"second"))
        f.write(b" and the rest")

    checkpoint.write_atomic(path, first)
    assert path.read_bytes() == b"first, half and the rest" and hidden(tmp_path) == []


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def interrupted(f):
        f.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic(path, interrupted)
    assert path.read_text() == "old" and hidden(tmp_path) == []


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = checkpoint._temp_name(tmp_path / "student.pt2").name.split(".")
    stale[-3] = dead.stdout.strip()  # .student.pt2.HOST.PID.RANDOM.tmp of a process that is gone
    (tmp_path / ".".join(stale)).write_bytes(b"half a program")
    live = checkpoint._temp_name(tmp_path / "student.pt2")  # this process's: alive, kept
    live.write_bytes(b"being written")
    checkpoint.write_atomic(tmp_path / "student.pt2", lambda f: f.write(b"program"))
    assert hidden(tmp_path) == [live.name]


# ----------------------------------------------------------------------------------------------- pictures
def test_a_16_bit_image_is_drawn_as_the_detector_sees_it(tmp_path):
    grey = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 10).astype(np.uint16)  # 0..61430
    Image.fromarray(grey).save(tmp_path / "depth.png")  # mode I;16
    [written] = vis.save_pictures([(tmp_path / "depth.png", "depth.png", {"boxes": [], "names": [], "scores": []})],
                                  str(tmp_path / "vis"))
    picture = np.asarray(Image.open(written).convert("L"), dtype=np.float64)
    band = picture.shape[0] - vis.MIN_SHORT_SIDE  # the legend band on top of the image, upscaled 8x
    drawn = np.asarray(Image.fromarray(picture[band:].astype(np.uint8)).resize((96, 64), Image.Resampling.BOX))
    seen = np.asarray(decode_rgb(tmp_path / "depth.png").convert("L"), dtype=np.float64)
    assert seen.std() > 50 and np.abs(drawn - seen).mean() < 3  # not a white picture: the image itself
