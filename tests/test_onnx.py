"""ONNX deployment (python -m msad.export --output X.onnx, msad/onnx_export.py): ONNX Runtime gives the eager
detections, through evaluate.py too; the file says its categories; a missing dependency is one line."""
import json
import sys
from dataclasses import replace

import pytest
import torch

import evaluate
from msad import export, onnx_export
from msad.cli import run_script
from msad.data import PAD_VALUE
from test_export import CFG, checkpoint, detecting  # noqa: F401 (checkpoint: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student_onnx(checkpoint):  # noqa: F811
    """The checkpoint fixture's student (the `detecting` weights) as an ONNX file, written by msad.export."""
    path = checkpoint["tmp"] / "student.onnx"
    result = export.main(["--checkpoint", str(checkpoint["path"]), "--output", str(path)])
    assert result["format"] == "onnx" and result["kind"] == "student"
    return path


def matched(eager, ours, box_atol=1e-2, score_atol=1e-4):
    """Equal counts, and every eager detection paired one to one with a detection of the same label, score
    within score_atol and box within box_atol px (float rounding may swap detections of near-equal score)."""
    (b1, s1, l1), (b2, s2, l2) = eager, ours
    assert len(s1) == len(s2)
    close = ((b1[:, None] - b2[None]).abs().amax(-1) <= box_atol) & ((s1[:, None] - s2[None]).abs() <= score_atol)
    close &= l1[:, None] == l2[None]
    free = torch.ones(len(s2), dtype=torch.bool)
    for i in range(len(s1)):  # greedy is exact here: candidates of one detection are its float-noise twins
        j = (close[i] & free).nonzero()
        assert len(j), f"eager detection {i} (label {l1[i]}, score {s1[i]:.5f}) has no ONNX twin"
        free[j[0, 0]] = False
    return len(s1)


def canvas(shape, size):
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8)
    pad = torch.tensor(PAD_VALUE, dtype=torch.uint8)[:, None, None]
    image[:, size[0]:, :], image[:, :, size[1]:] = pad, pad  # padded as the data loader pads
    return image


@pytest.mark.parametrize("shape,size", [((256, 256), (256, 256)), ((256, 384), (230, 384)), ((384, 256), (384, 200))])
def test_onnx_runtime_gives_the_eager_detections_on_three_canvases(student_onnx, shape, size):
    detector, meta = export.load_exported(str(student_onnx))
    assert isinstance(detector, onnx_export.OnnxDetector) and meta["kind"] == "student" and detector.branch == "lr"
    eager = detecting("student")
    image = canvas(shape, size)
    expected = export.Deployable(eager)(image, torch.tensor(size))
    assert matched(expected, detector.run(image, torch.tensor(size))) == 100  # max_dets: NMS had work to do


def test_the_onnx_file_names_its_categories(student_onnx, checkpoint):  # noqa: F811
    import onnx
    props = {p.key: p.value for p in onnx.load(str(student_onnx)).metadata_props}
    ckpt = torch.load(checkpoint["path"], weights_only=True)
    assert json.loads(props["category_ids"]) == ckpt["args"]["cat_ids"]
    assert json.loads(props["category_names"]) == ckpt["args"]["class_names"]
    meta = json.loads(props[export.METADATA])
    assert meta["kind"] == "student" and meta["branch"] == "lr" and meta["args"] == ckpt["args"]


def test_onnx_keeps_zero_or_one_box(tmp_path):
    """Every box covers the image and one class passes: NMS keeps exactly one. An image of no pixels clips
    every box empty: NMS gets none, and the program returns none."""
    one = detecting("student", replace(CFG, num_classes=2, head_convs=0), seed=1)
    head = one.model.head
    with torch.no_grad():
        head.box_pred.weight.zero_()
        head.box_pred.bias.fill_(1e4)
        head.cls_logits.weight.zero_()
        head.cls_logits.bias.copy_(torch.tensor([5.0, -20.0]))
    program = onnx_export.to_onnx(export.export(one))
    path = tmp_path / "one.onnx"
    onnx_export.save_onnx(program, path, {"kind": "student", "branch": "lr", "args": {}}, ([1, 2], ["a", "b"]))
    detector = onnx_export.OnnxDetector(str(path))
    image = torch.randint(0, 256, (3, 256, 384), dtype=torch.uint8)
    boxes, scores, labels = detector.run(image, torch.tensor([256, 384]))
    assert labels.tolist() == [0] and boxes.tolist() == [[0.0, 0.0, 384.0, 256.0]]
    assert [t.shape[0] for t in detector.run(image, torch.tensor([0, 0]))] == [0, 0, 0]


def test_evaluate_gives_the_checkpoints_results_for_the_onnx_file(checkpoint, student_onnx):  # noqa: F811
    tmp, root = checkpoint["tmp"], checkpoint["root"]
    flags = ["--val-ann", f"{root}/annotations/instances_val2017.json", "--val-images", f"{root}/val2017",
             "--workers", "0", "--device", "cpu"]
    metrics = {name: evaluate.main(["--checkpoint", str(path), "--output-dir", str(tmp / f"onnx_{name}"), *flags])
               for name, path in (("pth", checkpoint["path"]), ("onnx", student_onnx))}
    assert metrics["onnx"]["AP"] == pytest.approx(metrics["pth"]["AP"], abs=0.05)
    assert metrics["onnx"]["kind"] == "student" and metrics["onnx"]["branch"] == "lr"
    dets = {name: json.loads((tmp / f"onnx_{name}" / "detections.json").read_text()) for name in metrics}
    assert len(dets["pth"]) == len(dets["onnx"]) > 100
    # and --images: the same detections.json path as a checkpoint's
    out = evaluate.main(["--checkpoint", str(student_onnx), "--images", f"{root}/val2017", "--output-dir",
                         str(tmp / "onnx_images"), "--workers", "0", "--device", "cpu"])
    assert out["images"] == 3 and out["detections"] > 0


@pytest.mark.parametrize("missing", onnx_export.DEPENDENCIES)
def test_a_missing_dependency_is_one_line_naming_the_install(checkpoint, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                             missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    for argv, main in ((["--checkpoint", str(checkpoint["path"]), "--output", str(tmp_path / "x.onnx")], export.main),
                       (["--checkpoint", str(tmp_path / "x.onnx"), "--output-dir", str(tmp_path / "eval")],
                        evaluate.main)):
        with pytest.raises(SystemExit) as exit_info:
            run_script(main, argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and len(err.splitlines()) == 1, err
        assert f"{missing} is not installed" in err and "pip install -r requirements-deploy.txt" in err
    assert not (tmp_path / "x.onnx").exists()


def test_a_file_that_is_not_onnx_is_one_line(tmp_path):
    for name, data in (("text.onnx", b"not a model"), ("missing.onnx", None)):
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a loadable ONNX model"):
            export.load_exported(str(tmp_path / name))
