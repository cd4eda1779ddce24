"""The real models and scripts under torchrun with 2 gloo processes on CPU (the same code path for
1 and N processes; the frozen teacher outside DDP; evaluation sharded and merged on rank 0)."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch

from msad.synthetic import ensure_synthetic
from scripts_common import TINY, data_flags, last_json, read_jsonl, run, start, wait_for


def test_teacher_ddp_equals_one_process_even_with_a_rank_without_positives(tmp_path):
    script = os.path.join("tests", "helpers", "ddp_teacher.py")
    for nproc, name in ((1, "one.pth"), (2, "two.pth")):
        proc = run(script, tmp_path / name, nproc=nproc, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(tmp_path / n, weights_only=True) for n in ("one.pth", "two.pth"))
    assert one["names"] == two["names"] and len(one["names"]) == 9  # hr/lr/fused x cls/box/ctr
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)  # float sum order


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = ensure_synthetic(str(tmp / "synthetic"), num_train=8, num_val=6)
    last_json(run("train_teacher.py", *TINY, *data_flags(data), "--iters", 2, "--no-eval",
                  "--output-dir", tmp / "teacher"))
    return tmp, data


def test_student_trains_under_torchrun_with_the_teacher_outside_ddp(trained):
    tmp, data = trained
    teacher = tmp / "teacher" / "model_final.pth"
    result = last_json(run("train_student.py", *TINY, *data_flags(data), "--iters", 2, "--kd-warmup", 0,
                           "--no-eval", "--teacher", teacher, "--output-dir", tmp / "student", nproc=2))
    assert result["kind"] == "student" and result["iterations"] == 2  # DDP without find_unused_parameters
    student = torch.load(tmp / "student" / "model_final.pth", weights_only=True)["model"]
    assert not any(k.startswith("fusion.") for k in student)


def test_a_thin_student_distils_through_adapters_under_one_and_two_processes(trained):
    """--fpn-channels 16 --head-convs 0 under a 32-channel teacher: adapters train inside the DDP wrapper (which,
    without find_unused_parameters, fails at the second step if any of them got no gradient), live in
    checkpoint.pth under "aux" for --resume, and never in the student's model."""
    tmp, data = trained
    flags = [*TINY, *data_flags(data), "--iters", 2, "--kd-warmup", 0, "--no-eval", "--fpn-channels", 16,
             "--head-convs", 0, "--init", "scratch", "--teacher", tmp / "teacher" / "model_final.pth"]
    for nproc in (1, 2):
        out = tmp / f"thin{nproc}"
        result = last_json(run("train_student.py", *flags, "--output-dir", out, nproc=nproc))
        assert result["iterations"] == 2
        losses = [r for r in read_jsonl(out / "log.jsonl") if "diagnostics" not in r]  # not the probe lines
        assert losses and all(r["loss_kd_p2"] > 0 for r in losses)
        ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
        adapters = ckpt["aux"]["adapters"]
        assert [tuple(adapters[f"convs.{i}.weight"].shape) for i in range(5)] == [(32, 16, 1, 1)] * 5
        final = torch.load(out / "model_final.pth", weights_only=True)
        assert "aux" not in final and not any("adapters" in k or "tower" in k for k in final["model"])
        assert final["model"]["fpn.output.p2.weight"].shape == (16, 16, 3, 3)


def test_sharded_evaluation_equals_one_process(trained):
    tmp, _ = trained
    args = ["--checkpoint", tmp / "teacher" / "model_final.pth", "--branch", "fused", "--device", "cpu",
            "--workers", 0, "--eval-batch-size", 2]
    one = last_json(run("evaluate.py", *args, "--output-dir", tmp / "eval1"))
    two = last_json(run("evaluate.py", *args, "--output-dir", tmp / "eval2", nproc=2))
    assert one["images"] == two["images"] == 6
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert two[key] == pytest.approx(one[key], abs=1e-6)
    # C-FF weights: summed over both shards, then averaged over the 6 images. Every image is evaluated on its
    # own padded canvas (batches group images by padded shape), so the sharding does not change them.
    for key in ("a_H", "a_L"):
        assert two["cff_weights"][key] == pytest.approx(one["cff_weights"][key], abs=1e-4)


def test_detection_on_a_folder_under_torchrun_equals_one_process(trained):
    tmp, data = trained
    folder = tmp / "photos"
    shutil.copytree(f"{data}/val2017", folder)
    (folder / "bad.png").write_bytes(b"not a png")
    args = ["--checkpoint", tmp / "teacher" / "model_final.pth", "--images", folder, "--device", "cpu",
            "--workers", 0, "--eval-batch-size", 2]
    one = last_json(run("evaluate.py", *args, "--output-dir", tmp / "images1"))
    two = last_json(run("evaluate.py", *args, "--output-dir", tmp / "images2", nproc=2))
    assert one["images"] == two["images"] == 6 and one["skipped"] == two["skipped"] == ["bad.png"]
    entries = [json.loads((tmp / d / "detections.json").read_text()) for d in ("images1", "images2")]
    assert [e["file_name"] for e in entries[1]] == sorted(os.listdir(f"{data}/val2017"))
    for a, b in zip(*entries):  # same per-image canvas in 1 and 2 processes: the same detections
        assert a["category_ids"] == b["category_ids"] and a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@pytest.mark.parametrize("target", ["one rank", "the whole job"])
def test_sigterm_under_torchrun_saves_and_every_rank_exits_143(trained, target):
    """What a scheduler sees: the ranks save together and exit 143 (torchrun's summary lists exitcode 143), and
    torchrun itself exits 1: it does not pass 143 through. Rank 0's last line says --resume."""
    tmp, data = trained
    out = tmp / f"sigterm_{target.replace(' ', '_')}"
    args = [*TINY, *data_flags(data), "--checkpoint-period", 100000, "--output-dir", out]
    proc = start("train_teacher.py", *args, "--iters", 100000, nproc=2)
    try:
        wait_for(lambda: (out / "log.jsonl").exists() and len(read_jsonl(out / "log.jsonl")) >= 2, proc)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        if target == "one rank":
            os.kill(int(workers[-1]), signal.SIGTERM)
        else:  # scancel, kill -TERM -PGID: torchrun and both ranks
            os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr[-3000:]
    metrics = json.loads(stdout.strip().splitlines()[-1])  # rank 0's metrics line: stopped, with the signal
    assert metrics["stopped"] and metrics["signal"] == "SIGTERM"
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["iteration"]
    assert saved == metrics["iterations"] > 0
    assert f"interrupted by SIGTERM at iteration {saved}" in stderr and "--resume" in stderr
    if target == "one rank":  # torchrun's summary: each rank it saw fail, with its exit status
        statuses = re.findall(r"exitcode\s*: (-?\d+)", stderr)
        assert statuses and set(statuses) == {"143"}, stderr[-3000:]
    resumed = last_json(run("train_teacher.py", *args, "--iters", saved + 1, "--no-eval", "--resume", nproc=2))
    assert resumed["start_iteration"] == saved and resumed["iterations"] == saved + 1
