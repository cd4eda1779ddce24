"""Deployment (python -m msad.export): a torch.export program of a checkpoint gives the checkpoint's detections,
through evaluate.py too; bad input to the exporter is one line."""
import json
from dataclasses import replace

import pytest
import torch
import torchvision

import evaluate
from msad import export
from msad.data import PAD_VALUE, collate
from msad.decode import Detector
from msad.models import ModelConfig, build_model, default_branch
from msad.synthetic import ensure_synthetic
from scripts_common import run

CFG = ModelConfig(backbone="resnet18", width=0.25, norm="gn", freeze_at=0, fpn_channels=32, head_convs=1,
                  num_classes=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def detecting(kind: str, cfg: ModelConfig = CFG, seed: int = 0, branch: str | None = None) -> Detector:
    """An untrained model whose classification bias makes ~half its scores pass the threshold (many boxes), as
    the Detector of `branch` (the kind's default)."""
    torch.manual_seed(seed)
    model = build_model(kind, cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(0.0)
        model.head.cls_logits.weight.normal_(std=0.5)
        model.head.box_pred.weight.normal_(std=0.2)
    return Detector(model, branch or default_branch(kind, cfg))


@pytest.fixture(scope="module")
def student_program():
    model = detecting("student")
    return model, export.export(model).module()


def same_detections(ours, theirs, atol=1e-4):
    """Equal count, labels and scores in the same order, boxes within atol."""
    (b1, s1, l1), (b2, s2, l2) = ours, theirs
    assert len(s1) == len(s2) > 0
    assert torch.equal(l1, l2)
    assert torch.allclose(s1, s2, atol=atol) and torch.allclose(b1, b2, atol=atol)


@pytest.mark.parametrize("canvas,size", [((256, 256), (256, 256)), ((256, 384), (230, 384)), ((384, 256), (384, 200))])
def test_program_gives_the_models_detections_on_three_canvases(student_program, canvas, size):
    model, program = student_program
    image = torch.randint(0, 256, (3, *canvas), dtype=torch.uint8)
    pad = torch.tensor(PAD_VALUE, dtype=torch.uint8)[:, None, None]
    image[:, size[0]:, :], image[:, :, size[1]:] = pad, pad  # padded as the data loader pads
    eager = export.Deployable(model)(image, torch.tensor(size))
    same_detections(eager, program(image, torch.tensor(size)))
    # and the model's own batched path (evaluate.py's), in the canvas' pixels
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 0,
              "orig_size": size, "size": size}
    batch = collate([(image[:, :size[0], :size[1]], target)])
    assert tuple(batch.images.shape[-2:]) == canvas
    with torch.no_grad():
        det = model(batch)[0]
    same_detections((det["boxes"], det["scores"], det["labels"]), eager)
    assert (eager[0][:, 2] <= size[1]).all() and (eager[0][:, 3] <= size[0]).all()  # clipped to the image


def test_program_keeps_zero_or_one_box_without_failing(student_program):
    """torchvision's fake NMS claims >= 2 kept boxes; export.py replaces it, so 0 and 1 detections work."""
    model, _ = student_program
    one = detecting("student", seed=1)
    with torch.no_grad():  # every box covers the whole image and one class passes: NMS keeps exactly one
        one.model.head.box_pred.weight.zero_()
        one.model.head.box_pred.bias.fill_(1e4)
        one.model.head.cls_logits.weight.zero_()
        one.model.head.cls_logits.bias.copy_(torch.tensor([5.0] + [-20.0] * 7))
    program = export.export(one).module()
    image, size = torch.randint(0, 256, (3, 256, 384), dtype=torch.uint8), torch.tensor([256, 384])
    boxes, scores, labels = program(image, size)
    assert labels.tolist() == [0] and boxes.tolist() == [[0.0, 0.0, 384.0, 256.0]]
    with torch.no_grad():
        one.model.head.cls_logits.bias.fill_(-20.0)  # nothing passes the threshold
    assert export.export(one).module()(image, size)[1].numel() == 0


def test_teacher_branches_export_with_their_own_resolution():
    image, size = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8), torch.tensor([256, 256])
    for branch in ("lr", "fused"):
        teacher = detecting("teacher", replace(CFG, cff_hidden=8), branch=branch)
        program = export.export(teacher).module()
        same_detections(export.Deployable(teacher)(image, size), program(image, size))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A demo-format student checkpoint (the `detecting` weights) and three val images."""
    tmp = tmp_path_factory.mktemp("export")
    root = ensure_synthetic(str(tmp / "synthetic"), num_train=2, num_val=3)
    with open(f"{root}/annotations/instances_val2017.json") as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    args = {**CFG.to_dict(), "preset": "demo", "test_size": 256, "max_size": 400, "cat_ids": [c["id"] for c in cats],
            "class_names": [c["name"] for c in cats]}
    path = tmp / "student.pth"
    torch.save({"kind": "student", "model": detecting("student").model.state_dict(), "args": args, "iteration": 1}, path)
    return {"tmp": tmp, "root": root, "path": path}


def test_evaluate_gives_the_same_results_for_the_program_as_for_its_checkpoint(checkpoint):
    tmp, root = checkpoint["tmp"], checkpoint["root"]
    program = tmp / "student.pt2"
    assert export.main(["--checkpoint", str(checkpoint["path"]), "--output", str(program)])["kind"] == "student"
    flags = ["--val-ann", f"{root}/annotations/instances_val2017.json", "--val-images", f"{root}/val2017",
             "--workers", "0", "--device", "cpu"]
    metrics = {}
    for name, path in (("pth", checkpoint["path"]), ("pt2", program)):
        metrics[name] = evaluate.main(["--checkpoint", str(path), "--output-dir", str(tmp / name), *flags])
        metrics[name].pop("checkpoint")
    assert metrics["pth"] == metrics["pt2"]  # AP, cost, kind, branch: every figure
    dets = {name: json.loads((tmp / name / "detections.json").read_text()) for name in ("pth", "pt2")}
    assert len(dets["pth"]) == len(dets["pt2"]) > 100
    for a, b in zip(dets["pth"], dets["pt2"]):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)  # rounded to 2 decimals in the file


def student_pt2(checkpoint):
    """The checkpoint fixture's .pt2 (exported by the evaluation test above, or here when run alone)."""
    program = checkpoint["tmp"] / "student.pt2"
    if not program.exists():
        export.main(["--checkpoint", str(checkpoint["path"]), "--output", str(program)])
    return program


