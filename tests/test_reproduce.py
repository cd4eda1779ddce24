"""benchmarks/reproduce.py (issue: controlled ablation): rows run through the scripts, mean ± std per row,
a failed run named by row, seed and log, finished rows kept, and --resume-table skipping them."""
import json
import os
import subprocess
import sys

import pytest

from msad.synthetic import ensure_synthetic
from scripts_common import ROOT, TINY, data_flags, read_jsonl


def reproduce(tmp, data, *args):
    extra = " ".join(str(a) for a in [*TINY, *data_flags(data)] if a not in ("--device", "cpu"))
    cmd = [sys.executable, "benchmarks/reproduce.py", "--device", "cpu", "--seeds", "0", "--iters", 1,
           "--hr-sizes", "96,128", "--extra", extra, "--runs", tmp / "runs", "--out", tmp / "table", *args]
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic(str(tmp_path_factory.mktemp("rep") / "synthetic"), num_train=8, num_val=4)


def test_rows_run_through_the_scripts_with_diagnostics(tmp_path, data):
    proc = reproduce(tmp_path, data, "--teacher-iters", 2, "--rows", "teacher_fused,student")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "total time:" in proc.stdout
    table = json.loads((tmp_path / "table.json").read_text())
    rows = table["tables"]["2"]["rows"]
    assert set(rows) == {"teacher_fused", "student"}  # the teacher run itself is not a row
    assert len(rows["teacher_fused"]["seeds"]["0"]["cff_weights"]["a_H"]) == 5  # from evaluate.py --branch fused
    assert set(rows["student"]["seeds"]["0"]["diagnostics"]) >= {"feat_gap_first", "feat_gap_last", "grad_ratio"}
    assert rows["student"]["mean"]["AP"] == rows["student"]["seeds"]["0"]["AP"] and rows["student"]["std"]["AP"] == 0
    log = read_jsonl(tmp_path / "runs" / "seed0" / "student_t2" / "log.jsonl")
    assert [r["iter"] for r in log if r.get("diagnostics") == "student_probe"] == [0]
    assert "| `student` |" in (tmp_path / "table.md").read_text()


def test_a_failed_run_is_named_and_resume_table_skips_finished_rows(tmp_path, data):
    done = {"shared/fcos_lr/0": {"AP": 12.5, "AP50": 20.0, "APs": 1.0, "APm": 2.0, "APl": 3.0, "wall_s": 1.0}}
    (tmp_path / "table.json").write_text(json.dumps({"runs": done}))
    # fcos_lr is finished; fcos_hr fails (sizes below 32 px are refused by train_teacher.py)
    proc = reproduce(tmp_path, data, "--resume-table", "--rows", "fcos_lr,fcos_hr", "--hr-sizes", "16")
    assert proc.returncode != 0
    log = tmp_path / "runs" / "seed0" / "shared_fcos_hr_0.log"
    assert f"FAILED: row fcos_hr, seed 0: train_teacher.py exit 1; log {log}" in proc.stdout
    assert "--train-sizes" in log.read_text()
    assert "[shared/fcos_lr/0]" not in proc.stdout  # not run again
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["runs"] == done  # the finished row is kept
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 runs failed")


def test_demo_cost_counts_every_model_as_evaluation_does(tmp_path, data):
    """benchmarks/demo_cost.py: GFLOPs per image over the val set, relative to the naive LR detector."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import demo_cost
    demo_cost.main(["--data", data, "--light", "16x0,32x1", "--out", str(tmp_path / "cost")])
    rows = json.loads((tmp_path / "cost.json").read_text())["rows"]
    assert rows["naive_lr_fcos"]["vs_naive_lr"] == 1.0
    assert rows["hr_fcos"]["gflops"] > 2 * rows["naive_lr_fcos"]["gflops"]  # 4x the pixels (padding aside)
    assert rows["f16h0"]["gflops"] < rows["f32h1"]["gflops"] < rows["student"]["gflops"]  # FPN 32, 2 head convs
    assert rows["f16h0"]["params_m"] < rows["student"]["params_m"]


def test_sweep_student_variants_map_to_training_flags():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from tune_distillation import student_flags
    assert student_flags("teacher") == ["--init", "teacher"]
    assert student_flags("light28x1") == ["--init", "scratch", "--fpn-channels", 28, "--head-convs", 1,
                                          "--clip-grad", 5]
    with pytest.raises(SystemExit, match="unknown variant 'thin'"):
        student_flags("thin")
