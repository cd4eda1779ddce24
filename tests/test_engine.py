"""msad.engine and msad.checkpoint: optimizer groups, LR schedule, the training loop, checkpoints, resume and
signals (CPU)."""
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from msad import checkpoint, engine, outdir

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import toy_train  # noqa: E402

TOY_SCRIPT = HELPERS / "toy_train.py"


def run_toy(out, iters, hook=None, seed=0, **cfg_kw):
    """Train the toy model in this process; returns (result, model)."""
    model, optimizer, scheduler = toy_train.build(seed=seed)
    cfg = engine.TrainConfig(output_dir=str(out), iters=iters, kind="fcos", args={"iters": iters}, **cfg_kw)
    result = toy_train.train(model, toy_train.make_criterion(hook), model, optimizer, scheduler,
                          toy_train.data_iter_fn(8), cfg)
    return result, model


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- optimizer and schedule

def test_param_groups_no_decay_on_norm_and_frozen_left_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4),
                          nn.Linear(4, 4), nn.Linear(4, 4))
    model[5].requires_grad_(False)
    opt = engine.build_optimizer(model, lr=0.01, weight_decay=1e-4)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    n_listed = sum(len(g["params"]) for g in opt.param_groups)
    assert n_listed == len(wd) == 10  # every trainable param exactly once, frozen ones absent
    for i in (1, 2, 3):  # BatchNorm, GroupNorm, LayerNorm: weight and bias undecayed
        assert wd[id(model[i].weight)] == 0.0 and wd[id(model[i].bias)] == 0.0
    assert wd[id(model[0].weight)] == wd[id(model[4].weight)] == 1e-4
    assert wd[id(model[0].bias)] == wd[id(model[4].bias)] == 1e-4  # biases decay like weights, as released
    assert id(model[5].weight) not in wd
    assert all(g["lr"] == 0.01 and g["momentum"] == 0.9 for g in opt.param_groups)


def test_lr_factor_warmup_and_steps():
    assert engine.lr_factor(0) == pytest.approx(0.001)
    assert engine.lr_factor(250) == pytest.approx(0.5005)
    assert engine.lr_factor(500) == pytest.approx(1.0)
    assert engine.lr_factor(59999) == pytest.approx(1.0)
    assert engine.lr_factor(60000) == pytest.approx(0.1)
    assert engine.lr_factor(79999) == pytest.approx(0.1)
    assert engine.lr_factor(80000) == pytest.approx(0.01)
    assert engine.lr_factor(120000, steps=(120000, 160000)) == pytest.approx(0.1)


def test_scheduler_follows_lr_factor():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = engine.build_scheduler(opt, warmup_iters=4, steps=(6,))
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.01 * engine.lr_factor(i, warmup_iters=4, steps=(6,)) for i in range(8)]
    assert lrs == pytest.approx(expected)


# ----------------------------------------------------------------------------- the loop and logging

def test_loss_goes_down_and_log_has_every_term(tmp_path):
    result, _ = run_toy(tmp_path, iters=60, log_period=10)
    log = read_log(tmp_path)
    assert [r["iter"] for r in log] == [10, 20, 30, 40, 50, 60]
    for r in log:
        assert {"iter", "learning_rate", "loss_mse", "loss_l1", "loss", "time", "data_time", "max_mem_mb"} <= r.keys()
        assert r["loss"] == pytest.approx(r["loss_mse"] + r["loss_l1"])
        assert r["max_mem_mb"] is None  # CPU
    assert np.mean([r["loss"] for r in log[-2:]]) < 0.5 * np.mean([r["loss"] for r in log[:2]])
    assert result["iterations"] == 60 and not result["stopped"]
    assert result["final_loss"] == pytest.approx(log[-1]["loss"])


def test_log_written_at_last_iteration(tmp_path):
    run_toy(tmp_path, iters=7, log_period=3)
    assert [r["iter"] for r in read_log(tmp_path)] == [3, 6, 7]