def test_a_program_says_which_branch_it_holds(checkpoint):
    detector, ckpt = export.load_exported(str(student_pt2(checkpoint)))
    assert ckpt["kind"] == "student" and detector.branch == "lr"
    for branch in ("fused", "hr"):  # a student has no other branch to export: no --branch hint
        with pytest.raises(ValueError, match="holds the lr branch only") as error:
            detector.to_device("cpu", branch)
        assert "a student has no other branch" in str(error.value) and "msad.export" not in str(error.value)


def test_a_program_evaluates_at_test_size_128_on_a_padded_canvas(checkpoint, tmp_path):
    """A 128 px test size makes 128 px canvases; the program traces levels of size >= 2 (256 px), so its
    detector pads such a canvas to 256 as the data loader pads: every image gets detections, none outside it."""
    root = checkpoint["root"]
    flags = ["--checkpoint", str(student_pt2(checkpoint)), "--test-size", "128", "--max-size", "160",
             "--workers", "0", "--device", "cpu"]
    metrics = evaluate.main([*flags, "--val-ann", f"{root}/annotations/instances_val2017.json", "--val-images",
                             f"{root}/val2017", "--output-dir", str(tmp_path / "coco")])
    assert metrics["test_size"] == 128 and metrics["AP"] >= 0
    folder = evaluate.main([*flags, "--images", f"{root}/val2017", "--output-dir", str(tmp_path / "images")])
    entries = json.loads((tmp_path / "images" / "detections.json").read_text())
    assert folder["images"] == 3 and all(e["scores"] for e in entries)
    orig = {i["file_name"]: (i["height"], i["width"]) for i in
            json.loads(open(f"{root}/annotations/instances_val2017.json").read())["images"]}
    for e in entries:  # original pixels, so within the file's sides
        h, w = orig[e["file_name"]]
        assert all(b[2] <= w + 1e-3 and b[3] <= h + 1e-3 for b in e["boxes"])


