"""COCO evaluation: results conversion and the single-file path of evaluate.py, against pycocotools itself."""
import contextlib
import io
import json
import re

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate
from msad.data import CocoDetection
from msad.evaluation import coco_evaluate, load_results, to_coco_results
from test_data import ANNOTATIONS, make_coco


def clean_coco(root):
    """The test_data json without its zero-width box, with `area` as real COCO files have it."""
    ann, images, data = make_coco(root, annotations=[a for a in ANNOTATIONS if a[2][2] > 0])
    for a in data["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    with open(ann, "w") as f:
        json.dump(data, f)
    return ann, images, data


def run_evaluate(argv, capsys):
    metrics = evaluate.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(metrics))  # the final stdout line is the metrics JSON
    return metrics


def ground_truth_as_detections(data):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in data["annotations"] if not a["iscrowd"]]


def test_perfect_detections_give_ap_100(tmp_path, capsys):
    ann, _, data = clean_coco(tmp_path)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(ground_truth_as_detections(data)))
    metrics = run_evaluate(["--detections", str(dets), "--val-ann", ann, "--output-dir", str(tmp_path / "out")], capsys)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["AP"] == pytest.approx(100.0)


def test_detections_file_matches_cocoeval_called_directly(tmp_path, capsys):
    ann, _, data = clean_coco(tmp_path)
    dets = ground_truth_as_detections(data)
    dets[0]["bbox"] = [12, 6, 20, 10]  # shifted: lower IoU
    dets[1]["score"] = 0.4
    dets.append({"image_id": 7, "category_id": 3, "bbox": [1, 1, 9, 9], "score": 0.9})  # a false positive
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    metrics = run_evaluate(["--detections", str(path), "--val-ann", ann, "--output-dir", str(tmp_path / "o")], capsys)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(str(path)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    for name, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6]):
        assert metrics[name] == (pytest.approx(round(100 * value, 3)) if value >= 0 else None), name
    assert 0 < metrics["AP"] < 100


def test_results_use_xywh_and_original_category_ids(tmp_path):
    ann, images, _ = make_coco(tmp_path)
    dataset = CocoDetection(ann, images, train=False, sizes=(32,), max_size=64)
    labels = torch.arange(dataset.num_classes)
    detections = [{"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0]] * len(labels)), "scores": torch.full((len(labels),), 0.5),
                   "labels": labels}]
    results = to_coco_results(detections, [5], [(100, 100)], dataset.cat_ids)
    assert [r["bbox"] for r in results] == [[10.0, 5.0, 20.0, 10.0]] * len(labels)
    assert [r["category_id"] for r in results] == dataset.cat_ids  # contiguous label k -> k-th sorted category id
    assert {dataset.cat_id_to_label[r["category_id"]] for r in results} == set(labels.tolist())


def test_no_detections_score_zero_instead_of_crashing(tmp_path):
    ann, images, _ = make_coco(tmp_path)
    dataset = CocoDetection(ann, images, train=False, sizes=(32,), max_size=64)
    assert coco_evaluate(dataset.coco, [], verbose=False)["AP"] == 0.0


@pytest.mark.parametrize("content, words", [
    ("[{]", "malformed JSON"), ('{"a": 1}', "JSON list"),
    ('[{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "detections[0] lacks category_id"),
    ('[{"image_id": 1, "category_id": 1, "bbox": 5, "score": 1}]', "detections[0] field 'bbox' must be a list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": null, "score": 1}]', "got None"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1, "x": "\xff"}]', "not UTF-8 text"),
])
def test_bad_detections_file_is_one_clear_error(tmp_path, content, words):
    path = tmp_path / "dets.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=re.escape(words)) as err:
        load_results(str(path))
    assert f"--detections {path}" in str(err.value) and "\n" not in str(err.value)


def test_a_size_without_ground_truth_objects_is_null_not_minus_100(tmp_path, capsys):
    ann, _, data = clean_coco(tmp_path)  # no box above 96 x 96 px: COCOeval's APl is -1
    assert all(a["bbox"][2] * a["bbox"][3] < 96 ** 2 for a in data["annotations"])
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(ground_truth_as_detections(data)))
    metrics = run_evaluate(["--detections", str(dets), "--val-ann", ann, "--output-dir", str(tmp_path / "o")], capsys)
    assert metrics["APl"] is None and metrics["AP"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["APl"] is None


def test_ground_truth_without_area_field_still_evaluates(tmp_path, capsys):
    ann, _, data = make_coco(tmp_path, annotations=[a for a in ANNOTATIONS if a[2][2] > 0])  # no "area" keys
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(ground_truth_as_detections(data)))
    metrics = run_evaluate(["--detections", str(dets), "--val-ann", ann, "--output-dir", str(tmp_path / "o")], capsys)
    assert metrics["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(image_id=12345), ["detections[0]", "image_id 12345", "not in"]),
    (lambda d: d.update(image_id="5"), ["detections[0]", "'image_id'", "integer"]),
    (lambda d: d.update(category_id=99), ["detections[0]", "category_id 99"]),
    (lambda d: d.update(score="0.9"), ["detections[0]", "'score'", "'0.9'"]),
    (lambda d: d.update(bbox=[0, 0, float("nan"), 1]), ["detections[0]", "'bbox'"]),
])
def test_detections_that_do_not_fit_the_ground_truth_are_one_line(tmp_path, edit, words):
    ann, _, data = clean_coco(tmp_path)
    dets = ground_truth_as_detections(data)
    edit(dets[0])
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    with pytest.raises(ValueError) as err:
        evaluate.main(["--detections", str(tmp_path / "dets.json"), "--val-ann", ann, "--output-dir",
                       str(tmp_path / "o")])
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
