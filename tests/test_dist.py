"""msad.dist: torchrun on CPU/gloo with 2 processes, failure handling, and the one-process case."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

from msad import checkpoint, dist

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import toy_train  # noqa: E402
from scripts_common import free_port  # noqa: E402

TOY_SCRIPT = HELPERS / "toy_train.py"


def torchrun(out, *extra, timeout_env="20", timeout=90):
    """Run the toy script on 2 CPU processes; returns the CompletedProcess (stdout+stderr in .stdout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(TOY_SCRIPT), "--output-dir", str(out), *extra]
    env = {**os.environ, "MSAD_DIST_TIMEOUT": timeout_env}
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one_process(tmp_path):
    """Same global batch of 8: 2 ranks x 4 under DDP == 1 process x 8 (weights and logged global losses)."""
    args = ["--iters", "8", "--global-batch", "8", "--log-period", "2", "--checkpoint-period", "4"]
    proc = torchrun(tmp_path / "ddp", *args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    toy_train.main(["--output-dir", str(tmp_path / "single"), *args])

    ddp = checkpoint.load_checkpoint(tmp_path / "ddp" / "model_final.pth", "fcos")
    single = checkpoint.load_checkpoint(tmp_path / "single" / "model_final.pth", "fcos")
    assert ddp["iteration"] == single["iteration"] == 8
    for name, w in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], w, rtol=0, atol=1e-5, msg=name)
    # logged values are means over ranks, i.e. the single-process losses
    assert read_losses(tmp_path / "ddp") == pytest.approx(read_losses(tmp_path / "single"), abs=1e-5)


def test_failing_rank_fails_the_whole_job(tmp_path):
    start = time.monotonic()
    proc = torchrun(tmp_path, "--iters", "20", "--fail-rank", "1", "--fail-iter", "2")
    assert proc.returncode != 0
    assert "fails on purpose at iteration 2" in proc.stdout
    assert time.monotonic() - start < 90
    assert not (tmp_path / "model_final.pth").exists()


def test_missing_rank_times_out_instead_of_hanging(monkeypatch):
    """Rank 0 of a 2-process job whose rank 1 never shows up gives up after MSAD_DIST_TIMEOUT seconds."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port()), "MSAD_DIST_TIMEOUT": "2"}.items():
        monkeypatch.setenv(k, v)
    start = time.monotonic()
    with pytest.raises(RuntimeError):  # torch's DistStoreError is a RuntimeError
        dist.init_distributed("cpu")
    assert time.monotonic() - start < 20
    assert not torch.distributed.is_initialized()


def test_check_batch_size():
    assert dist.check_batch_size(16, 2) == 8
    assert dist.check_batch_size(16, 1) == 16
    with pytest.raises(ValueError, match="16.*3"):
        dist.check_batch_size(16, 3)
    with pytest.raises(ValueError):
        dist.check_batch_size(0, 2)


def test_single_process_helpers(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    info = dist.init_distributed("auto")
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 1, True)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()  # plain `python script.py` needs no process group
    assert (dist.get_rank(), dist.get_world_size(), dist.is_main_process()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_mean(t), t) and torch.equal(dist.all_reduce_sum(t), t)
    assert dist.all_gather_objects({"a": 1}) == [{"a": 1}]
    dist.barrier()
    dist.cleanup()