@pytest.mark.parametrize("damage", ["text", "truncated", "empty", "missing"])
def test_a_damaged_program_is_one_line_without_torchs_logged_traceback(checkpoint, tmp_path, capfd, damage):
    path = tmp_path / "student.pt2"
    data = student_pt2(checkpoint).read_bytes()
    if damage != "missing":
        path.write_bytes({"text": b"not a program", "truncated": data[:len(data) // 2], "empty": b""}[damage])
    capfd.readouterr()
    with pytest.raises(ValueError, match=f"{path} is not a loadable torch.export program"):
        export.load_exported(str(path))
    assert capfd.readouterr().err == ""  # torch.export.load logs a 12-line traceback at WARNING


def test_invalid_metadata_in_a_program_names_the_file(tmp_path):
    program = torch.export.export(torch.nn.ReLU(), (torch.zeros(2),))
    for text, words in (("{not json", "msad.json is not valid JSON"), ('{"kind": "student"}', "lacks kind")):
        path = tmp_path / "bad.pt2"
        torch.export.save(program, path, extra_files={export.METADATA: text})
        with pytest.raises(ValueError, match=words) as error:
            export.load_exported(str(path))
        assert str(path) in str(error.value)


@pytest.mark.parametrize("make,flags,words", [
    (lambda p: p.write_text("not a checkpoint"), [], "is not a valid checkpoint"),
    (None, ["--size", "200", "256"], "multiples of 128"),
    ("teacher", [], "is a teacher: say which branch"),
])
def test_bad_input_to_the_exporter_is_one_line(checkpoint, tmp_path, make, flags, words):
    path = tmp_path / "model.pth"
    if make == "teacher":
        ckpt = torch.load(checkpoint["path"], weights_only=True)
        teacher = detecting("teacher", replace(CFG, cff_hidden=8)).model
        torch.save({**ckpt, "kind": "teacher", "model": teacher.state_dict()}, path)
    elif make is not None:
        make(path)
    else:
        path = checkpoint["path"]
    proc = run("-m", "msad.export", "--checkpoint", path, "--output", tmp_path / "out.pt2", *flags)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:") and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.pt2").exists()


def test_a_low_input_program_reads_the_half_size_canvas_directly():
    """--input low: fed the nearest-halved canvas (what the student sees inside the full program), it gives the
    full program's detections at half their coordinates; its canvas sides are multiples of 64."""
    model = detecting("student")
    low = export.export(model, input="low").module()
    image = torch.randint(0, 256, (3, 256, 384), dtype=torch.uint8)
    size = torch.tensor([256, 384])
    boxes, scores, labels = export.Deployable(model)(image, size)
    same_detections((boxes / 2, scores, labels), low(image[:, ::2, ::2].contiguous(), size // 2))
    same_detections(export.Deployable(model, low_input=True)(image[:, :128, :192], torch.tensor([128, 192])),
                    low(image[:, :128, :192].contiguous(), torch.tensor([128, 192])))
    with pytest.raises(ValueError, match="only a student or a teacher's LR branch"):
        export.export(detecting("teacher"), input="low")


def test_evaluate_runs_a_low_input_program_on_images_resized_once(checkpoint, tmp_path):
    root = checkpoint["root"]
    out = tmp_path / "low.pt2"
    assert export.main(["--checkpoint", str(checkpoint["path"]), "--output", str(out), "--input", "low"])["input"] == "low"
    data = ["--val-ann", f"{root}/annotations/instances_val2017.json", "--val-images", f"{root}/val2017",
            "--workers", "0", "--device", "cpu"]
    metrics = evaluate.main(["--checkpoint", str(out), *data, "--output-dir", str(tmp_path / "e")])
    assert metrics["input"] == "low" and metrics["test_size"] == 128 and metrics["AP"] >= 0