def test_train_config_rejects_non_plain_args_and_bad_amp(tmp_path):
    with pytest.raises(TypeError, match="out"):
        engine.TrainConfig(output_dir=str(tmp_path), iters=1, kind="fcos", args={"out": tmp_path})
    with pytest.raises(ValueError, match="amp"):
        engine.TrainConfig(output_dir=str(tmp_path), iters=1, kind="fcos", args={}, amp="fp8")
    with pytest.raises(ValueError, match="kind"):
        engine.TrainConfig(output_dir=str(tmp_path), iters=1, kind="detr", args={})


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_clipping_scales_the_true_gradient_to_the_clip_norm(tmp_path, amp):
    """One SGD step with --clip-grad at a tenth of the gradient norm moves the weights by lr x gradient / 10.
    Under fp16 the GradScaler's factor (2**16) must be taken out before clipping, or the step would be 2**16
    times too small."""
    model, optimizer, scheduler = toy_train.build(warmup_iters=0)  # lr 0.05 from the first step
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0  # the step is then the clipped gradient alone
    before = [p.detach().clone() for p in model.parameters()]
    first = next(toy_train.data_iter_fn(8)(0))
    losses = toy_train.make_criterion()(model(first.images), first, 0)  # the batch train() sees first
    grads = torch.autograd.grad(sum(losses.values()), list(model.parameters()))
    norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
    cfg = engine.TrainConfig(output_dir=str(tmp_path), iters=1, kind="fcos", args={}, amp=amp, clip_grad=norm / 10)
    toy_train.train(model, toy_train.make_criterion(), model, optimizer, scheduler, toy_train.data_iter_fn(8), cfg)
    tol = dict(rtol=2e-2, atol=1e-6) if amp == "fp16" else dict(rtol=2e-3, atol=1e-7)  # p0 - p loses digits
    for p, p0, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p0 - p.detach(), 0.05 * g / 10, **tol)
    ckpt = checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")


def test_bf16_autocast_runs_the_step_in_bf16(tmp_path):
    seen = []

    def hook(it, losses):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    run_toy(tmp_path, iters=2, hook=hook, amp="bf16")
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")["scaler"] is None  # no loss scaling in bf16


# ----------------------------------------------------------------------------- checkpoints and resume

def noisy_hook(it, losses):
    """Make the loss depend on all three global RNGs, so exact resume needs every RNG state restored."""
    noise = 1 + 0.01 * (torch.rand(()) + float(np.random.rand()) + random.random())
    return {k: v * noise for k, v in losses.items()}


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_resume_equals_uninterrupted_run(tmp_path, capsys):
    seed_all(0)
    _, straight = run_toy(tmp_path / "straight", iters=12, hook=noisy_hook, checkpoint_period=100)

    seed_all(0)
    first, _ = run_toy(tmp_path / "split", iters=3, hook=noisy_hook, checkpoint_period=100)  # stops mid warm-up
    assert first["iterations"] == 3
    seed_all(99)  # different seeds and initial weights: everything must come from the checkpoint
    second, resumed = run_toy(tmp_path / "split", iters=12, hook=noisy_hook, checkpoint_period=100,
                              resume=True, seed=99)
    assert "continuing at iteration 3" in capsys.readouterr().out
    assert second["start_iteration"] == 3 and second["iterations"] == 12
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    final = torch.load(tmp_path / "split" / "model_final.pth", weights_only=True)
    assert final["iteration"] == 12
    assert all(torch.equal(a, b) for a, b in zip(final["model"].values(), straight.state_dict().values()))


def run_toy_with_aux(out, iters, seed=0, **cfg_kw):
    """The toy model plus an aux module (as the student's adapters): trained by the same optimizer, not in it."""
    torch.manual_seed(seed)
    model, aux = toy_train.ToyNet(), nn.Linear(2, 2)
    optimizer = engine.build_optimizer(nn.ModuleDict({"model": model, "aux": aux}), 0.05)
    scheduler = engine.build_scheduler(optimizer, warmup_iters=2, steps=(1000,))
    cfg = engine.TrainConfig(output_dir=str(out), iters=iters, kind="student", args={}, **cfg_kw)
    result = toy_train.train(lambda x: aux(model(x)), toy_train.make_criterion(), model, optimizer, scheduler,
                          toy_train.data_iter_fn(8), cfg, aux={"adapters": aux})
    return result, model, aux


