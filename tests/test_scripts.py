"""The three scripts end to end, as a user runs them, on a tiny slice of the demo data (issue: quick start),
and the one-line errors for bad arguments before any work starts (issue: reliability)."""
import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from msad.cli import check_ranges
from msad.synthetic import ensure_synthetic
from scripts_common import TINY, data_flags, last_json, read_jsonl, run, start, wait_for


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


def test_every_evaluation_reports_the_models_cost(demo):
    """params_m and gflops (per image, first evaluation batch) in the training and evaluation final lines."""
    tmp = demo["tmp"]
    evaluated = last_json(run("evaluate.py", "--checkpoint", tmp / "student" / "model_final.pth", "--output-dir",
                              tmp / "eval_cost", "--workers", 0, "--device", "cpu", "--eval-batch-size", 4))
    for metrics in (demo["teacher"], demo["student"], evaluated):
        assert metrics["params_m"] > 0 and metrics["gflops"] > 0
    state = torch.load(tmp / "student" / "model_final.pth", weights_only=True)["model"]
    params = sum(v.numel() for v in state.values())  # GroupNorm everywhere: the state holds parameters only
    assert evaluated["params_m"] == demo["student"]["params_m"] == pytest.approx(params / 1e6, abs=1e-4)
    assert evaluated["gflops"] == demo["student"]["gflops"]  # the same model on the same first batch
    assert json.loads((tmp / "eval_cost" / "metrics.json").read_text())["gflops"] == evaluated["gflops"]


def test_each_run_keeps_its_resolved_configuration_in_config_json(demo):
    config = json.loads((demo["tmp"] / "student" / "config.json").read_text())
    # a flag, a preset value, a value taken from the teacher, a derived one
    assert config["kd_warmup"] == 2 and config["lr"] == 0.02 and config["head_convs"] == 1
    assert config["kd_weight"] == 2.0  # the demo preset's distillation weight (coco: the released 0.6)
    assert config["batch_per_process"] == 2
    saved = torch.load(demo["tmp"] / "student" / "model_final.pth", weights_only=True)["args"]
    assert all(saved[k] == v for k, v in config.items())  # what the checkpoint was trained with


