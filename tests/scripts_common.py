"""Helpers for the tests that run the three scripts as a user does (subprocesses, torchrun)."""
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny demo model so that a training iteration takes a fraction of a second on 2 CPU cores.
TINY = ["--width", "0.25", "--fpn-channels", "32", "--head-convs", "1", "--train-sizes", "96,128", "--max-size", "160",
        "--test-size", "128", "--workers", "0", "--device", "cpu", "--batch-size", "2", "--log-period", "1",
        "--eval-batch-size", "4"]


def data_flags(root):
    return ["--train-ann", f"{root}/annotations/instances_train2017.json", "--train-images", f"{root}/train2017",
            "--val-ann", f"{root}/annotations/instances_val2017.json", "--val-images", f"{root}/val2017"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script, *args, nproc=1):
    """`run` in the background, in a session of its own (so that a test can signal its process group)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                      str(nproc), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSAD_DIST_TIMEOUT": "60"}
    return subprocess.Popen([*launcher, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, proc, timeout=120):
    """Poll until condition() holds (or fail if `proc` ended first or the time runs out)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def run(script, *args, nproc=1, timeout=240, env=None):
    """Run `script` (under torchrun with gloo when nproc > 1), or a module as `run("-m", "msad.export", ...)`;
    returns the CompletedProcess."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                      str(nproc), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSAD_DIST_TIMEOUT": "60", **(env or {})}
    target = [script] if script == "-m" else [os.path.join(ROOT, script)]
    return subprocess.run([*launcher, *target, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]