def test_aux_modules_are_checkpointed_apart_restored_on_resume_and_left_out_of_the_final_model(tmp_path):
    _, straight, straight_aux = run_toy_with_aux(tmp_path / "straight", iters=6, clip_grad=1.0)
    ckpt = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    assert set(ckpt["model"]) == set(straight.state_dict())  # the model alone, as evaluation expects
    assert all(torch.equal(ckpt["aux"]["adapters"][k], v) for k, v in straight_aux.state_dict().items())
    final = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    assert "aux" not in final and set(final["model"]) == set(straight.state_dict())

    run_toy_with_aux(tmp_path / "split", iters=3, clip_grad=1.0)
    _, resumed, resumed_aux = run_toy_with_aux(tmp_path / "split", iters=6, seed=99, resume=True, clip_grad=1.0)
    for a, b in ((straight, resumed), (straight_aux, resumed_aux)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    run_toy(tmp_path / "noaux", iters=2)
    model, optimizer, scheduler = toy_train.build()
    cfg = engine.TrainConfig(output_dir=str(tmp_path / "noaux"), iters=4, kind="fcos", args={}, resume=True)
    with pytest.raises(ValueError, match="no 'adapters' state"):  # a checkpoint saved without them
        toy_train.train(model, toy_train.make_criterion(), model, optimizer, scheduler, toy_train.data_iter_fn(8), cfg,
                     aux={"adapters": nn.Linear(2, 2)})


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    result, _ = run_toy(tmp_path, iters=2, resume=True)
    assert result["start_iteration"] == 0 and result["iterations"] == 2
    assert "a new run starts at iteration 0" in capsys.readouterr().out


def test_resume_refuses_other_kind(tmp_path):
    run_toy(tmp_path, iters=2)
    model, optimizer, scheduler = toy_train.build()
    cfg = engine.TrainConfig(output_dir=str(tmp_path), iters=4, kind="student", args={}, resume=True)
    with pytest.raises(ValueError) as e:
        toy_train.train(model, toy_train.make_criterion(), model, optimizer, scheduler, toy_train.data_iter_fn(8), cfg)
    assert "checkpoint.pth" in str(e.value) and "'fcos'" in str(e.value) and "'student'" in str(e.value)


def test_checkpoints_load_with_weights_only(tmp_path):
    seed_all(0)
    run_toy(tmp_path, iters=4, checkpoint_period=2)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True, map_location="cpu")
    assert {"kind", "model", "optimizer", "scheduler", "scaler", "iteration", "args", "rng_per_rank"} <= ckpt.keys()
    assert ckpt["kind"] == "fcos" and ckpt["iteration"] == 4 and ckpt["scaler"] is None
    assert ckpt["args"] == {"iters": 4}
    (rng,) = ckpt["rng_per_rank"]  # one process: one state
    assert set(rng) == {"torch", "cuda", "numpy", "python"}
    final = torch.load(tmp_path / "model_final.pth", weights_only=True, map_location="cpu")
    assert set(final) == {"kind", "model", "args", "iteration"}
    # the saved RNG states round-trip: restoring them twice gives the same draws
    draws = []
    for _ in range(2):
        checkpoint.set_rng_state(rng, torch.device("cpu"))
        draws.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]))
    assert draws[0] == draws[1]


class Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_load_checkpoint_refuses_malicious_pickle(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    payload = {"kind": "fcos", "model": Evil(marker)}
    with open(path, "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    with pytest.raises(ValueError) as e:
        checkpoint.load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_load_checkpoint_refuses_garbage_and_torn_files(tmp_path):
    run_toy(tmp_path, iters=1)
    good = (tmp_path / "checkpoint.pth").read_bytes()
    for name, data in [("garbage.pth", os.urandom(256)), ("torn.pth", good[: len(good) // 2]),
                       ("list.pth", None)]:
        path = tmp_path / name
        if data is None:
            torch.save([1, 2], path)
        else:
            path.write_bytes(data)
        with pytest.raises(ValueError, match=name):
            checkpoint.load_checkpoint(path)
    with pytest.raises(ValueError, match="'fcos'.*'teacher'"):
        checkpoint.load_checkpoint(tmp_path / "checkpoint.pth", expected_kind="teacher")


def test_non_finite_loss_stops_before_the_step(tmp_path):
    seen = {}

    def hook(it, losses):
        if it == 4:
            seen["sha"] = sha(tmp_path / "checkpoint.pth")  # the last good checkpoint (iteration 4)
            return {"loss_mse": losses["loss_mse"] * float("nan"), "loss_l1": losses["loss_l1"]}

    model, optimizer, scheduler = toy_train.build()
    cfg = engine.TrainConfig(output_dir=str(tmp_path), iters=10, kind="fcos", args={}, checkpoint_period=2)
    with pytest.raises(FloatingPointError) as e:
        toy_train.train(model, toy_train.make_criterion(hook), model, optimizer, scheduler,
                     toy_train.data_iter_fn(8), cfg)
    msg = str(e.value)
    assert "iteration 4" in msg and "loss_mse=nan" in msg and "loss_l1=" in msg
    assert sha(tmp_path / "checkpoint.pth") == seen["sha"]
    ckpt = checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["iteration"] == 4
    # the NaN step never reached the weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt["model"].values()))
    assert not (tmp_path / "model_final.pth").exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"kind": "fcos", "x": torch.ones(3)}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"kind": "fcos", "x": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]
    # same for JSON: a value json cannot encode leaves the old file alone
    checkpoint.write_json_atomic({"ap": 1.0}, tmp_path / "metrics.json")
    with pytest.raises(TypeError):
        checkpoint.write_json_atomic({"ap": object()}, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"ap": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "metrics.json"]


# ----------------------------------------------------------------------------- signals

def test_sigterm_saves_and_returns_in_process(tmp_path):
    def hook(it, losses):
        if it == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result, _ = run_toy(tmp_path, iters=50, hook=hook, checkpoint_period=100, log_period=100)
    assert result["stopped"] and result["iterations"] == 4
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == 4
    assert read_log(tmp_path)[-1]["iter"] == 4
    assert not (tmp_path / "model_final.pth").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_sigint_interrupts_immediately(tmp_path):
    def hook(it, losses):
        if it == 2:
            os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: stop after this iteration...
            os.kill(os.getpid(), signal.SIGINT)  # ...second one: give up now

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path, iters=50, hook=hook, checkpoint_period=100)
    assert signal.getsignal(signal.SIGINT) == before
    assert not (tmp_path / "checkpoint.pth").exists()


def start_toy(out, *extra):
    return subprocess.Popen([sys.executable, str(TOY_SCRIPT), "--output-dir", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=60.0):
    """Wait until `path` exists (the loop is running), failing fast if the process died."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_sigterm_subprocess_checkpoints_and_exits_0(tmp_path):
    proc = start_toy(tmp_path, "--iters", "100000", "--sleep", "0.01", "--log-period", "1",
                     "--checkpoint-period", "100000")
    wait_for(tmp_path / "log.jsonl", proc)  # the loop (and its signal handler) is running
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["stopped"] and 0 < result["iterations"] < 100000
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == result["iterations"]


def test_sigkill_at_random_moments_then_resume(tmp_path, capsys):
    """Kill -9 three times mid-run (checkpointing every iteration); every checkpoint.pth seen is whole,
    and the resumed run ends with the same weights as an uninterrupted one."""
    # >= 2 s of training (100 x 20 ms), so three kill windows of <= 0.4 s never reach the end
    iters, rng = 100, random.Random(0)
    args = ["--iters", str(iters), "--checkpoint-period", "1", "--width", "64", "--sleep", "0.02"]
    ckpt_path = tmp_path / "run" / "checkpoint.pth"
    for life in range(3):
        proc = start_toy(tmp_path / "run", *args, "--resume")
        assert proc.stdout.readline() == "training\n", proc.communicate()  # imports done, train() starting
        if life == 0:
            wait_for(ckpt_path, proc)  # so that at least one resume really happens, even on a slow machine
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "finished before it was killed"
        assert checkpoint.load_checkpoint(ckpt_path, "fcos")["iteration"] < iters  # whole, never torn
    # the last life runs in this process (saves a torch import), reading what the killed ones left
    assert toy_train.main(["--output-dir", str(tmp_path / "run"), *args, "--sleep", "0", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["start_iteration"] > 0
    final = checkpoint.load_checkpoint(tmp_path / "run" / "model_final.pth", "fcos")
    assert final["iteration"] == iters

    toy_train.main(["--output-dir", str(tmp_path / "straight"), *args, "--sleep", "0"])
    straight = checkpoint.load_checkpoint(tmp_path / "straight" / "model_final.pth")
    for name, a in straight["model"].items():
        torch.testing.assert_close(final["model"][name], a, rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- safe runs (issue 14)

def test_a_finished_or_unfinished_run_is_not_replaced_without_overwrite(tmp_path):
    run_toy(tmp_path, iters=3)
    before = sha(tmp_path / "model_final.pth")
    with pytest.raises(FileExistsError, match="finished model") as e:
        run_toy(tmp_path, iters=2)
    assert all(w in str(e.value) for w in ("--resume", "--overwrite", "--output-dir"))
    assert sha(tmp_path / "model_final.pth") == before  # untouched
    (tmp_path / "model_final.pth").unlink()  # what an interrupted run leaves: checkpoint.pth only
    with pytest.raises(FileExistsError, match="unfinished run"):
        run_toy(tmp_path, iters=2)
    with pytest.raises(ValueError, match="give one of them"):
        run_toy(tmp_path, iters=2, resume=True, overwrite=True)
    result, _ = run_toy(tmp_path, iters=2, overwrite=True)  # from scratch, replacing the run
    assert result["start_iteration"] == 0
    assert checkpoint.load_checkpoint(tmp_path / "model_final.pth")["iteration"] == 2
    assert [r["iter"] for r in read_log(tmp_path)] == [2]  # the old run's log lines are gone


def test_second_writer_is_refused_and_unwritable_dir_fails_first(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(out / outdir.LOCK)!r}, 'a+'); f.write('4242\\n'); f.flush()\n"
                               "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # another run's lock: a POSIX record lock
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another run .pid 4242"):
            run_toy(out, iters=1)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "log.jsonl").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not writable"):
        outdir.claim_output_dir(tmp_path / "file" / "out")


def test_nan_lr_never_saves_non_finite_weights(tmp_path):
    model, optimizer, scheduler = toy_train.build(lr=float("nan"))
    cfg = engine.TrainConfig(output_dir=str(tmp_path), iters=1, kind="fcos", args={}, checkpoint_period=1)
    with pytest.raises(FloatingPointError, match="non-finite weights after iteration 1"):
        toy_train.train(model, toy_train.make_criterion(), model, optimizer, scheduler, toy_train.data_iter_fn(8), cfg)
    assert not (tmp_path / "checkpoint.pth").exists() and not (tmp_path / "model_final.pth").exists()


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    checkpoint.save_atomic({"kind": "fcos", "model": {}, "args": {}}, tmp_path / "checkpoint.pth")
    before = sha(tmp_path / "checkpoint.pth")

    def full(obj, f):  # what torch.save into a full disk raises: its writer's error around the OSError
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(checkpoint.DiskFullError, match="disk full.*checkpoint.pth.*previous checkpoint.pth is kept"):
        checkpoint.save_atomic({}, tmp_path / "checkpoint.pth")
    assert sha(tmp_path / "checkpoint.pth") == before and not (tmp_path / ".checkpoint.pth.tmp").exists()
    from msad.cli import run_script

    def main(argv):
        checkpoint.save_atomic({}, tmp_path / "checkpoint.pth")

    with pytest.raises(SystemExit) as e:  # a script reports it in one line, exit status 1
        run_script(main)
    assert e.value.code == 1 and "disk full" in capsys.readouterr().err


class _FullDisk:
    """open() of the msad module under test, where appending to log.jsonl from the `after`-th line on hits a
    full disk (ENOSPC at write time, as a real full disk does); every other file opens as usual."""

    def __init__(self, after: int):
        self.after, self.lines = after, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if str(path).endswith("log.jsonl") and "a" in mode:
            self.lines += 1
            if self.lines >= self.after:
                import errno
                f.close()
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f


def test_a_full_disk_while_appending_the_log_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "open", _FullDisk(after=3), raising=False)
    with pytest.raises(checkpoint.DiskFullError) as e:
        run_toy(tmp_path, iters=10, checkpoint_period=1, log_period=1)
    assert "log.jsonl" in str(e.value) and "the last checkpoint" in str(e.value) and "is kept" in str(e.value)
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")["iteration"] == 2  # before the failed line
    assert len(read_log(tmp_path)) == 2
    from msad.cli import run_script

    def main(argv):
        run_toy(tmp_path, iters=10, checkpoint_period=1, log_period=1, resume=True)

    monkeypatch.setattr(checkpoint, "open", _FullDisk(after=1), raising=False)
    with pytest.raises(SystemExit) as e:  # a script: one line, exit status 1, no traceback
        run_script(main)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: disk full")


def test_resume_with_other_arguments_names_them(tmp_path, capsys):
    def run(width, lr, **kw):
        model, optimizer, scheduler = toy_train.build(width=width, lr=lr)
        cfg = engine.TrainConfig(output_dir=str(tmp_path), iters=3, kind="fcos", resume=True,
                                 args={"width": width, "lr": lr, "workers": 0}, **kw)
        return toy_train.train(model, toy_train.make_criterion(), model, optimizer, scheduler, toy_train.data_iter_fn(8), cfg)

    run(8, 0.05, checkpoint_period=1)
    (tmp_path / "model_final.pth").unlink()
    with pytest.raises(ValueError, match=r"--width 16 \(checkpoint: 8\)") as e:  # shapes differ: cannot load
        run(16, 0.05)
    assert "\n" not in str(e.value) and "--lr" not in str(e.value)
    capsys.readouterr()
    run(8, 0.2)  # loads: the lr differs, and the restored optimizer keeps its own
    err = capsys.readouterr().err
    assert "--lr 0.2 (checkpoint: 0.05)" in err and "keeps --lr 0.05" in err


def test_sigint_is_reported_and_cpu_training_flushes_denormals(tmp_path):
    def hook(it, losses):
        if it == 1:
            os.kill(os.getpid(), signal.SIGINT)

    torch.set_flush_denormal(False)
    try:
        result, _ = run_toy(tmp_path, iters=50, hook=hook)
        assert result["stopped"] and result["signal"] == "SIGINT"
        assert (torch.tensor([1e-40]) * 1.0).item() == 0.0  # a denormal is flushed to zero
    finally:
        torch.set_flush_denormal(False)


def test_checkpoint_without_args_is_refused_in_one_line(tmp_path):
    torch.save({"kind": "teacher", "model": {}}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="missing args"):
        checkpoint.load_checkpoint(tmp_path / "c.pth")
    with pytest.raises(FileNotFoundError, match="does not exist yet: run python train_teacher.py first"):
        checkpoint.load_checkpoint(tmp_path / "model_final.pth", "teacher", made_by="python train_teacher.py")