def test_help_shows_every_default_and_the_docstrings_examples_as_written():
    proc = run("train_teacher.py", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "[coco: 0.01; demo: 0.02]" in text  # --lr: each preset's value
    assert "[coco: 180000; demo: 800]" in text  # --iters of the teacher
    options = text.split("options:", 1)[1]
    for flag, default in (("--weight-decay", "0.0001"), ("--seed", "0"), ("--log-period", "20")):  # no preset's
        assert f"[default: {default}]" in options.split(f"{flag} {flag[2:].upper().replace('-', '_')}", 1)[1][:120]
    assert "--data-root data/coco \\\n" in proc.stdout  # a continued example line stays two lines


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
    lines = read_jsonl(out / "log.jsonl")
    log = [r for r in lines if "diagnostics" not in r]  # the loss lines; the others are diagnostics probes
    assert [r["iter"] for r in lines if r.get("diagnostics") == "student_probe"] == [0, 1, 2]
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
    one_line_error(proc, "--backbone resnet34 (teacher resnet18)", "--init imagenet")


def test_a_thinner_student_cannot_start_from_the_teacher(demo):
    proc = run("train_student.py", *TINY, *data_flags(demo["data"]), "--iters", 1, "--fpn-channels", 16,
               "--head-convs", 0, "--teacher", demo["tmp"] / "teacher" / "model_final.pth",
               "--output-dir", demo["tmp"] / "bad6")
    one_line_error(proc, "--init teacher", "--fpn-channels 16 (teacher 32), --head-convs 0 (teacher 1)",
                   "--init imagenet or --init scratch")
    assert not (demo["tmp"] / "bad6").exists()  # refused before any work started


def test_teacher_starts_from_a_trained_hr_detector_and_takes_its_architecture(demo):
    tmp, data = demo["tmp"], data_flags(demo["data"])
    last_json(run("train_teacher.py", *TINY, *data, "--mode", "single", "--iters", 2, "--head-convs", 2, "--no-eval",
                  "--output-dir", tmp / "hr_fcos"))
    tiny = [f for i, f in enumerate(TINY) if "--head-convs" not in TINY[max(i - 1, 0):i + 1]]  # the detector's: 2
    proc = run("train_teacher.py", *tiny, *data, "--iters", 1, "--no-eval", "--init-from",
               tmp / "hr_fcos" / "model_final.pth", "--output-dir", tmp / "init_teacher")
    assert last_json(proc)["kind"] == "teacher"
    said = next(line for line in proc.stdout.splitlines() if line.startswith("init-from"))
    detector = torch.load(tmp / "hr_fcos" / "model_final.pth", weights_only=True)["model"]
    assert f"loaded {len(detector)} tensors" in said, said  # all of the detector
    assert "fpn.lateral.p2.weight" in said and "fusion.gate.0.weight" in said, said
    assert torch.load(tmp / "init_teacher" / "model_final.pth", weights_only=True)["args"]["head_convs"] == 2
    proc = run("train_teacher.py", *tiny, *data, "--iters", 1, "--init-from", tmp / "teacher" / "model_final.pth",
               "--output-dir", tmp / "bad_init")
    one_line_error(proc, "holds a 'teacher' checkpoint, expected 'fcos'")
    assert not (tmp / "bad_init").exists()


def test_a_resume_of_a_run_started_with_init_from_needs_no_init_file(demo):
    tmp, data = demo["tmp"], data_flags(demo["data"])
    last_json(run("train_teacher.py", *TINY, *data, "--mode", "single", "--iters", 1, "--no-eval",
                  "--output-dir", tmp / "hr_fcos_r"))
    init = tmp / "hr_fcos_r" / "model_final.pth"
    flags = [*TINY, *data, "--no-eval", "--init-from", init, "--checkpoint-period", 1, "--output-dir", tmp / "init_r"]
    fresh = run("train_teacher.py", *flags, "--iters", 1, "--resume")  # --resume of nothing yet: a new run
    assert "a new run starts at iteration 0" in fresh.stdout and "init-from" in fresh.stdout, fresh.stdout[-2000:]
    init.unlink()  # checkpoint.pth holds everything the resumed run needs
    proc = run("train_teacher.py", *flags, "--iters", 2, "--resume")
    assert last_json(proc)["start_iteration"] == 1 and last_json(proc)["iterations"] == 2


def test_training_refuses_at_start_a_val_set_it_could_not_evaluate(demo, tmp_path):
    root = Path(demo["data"])
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    other = {**val, "categories": val["categories"] + [{"id": 99, "name": "zebra"}]}
    missing = {**val, "images": val["images"] + [{**val["images"][0], "id": 10**6, "file_name": "gone.png"}]}
    for name, ann, words in (("cats", other, ("1 of its", "categories are not among", "training set")),
                             ("img", missing, ("images are not in", "gone.png"))):
        (tmp_path / f"{name}.json").write_text(json.dumps(ann))
        flags = [*data_flags(root)[:4], "--val-ann", tmp_path / f"{name}.json", "--val-images", root / "val2017"]
        proc = run("train_teacher.py", *TINY, *flags, "--iters", 1, "--output-dir", tmp_path / name)
        one_line_error(proc, *words)
        assert not (tmp_path / name / "model_final.pth").exists()  # refused before the first iteration


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


# -- safe runs (issue 14) -------------------------------------------------------------------------------
def test_sigterm_to_the_process_group_with_workers_saves_and_exits_143(demo):
    """What scancel / kill -TERM -PGID do: the loader workers get the signal too, and must not die of it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from scripts_common import ROOT
    out = demo["tmp"] / "sigterm"
    args = [*TINY, *data_flags(demo["data"]), "--iters", 100000, "--checkpoint-period", 100000, "--workers", 2,
            "--output-dir", out]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_teacher.py"), *map(str, args)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists():  # training (and its workers) running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and both workers
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "SIGTERM" in last and "--resume" in last, last
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert metrics["stopped"] and torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == \
        metrics["iterations"] > 0
    # a plain rerun must not start over the unfinished run
    one_line_error(run("train_teacher.py", *args), "unfinished run", "--resume", "--overwrite")


def test_resume_right_after_sigkill_is_not_refused_by_the_lock(demo):
    """The lock belongs to the killed process alone: its data loader workers, which outlive it by seconds, do not
    hold it (they would with flock), so a scheduler that requeues at once, or a user, can resume at once."""
    from msad import outdir
    out = demo["tmp"] / "sigkill"
    args = [*TINY, *data_flags(demo["data"]), "--checkpoint-period", 2, "--workers", 2, "--output-dir", out]
    proc = start("train_teacher.py", *args, "--iters", 100000)
    try:
        wait_for(lambda: (out / "checkpoint.pth").exists(), proc)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers live on for a while
        proc.wait(timeout=30)
        orphans = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        lock = outdir._lock_and_test(out)  # what --resume does first; refused while a worker held an flock
        lock.close()
        assert orphans, "the workers were gone already: nothing was tested"
        done = torch.load(out / "checkpoint.pth", weights_only=True)["iteration"]
        resumed = run("train_teacher.py", *args, "--iters", done + 1, "--no-eval", "--resume")
        assert resumed.returncode == 0 and f"continuing at iteration {done}" in resumed.stdout, resumed.stderr[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_rerun_into_a_finished_run_is_refused_in_one_line(demo):
    out = demo["tmp"] / "teacher"
    before = (out / "model_final.pth").read_bytes()
    proc = run("train_teacher.py", *TINY, *data_flags(demo["data"]), "--iters", 2, "--output-dir", out)
    one_line_error(proc, "finished model", "--resume", "--overwrite", "--output-dir")
    assert (out / "model_final.pth").read_bytes() == before


def test_resuming_a_finished_run_or_a_refused_start_touches_no_file(demo, tmp_path):
    out, data = demo["tmp"] / "teacher", data_flags(demo["data"])
    files = {name: (out / name).read_bytes() for name in ("model_final.pth", "checkpoint.pth", "metrics.json",
                                                          "log.jsonl", "config.json")}
    proc = run("train_teacher.py", *TINY, *data, "--iters", 3, "--resume", "--output-dir", out)
    assert proc.returncode == 0 and "already finished at iteration 3" in proc.stderr, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(files["metrics.json"])
    # resumed for longer with another architecture: refused; --overwrite whose data does not parse: refused
    one_line_error(run("train_teacher.py", *TINY, *data, "--iters", 5, "--resume", "--head-convs", 2,
                       "--output-dir", out), "--resume", "--head-convs 2 (checkpoint: 1)")
    (tmp_path / "bad.json").write_text("{")
    one_line_error(run("train_teacher.py", *TINY, *data, "--train-ann", tmp_path / "bad.json", "--iters", 5,
                       "--overwrite", "--output-dir", out), "bad.json", "malformed JSON")
    assert {name: (out / name).read_bytes() for name in files} == files


@pytest.mark.parametrize("flags, words", [
    (["--iters", "0"], ["--iters 0"]), (["--iters", "-5"], ["--iters -5"]), (["--lr", "nan"], ["--lr nan"]),
    (["--lr", "0"], ["--lr 0"]), (["--eval-batch-size", "0"], ["--eval-batch-size 0"]),
    (["--max-size", "0"], ["--max-size"]), (["--fpn-channels", "0"], ["--fpn-channels 0"]),
    (["--max-images", "0"], ["--max-images 0"]), (["--device", "gpu"], ["--device gpu"]),
    (["--amp", "fp16", "--device", "cpu"], ["--amp fp16", "CUDA"]),
    (["--fused-weight", "nan"], ["--fused-weight nan", "finite"]), (["--fused-weight", "-1"], ["--fused-weight -1.0"]),
    (["--cff-hidden", "-1"], ["--cff-hidden -1"]), (["--weight-decay", "inf"], ["--weight-decay inf"]),
])
def test_bad_arguments_are_refused_before_any_work(flags, words, capsys):
    import train_teacher
    with pytest.raises(SystemExit) as e:
        train_teacher.parse_args(flags)
    message = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error:") and all(w in message for w in words), message


def test_freeze_at_out_of_range_and_cuda_without_cuda_are_refused(capsys):
    import train_teacher
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--freeze-at", "9"])
    assert "--freeze-at" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            train_teacher.parse_args(["--device", "cuda"])


def test_missing_data_root_is_an_error_not_generated_data(tmp_path, monkeypatch):
    import evaluate
    import train_teacher
    with pytest.raises(FileNotFoundError, match="data/cocoo does not exist.*--preset coco"):
        train_teacher.main(["--data-root", str(tmp_path / "data/cocoo"), "--output-dir", str(tmp_path / "out"),
                            "--device", "cpu"])
    assert not (tmp_path / "data").exists()
    monkeypatch.chdir(tmp_path)  # evaluate.py run from another folder, on a demo checkpoint
    ckpt = {"kind": "student", "model": {}, "args": {"preset": "demo", "data_root": "data/synthetic"}}
    torch.save(ckpt, tmp_path / "student.pth")
    with pytest.raises(FileNotFoundError, match="data/synthetic does not exist"):
        evaluate.main(["--checkpoint", str(tmp_path / "student.pth"), "--device", "cpu"])
    assert not (tmp_path / "data").exists()


def test_a_bad_val_json_fails_before_the_first_iteration(demo, tmp_path):
    with open(f"{demo['data']}/annotations/instances_val2017.json") as f:
        val = json.load(f)
    val["images"][0]["id"] = str(val["images"][0]["id"])
    (tmp_path / "val.json").write_text(json.dumps(val))
    flags = data_flags(demo["data"])
    flags[flags.index("--val-ann") + 1] = str(tmp_path / "val.json")
    proc = run("train_teacher.py", *TINY, *flags, "--iters", 2, "--output-dir", tmp_path / "out")
    one_line_error(proc, "val.json", "images[0]", "'id'")
    assert not (tmp_path / "out" / "log.jsonl").exists()  # no iteration ran


def test_evaluate_without_ground_truth_writes_detections_and_says_so(demo, tmp_path, capsys):
    import evaluate
    with open(f"{demo['data']}/annotations/instances_val2017.json") as f:
        val = json.load(f)
    del val["annotations"]
    (tmp_path / "val.json").write_text(json.dumps(val))
    metrics = evaluate.main(["--checkpoint", str(demo["tmp"] / "student" / "model_final.pth"), "--val-ann",
                             str(tmp_path / "val.json"), "--output-dir", str(tmp_path / "o"), "--device", "cpu",
                             "--workers", "0"])
    assert metrics["ground_truth"] is False and metrics["images"] == len(val["images"])
    assert "no ground truth" in capsys.readouterr().out
    assert isinstance(json.loads((tmp_path / "o" / "detections.json").read_text()), list)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_non_finite_or_negative_distillation_weight_is_refused_first(value, tmp_path, capsys):
    import train_student
    with pytest.raises(SystemExit, match=f"--kd-weight {float(value)}: must be a finite number"):
        train_student.main(["--kd-weight", value, "--teacher", str(tmp_path / "none.pth"), "--output-dir",
                            str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_evaluate_checks_flags_then_its_output_folders_first_and_names_the_missing_teacher(tmp_path):
    import train_student
    (tmp_path / "file").write_text("")
    proc = run("evaluate.py", "--vis", tmp_path / "file", "--output-dir", tmp_path / "o", "--device", "cpu")
    one_line_error(proc, "--vis", "cannot write into this folder")
    for flags, words in ((["--score-thresh", "nan"], "--score-thresh nan: must be a score from 0 to 1"),
                         (["--eval-batch-size", "0"], "--eval-batch-size 0"), (["--device", "gpu"], "--device gpu")):
        proc = run("evaluate.py", *flags, "--output-dir", tmp_path / "o2", "--vis", tmp_path / "v2")
        one_line_error(proc, words)
        assert not (tmp_path / "o2").exists() and not (tmp_path / "v2").exists()  # nothing made for a bad command
    proc = run("evaluate.py", "--output-dir", "/proc", "--device", "cpu")  # exists, but takes no file
    one_line_error(proc, "--output-dir /proc: cannot write into this folder")
    with pytest.raises(FileNotFoundError, match="does not exist yet: run python train_teacher.py first"):
        train_student.main(["--teacher", str(tmp_path / "t.pth"), "--output-dir", str(tmp_path / "s")])


def test_a_run_stopped_by_ctrl_c_exits_130_with_the_resume_hint_last(tmp_path, capsys):
    import argparse
    from msad import dist, runner
    args = argparse.Namespace(output_dir=str(tmp_path), no_eval=False, iters=10)
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    result = {"iterations": 4, "start_iteration": 0, "final_loss": 1.0, "stopped": True, "signal": "SIGINT"}
    assert runner.final_evaluation(args, info, None, result) == {}  # no evaluation of a stopped run
    with pytest.raises(SystemExit) as e:
        runner.finish(args, info, result, {"kind": "teacher"})
    assert e.value.code == 130
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["stopped"] is True
    assert "SIGINT" in err.strip().splitlines()[-1] and "--resume" in err.strip().splitlines()[-1]


def test_distillation_weight_comes_from_the_preset_and_is_never_negative():
    from msad.cli import PRESETS, preset_value
    from msad.distill import KD_WEIGHT
    assert PRESETS["coco"]["student"]["kd_weight"] == KD_WEIGHT == pytest.approx(0.2 * 3)  # alpha * T, released
    assert preset_value(argparse.Namespace(preset="demo", kd_weight=None), "kd_weight", "student") == 2.0
    assert preset_value(argparse.Namespace(preset="coco", kd_weight=0.0), "kd_weight", "student") == 0.0
    with pytest.raises(SystemExit, match="--kd-weight -1.0: must be a finite number of at least 0"):
        check_ranges(argparse.Namespace(preset="demo", kd_weight=-1.0, device="cpu", amp=None))
