"""The three scripts end to end, as a user runs them, on a tiny slice of the demo data (issue: quick start),
and the one-line errors for bad arguments before any work starts (issue: reliability)."""
import json
import math

import pytest
import torch

from msad.synthetic import ensure_synthetic
from scripts_common import TINY, data_flags, last_json, read_jsonl, run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny synthetic COCO set, a 3-iteration teacher, and its student (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("demo")
    data = ensure_synthetic(str(tmp / "synthetic"), num_train=12, num_val=4)
    teacher = last_json(run("train_teacher.py", *TINY, *data_flags(data), "--iters", 3, "--output-dir",
                            tmp / "teacher"))
    student = last_json(run("train_student.py", *TINY, *data_flags(data), "--iters", 3, "--kd-warmup", 2,
                            "--teacher", tmp / "teacher" / "model_final.pth", "--output-dir", tmp / "student"))
    return {"tmp": tmp, "data": data, "teacher": teacher, "student": student}


def finite_metrics(metrics):
    return all(math.isfinite(metrics[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))


def test_teacher_script_writes_checkpoint_log_and_metrics(demo):
    out = demo["tmp"] / "teacher"
    assert demo["teacher"]["kind"] == "teacher" and demo["teacher"]["iterations"] == 3
    assert finite_metrics(demo["teacher"])
    assert json.loads((out / "metrics.json").read_text()) == demo["teacher"]
    log = read_jsonl(out / "log.jsonl")
    assert [r["iter"] for r in log] == [1, 2, 3]
    for term in ("hr", "lr", "fused"):  # every loss term of every branch is logged
        assert all(math.isfinite(log[-1][f"{term}_loss_{k}"]) for k in ("cls", "box", "ctr"))
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["kind"] == "teacher" and any(k.startswith("fusion.") for k in final["model"])
    assert_categories_stored(final, demo["data"])


def assert_categories_stored(ckpt, data):
    """The training set's category ids and names, in sorted id order (label k = k-th), for evaluate.py --images."""
    with open(f"{data}/annotations/instances_train2017.json") as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    assert ckpt["args"]["cat_ids"] == [c["id"] for c in cats]
    assert ckpt["args"]["class_names"] == [c["name"] for c in cats]


def test_student_script_saves_only_the_student_and_logs_kd_terms(demo):
    out = demo["tmp"] / "student"
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["kind"] == "student"
    assert_categories_stored(final, demo["data"])
    assert not any(k.startswith("fusion.") for k in final["model"])  # no teacher tensors
    log = read_jsonl(out / "log.jsonl")
    assert {f"loss_kd_p{l}" for l in range(2, 7)} <= set(log[-1])
    assert log[0]["loss_kd_p2"] == 0.0  # warm-up: w(0) = 0 at the first iteration
    assert log[-1]["loss_kd_p2"] > 0.0
    assert finite_metrics(demo["student"])


def test_evaluate_script_on_student_and_teacher_branches(demo):
    tmp = demo["tmp"]
    student = last_json(run("evaluate.py", "--checkpoint", tmp / "student" / "model_final.pth",
                            "--output-dir", tmp / "eval_student", "--workers", 0, "--device", "cpu",
                            "--vis", tmp / "vis", "--vis-count", 2))
    assert student["kind"] == "student" and student["images"] == 4 and finite_metrics(student)
    assert (tmp / "eval_student" / "detections.json").exists() and len(student["vis"]) == 2
    lr = last_json(run("evaluate.py", "--checkpoint", tmp / "teacher" / "model_final.pth", "--branch", "lr",
                       "--output-dir", tmp / "eval_lr", "--workers", 0, "--device", "cpu"))
    assert lr["branch"] == "lr" and finite_metrics(lr)


def one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error:"), proc.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]


def test_student_refuses_a_checkpoint_that_is_not_a_teacher(demo):
    proc = run("train_student.py", *TINY, *data_flags(demo["data"]), "--iters", 1,
               "--teacher", demo["tmp"] / "student" / "model_final.pth", "--output-dir", demo["tmp"] / "bad1")
    one_line_error(proc, "student", "teacher")
    assert not (demo["tmp"] / "bad1").exists()  # refused before any work started


def test_student_with_another_backbone_cannot_start_from_the_teacher(demo):
    proc = run("train_student.py", *TINY, *data_flags(demo["data"]), "--iters", 1, "--backbone", "resnet34",
               "--teacher", demo["tmp"] / "teacher" / "model_final.pth", "--output-dir", demo["tmp"] / "bad2")
    one_line_error(proc, "does not match the student", "--init imagenet")


def test_evaluate_refuses_a_branch_the_checkpoint_lacks(demo):
    proc = run("evaluate.py", "--checkpoint", demo["tmp"] / "student" / "model_final.pth", "--branch", "fused",
               "--output-dir", demo["tmp"] / "bad3", "--device", "cpu")
    one_line_error(proc, "--branch fused", "student")


def test_batch_size_must_divide_over_processes(demo):
    proc = run("train_teacher.py", *TINY, *data_flags(demo["data"]), "--iters", 1, "--batch-size", 3,
               "--output-dir", demo["tmp"] / "bad4", nproc=2)
    assert proc.returncode != 0  # torchrun adds its own report; each rank's own line is the clear one
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("batch size 3" in line and "2 processes" in line for line in errors), proc.stderr[-2000:]


def test_missing_annotation_file_is_one_line(tmp_path):
    proc = run("train_teacher.py", *TINY, "--train-ann", tmp_path / "nope.json", "--train-images", tmp_path,
               "--val-ann", tmp_path / "nope.json", "--val-images", tmp_path, "--iters", 1,
               "--output-dir", tmp_path / "out")
    one_line_error(proc, "nope.json")


def test_a_half_size_that_breaks_alignment_is_refused(demo):
    proc = run("train_teacher.py", *TINY, *data_flags(demo["data"]), "--iters", 1, "--train-sizes", "16",
               "--output-dir", demo["tmp"] / "bad5")
    one_line_error(proc, "--train-sizes")
