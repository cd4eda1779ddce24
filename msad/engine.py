"""Optimizer, LR schedule, the training loop shared by both stages, and logging.

The teacher (stage 1, and the vanilla FCOS baselines) and the student (stage 2) differ only in the
step they run; `train` is the one loop. The recipe is the released code's (SGD, momentum 0.9, weight decay
1e-4 with none on norm layers, linear warm-up then x0.1 steps).

Robustness contract of `train`:
  * one small all-reduce per iteration carries every loss term plus a stop flag, so all ranks log the
    same global means, stop together on a non-finite loss (before the bad step touches the weights) and
    stop together on SIGTERM / SIGINT (checkpoint saved, return with the signal's name);
  * checkpoints are written atomically and never hold non-finite weights (msad/checkpoint.py);
  * it writes only into an output folder claimed first (msad/outdir.py, by the script before any work): a
    finished or unfinished run is not replaced unless told to (resume / overwrite), the folder is
    test-written and locked against a second writer;
"""
import functools
import json
import math
import signal
import sys
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, dist
from .checkpoint import CHECKPOINT
from .outdir import FINAL, require_claimed

KINDS = ("fcos", "teacher", "student")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG = "log.jsonl"
RUN_FILES = (FINAL, CHECKPOINT, LOG, "metrics.json", "config.json")  # what --overwrite replaces


# ----------------------------------------------------------------------------- optimizer and schedule

def _is_norm(module: nn.Module) -> bool:
    # _NormBase covers BatchNorm*, SyncBatchNorm and InstanceNorm*; FrozenBatchNorm has buffers only.
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD with two param groups: no weight decay on normalisation layers (weight and bias), `weight_decay`
    on everything else (biases included), as released.

    Frozen parameters (requires_grad False) are left out; a parameter shared by two modules appears once.
    """
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            groups.setdefault(0.0 if _is_norm(module) else weight_decay, []).append(p)
    param_groups = [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)


def lr_factor(it: int, warmup_iters: int = 500, warmup_factor: float = 0.001,
              steps=(60000, 80000), gamma: float = 0.1) -> float:
    """LR multiplier at iteration `it` (detectron2's WarmupMultiStepLR with linear warm-up).

    Linear from `warmup_factor` at it=0 to 1 at it=warmup_iters, times gamma for every step <= it.
    """
    warmup = 1.0
    if it < warmup_iters:
        alpha = it / warmup_iters
        warmup = warmup_factor * (1 - alpha) + alpha
    return warmup * gamma ** bisect_right(sorted(steps), it)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_iters: int = 500, warmup_factor: float = 0.001,
                    steps=(60000, 80000), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR over `lr_factor`; the lr used at iteration `it` is base_lr * lr_factor(it)."""
    # A partial (not a lambda) so the scheduler's state_dict stays plain: LambdaLR saves the callable's
    # __dict__, which is empty for a partial.
    fn = functools.partial(lr_factor, warmup_iters=warmup_iters, warmup_factor=warmup_factor,
                           steps=tuple(steps), gamma=gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------- config

def _check_plain(value, where: str) -> None:
    """Raise TypeError if `value` would make a checkpoint unloadable with weights_only=True."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold plain Python values only")


@dataclass
class TrainConfig:
    """What `train` needs besides the model, optimizer, scheduler, step and data."""

    output_dir: str
    iters: int
    kind: str  # "fcos" | "teacher" | "student": stored in checkpoints, checked on resume
    args: dict  # the script's arguments as plain Python values, stored in checkpoints
    checkpoint_period: int = 5000
    log_period: int = 20
    clip_grad: float | None = None  # max global grad norm, None = no clipping
    amp: str = "none"  # "none" | "bf16" | "fp16" (fp16 adds a GradScaler)
    resume: bool = False
    overwrite: bool = False  # train from scratch even if output_dir holds a run (its files are replaced)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        if self.checkpoint_period <= 0 or self.log_period <= 0:
            raise ValueError("checkpoint_period and log_period must be positive")
        self.device = torch.device(self.device)
        # Fail now, not when the first checkpoint of a long run turns out unloadable.
        _check_plain(self.args, "TrainConfig.args")


# ----------------------------------------------------------------------------- signals

class _StopRequest:
    """SIGTERM / SIGINT set a flag that the loop folds into its per-iteration all-reduce.

    The flag is only read between iterations, so a signal never interrupts a step or a checkpoint
    write. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt, as an escape hatch.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = None  # "SIGTERM" / "SIGINT", the first one received by this process
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __enter__(self):
        # signal.signal only works in the main thread; elsewhere the loop simply cannot be signalled.
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


# ----------------------------------------------------------------------------- the loop
class _Logger:
    """Rank 0's log.jsonl: one flushed JSON line per log period with timings averaged since the last line.

    "iter" counts completed iterations (like checkpoint["iteration"]); "learning_rate" is the one the last step
    used (the "lr_" prefix of loss terms means the low-resolution branch).
    """

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.enabled, self.device = enabled, cfg.device
        self.path = Path(cfg.output_dir) / LOG
        self._reset()

    def _reset(self):
        self.n, self.time, self.data_time = 0, 0.0, 0.0

    def tick(self, iter_time: float, data_time: float) -> None:
        self.n += 1
        self.time += iter_time
        self.data_time += data_time

    def write(self, iteration: int, lr: float, terms: dict[str, float]) -> None:
        if not self.enabled:
            return
        mem = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        record = {"iter": iteration, "learning_rate": lr, **terms, "loss": sum(terms.values()),
                  "time": self.time / max(self.n, 1), "data_time": self.data_time / max(self.n, 1),
                  "max_mem_mb": mem}
        checkpoint.append_line(self.path, json.dumps(record))
        self._reset()


def _global_terms(losses: dict[str, torch.Tensor], stop: bool, device: torch.device) -> tuple[dict, bool]:
    """All-reduce [each loss term..., stop flag] once and bring it to the host once.

    Returns the global mean of each term and whether any rank asked to stop. A NaN / inf on any rank
    propagates through the mean, so every rank sees the same non-finite value and stops together.
    """
    # torch.full (not torch.tensor) so no host->device copy, hence no sync, before the one below.
    flag = torch.full((), float(stop), device=device)
    vec = torch.stack([v.detach().float().reshape(()) for v in losses.values()] + [flag])  # (T+1,)
    values = dist.all_reduce_mean(vec).cpu().tolist()  # the one host-device sync per iteration
    return dict(zip(losses.keys(), values[:-1])), values[-1] > 0


def _check_finite(terms: dict[str, float], it: int) -> None:
    if not all(math.isfinite(v) for v in terms.values()):
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        raise FloatingPointError(f"non-finite loss at iteration {it}: {shown}")


def _optimizer_step(total, optimizer, scaler, clip_grad) -> None:
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the model's and aux modules'
    if scaler is None:
        total.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        return
    scaler.scale(total).backward()
    if clip_grad is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
    scaler.update()


def _start_run(model, optimizer, scheduler, cfg: TrainConfig, aux: dict, main: bool):
    """Before the first step: the output folder (rank 0), the fp16 scaler, the resumed state, config.json and the
    log. Returns (scaler or None, the iteration to start from, the logger)."""
    if main:
        require_claimed(cfg.output_dir)  # claimed by the script before any work (runner.claim_output_dir)
        for name in RUN_FILES if cfg.overwrite else ():  # the replaced run: nothing of it may be mistaken for ours
            (Path(cfg.output_dir) / name).unlink(missing_ok=True)
    if cfg.device.type == "cpu":
        # Denormal floats (tiny values, e.g. in the gradients of fresh weights) can slow CPU kernels many times
        # on some x86 CPUs; flushing them to zero leaves the losses unchanged (the demo's first 40 are equal
        # bit for bit). Process-wide, like every CPU tensor op it affects.
        torch.set_flush_denormal(True)
    scaler = torch.amp.GradScaler(cfg.device.type) if cfg.amp == "fp16" else None
    start_iter = checkpoint.resume(model, optimizer, scheduler, scaler, cfg, aux)
    if main:  # the run really starts: its configuration beside it (a refused or failed start leaves the old one)
        checkpoint.write_json_atomic(cfg.args, Path(cfg.output_dir) / "config.json")
    logger = _Logger(cfg, enabled=main)
    if main and start_iter == 0:
        logger.path.unlink(missing_ok=True)  # a run killed before its first checkpoint leaves a stale log
    return scaler, start_iter, logger


def _next_batch(data, it: int, cfg: TrainConfig):
    """The batch of iteration `it`, on the device; an iterator that ends early is an error."""
    try:
        return next(data).to(cfg.device, non_blocking=True)
    except StopIteration:
        raise RuntimeError(f"data iterator ended at iteration {it}, before {cfg.iters}") from None


def _train_step(train_model, criterion, batch, it: int, optimizer, scheduler, scaler, cfg: TrainConfig,
                stop: "_StopRequest") -> tuple[dict, bool, float]:
    """One iteration: outputs = train_model(images), losses = criterion(outputs, batch, it), then the update.
    Returns (global mean of each loss term, whether any rank asked to stop, the lr this step used)."""
    amp_dtype = AMP_DTYPES[cfg.amp]
    with torch.autocast(cfg.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = criterion(train_model(batch.images), batch, it)
    terms, stop_now = _global_terms(losses, stop.requested, cfg.device)  # read after the forward, as late as can be
    _check_finite(terms, it)  # before backward: the weights stay those of the last good step
    lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
    _optimizer_step(sum(losses.values()), optimizer, scaler, cfg.clip_grad)
    scheduler.step()
    return terms, stop_now, lr


def _end_run(model, cfg: TrainConfig, done: int, signal_name: str | None, main: bool) -> None:
    """After the last step: model_final.pth, or after a stop (its checkpoint saved) the line that says so."""
    if signal_name is None:
        checkpoint.save_final(model, done, cfg)
    elif main:
        print(f"stop requested ({signal_name}): saved {Path(cfg.output_dir) / CHECKPOINT} at iteration {done}",
              file=sys.stderr)


def train(train_model, criterion, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, data_iter_fn,
          cfg: TrainConfig, aux: dict | None = None) -> dict:
    """Run iterations [start, cfg.iters) of `train_model`; the one training loop of both stages. Each step is

        outputs = train_model(batch.images); losses = criterion(outputs, batch, iteration)

    train_model: the DDP-wrapped model (the teacher or detector; in stage 2 distill.TrainableStudent).
    criterion(outputs, batch, iteration) -> dict of named scalar losses (teacher_loss.TeacherLoss,
        fcos_loss.FCOSLoss, distill.DistillationLoss); the optimised loss is the sum of the terms.
    model: the unwrapped module that is saved as checkpoint["model"] (the teacher, or the student alone).
    data_iter_fn(start_iter) -> iterator of batches from that iteration on; each batch has .to(device).
    aux: name -> module trained with the model (its parameters in `optimizer`) but not part of it, e.g. the
        student's distillation adapters: saved in checkpoint.pth under "aux", restored on resume, left out
        of model_final.pth.

    The model is put in train mode (FrozenBatchNorm is unaffected). Only rank 0 writes files.

    Returns {"iterations": completed iterations in total, "start_iteration", "final_loss" (global mean
    total loss of the last iteration run, None if none ran), "stopped" (True after SIGTERM/SIGINT),
    "signal" ("SIGTERM" / "SIGINT" when stopped, else None), "time_s"}. Raises FloatingPointError on a
    non-finite loss, before that step changes the weights, and on non-finite weights, before saving them.
    """
    main = dist.is_main_process()
    aux = aux or {}
    scaler, start_iter, logger = _start_run(model, optimizer, scheduler, cfg, aux, main)
    bar = tqdm(total=cfg.iters, initial=start_iter, desc=cfg.kind, dynamic_ncols=True,
               disable=True if not main else None)  # None: tqdm disables itself when not a tty
    for module in (model, *aux.values()):
        module.train()
    t_start = time.perf_counter()
    final_loss, stopped, done = None, False, start_iter

    with _StopRequest() as stop, bar:
        # Only ask for data when there is work: a DataLoader iterator starts its worker processes.
        data = data_iter_fn(start_iter) if start_iter < cfg.iters else iter(())
        for it in range(start_iter, cfg.iters):
            t0 = time.perf_counter()
            batch = _next_batch(data, it, cfg)
            t_data = time.perf_counter() - t0

            terms, stop_now, lr = _train_step(train_model, criterion, batch, it, optimizer, scheduler, scaler, cfg,
                                              stop)

            done = it + 1
            stopped = stop_now and done < cfg.iters  # a stop on the last iteration is just the end
            final_loss = sum(terms.values())
            logger.tick(time.perf_counter() - t0, t_data)
            bar.update(1)
            bar.set_postfix(loss=f"{final_loss:.4f}", refresh=False)
            if done % cfg.log_period == 0 or done == cfg.iters or stopped:
                logger.write(done, lr, terms)
            if done % cfg.checkpoint_period == 0 or done == cfg.iters or stopped:
                checkpoint.save_checkpoint(model, optimizer, scheduler, scaler, done, cfg, aux)
            if stopped:
                break

    signal_name = (stop.signal_name or "SIGTERM") if stopped else None  # a rank told by another: SIGTERM
    _end_run(model, cfg, done, signal_name, main)
    return {"iterations": done, "start_iteration": start_iter, "final_loss": final_loss, "stopped": stopped,
            "signal": signal_name, "time_s": time.perf_counter() - t_start}
