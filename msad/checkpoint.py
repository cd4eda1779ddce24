"""Checkpoints: atomic writes, safe loading, RNG state as plain values, save and resume of a training run.

  * files are written atomically (temp file, fsync, rename), so a kill at any moment leaves either the
    previous file or the new one, never a torn file; non-finite weights are never saved;
  * everything saved loads with torch.load(weights_only=True): plain tensors and Python values only;
  * checkpoint.pth holds model, aux modules, optimizer, scheduler, scaler, iteration, args and every rank's
    RNG state, so --resume continues exactly; model_final.pth holds the model, args and iteration only.
"""
import contextlib
import errno
import json
import os
import random
import re
import secrets
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from . import dist
from .outdir import CHECKPOINT, FINAL

# ----------------------------------------------------------------------------- atomic files and checkpoints

class WriteError(OSError):
    """An output file could not be written (full disk, read-only or vanished folder); one line, by cli.run_script."""


class DiskFullError(WriteError):
    """No space left (or quota exceeded) while writing a file."""


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, raised as is or wrapped (torch.save's writer may report it as a RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _temp_name(path: Path) -> Path:
    """A hidden temp file beside `path`, this writer's own: .NAME.HOST.PID.RANDOM.tmp (two processes writing
    one file at once never share one, so neither tears the other's nor reports a false failure)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files of `path` left by writers of this host that died (SIGKILL, power loss)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(socket.gethostname())}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            m = pattern.fullmatch(entry.name)
            if m and not _alive(int(m.group(1))):
                Path(entry.path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_atomic(path, write, before_replace=None) -> None:
    """Write through `write(file)` to a hidden temp file beside `path`, fsync it, then rename over `path`.

    os.replace is atomic on POSIX, so readers (and a resume after SIGKILL) see the old file or the
    new one, never a partial one. On any error, Ctrl-C included, the temp file is removed and `path` is
    untouched; the temp files of killed writers are removed by the next write of the same file.
    `before_replace()` runs once the new file is whole, just before the rename (e.g. to remove a file that
    belongs with the old one).
    """
    path = Path(path)
    _remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        _raise_write_error(e, path, kept)
        raise
    # Make the rename itself durable (a power loss right after could otherwise lose it).
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_write_error(e: BaseException, path, kept: str) -> None:
    """A full disk, or any other OSError of a write, as one WriteError line saying what was kept."""
    if _is_disk_full(e):
        raise DiskFullError(f"disk full (or quota exceeded) while writing {path}; {kept}; free space in "
                            f"{Path(path).parent} and rerun (with --resume to continue a training run)") from None
    if isinstance(e, OSError):
        raise WriteError(f"cannot write {path} ({e.strerror or e}); {kept}") from None


def append_line(path, line: str) -> None:
    """Append one line to a run's log file (log.jsonl), flushed; a full disk is one line naming the checkpoint
    kept beside it."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
    except OSError as e:
        ckpt = Path(path).parent / CHECKPOINT
        _raise_write_error(e, path, f"the last checkpoint {ckpt} is kept" if ckpt.exists()
                           else "no checkpoint was written yet")


def save_atomic(obj, path) -> None:
    """torch.save(obj, path), atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj, path, indent: int | None = 2, before_replace=None) -> None:
    """json.dump(obj, path), atomically (metrics.json, config.json, detections.json)."""
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()), before_replace)


TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save's zip format, and a (legacy) pickle


def load_refusal(path, e: Exception) -> str:
    """Why torch.load(path, weights_only=True) raised `e`, in a few words: a file that is not a torch file at
    all (text, an image) is said not to be one, not given the unpickler's stray message (a text file's is `'101'`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"cannot read it: {err.strerror or err}"
    if not head.startswith(TORCH_FILE_STARTS):
        return f"not a file of torch.save: it starts with {head!r}" if head else "the file is empty"
    reason = (str(e).strip().splitlines() or [""])[0]
    return f"refused by torch.load(weights_only=True): {type(e).__name__}" + (f": {reason}" if reason else "")


def load_checkpoint(path, expected_kind: str | None = None, made_by: str | None = None) -> dict:
    """Load a checkpoint safely (weights_only=True, on CPU).

    Anything that is not a plain checkpoint dict (a pickle that would run code, a torn or garbage
    file) raises a one-line ValueError naming the file; so does a `kind` other than `expected_kind`.
    `made_by` names the command that writes a missing checkpoint (e.g. "python train_teacher.py").
    """
    path = Path(path)
    if not path.is_file():
        hint = f" yet: run {made_by} first (it writes {path.name} into its --output-dir)" if made_by else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise ValueError(f"{path} is not a valid checkpoint ({load_refusal(path, e)})") from None
    missing = [k for k in ("kind", "model", "args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt["args"], dict):
        raise ValueError(f"{path} is not a valid checkpoint (expected a dict with 'kind', 'model' and 'args' "
                         f"fields{', missing ' + ', '.join(missing) if missing and isinstance(ckpt, dict) else ''})")
    if expected_kind is not None and ckpt["kind"] != expected_kind:
        raise ValueError(f"{path} holds a {ckpt['kind']!r} checkpoint, expected {expected_kind!r}")
    return ckpt


# ----------------------------------------------------------------------------- RNG state as plain values

def rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors / lists / ints (weights_only-loadable).

    "cuda" holds this process's own GPU only ([state] or None): asking every visible GPU, as
    get_rng_state_all does, would make each rank touch all the node's GPUs.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))



def _checkpoint(model, optimizer, scheduler, scaler, iteration, cfg, aux) -> dict:
    return {
        "kind": cfg.kind,
        "model": model.state_dict(),
        "aux": {name: m.state_dict() for name, m in aux.items()},  # trained, but not part of the model
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,  # the next iteration to run
        "args": cfg.args,
    }


def check_finite_weights(model, iteration: int, cfg) -> None:
    """Refuse to save NaN / inf weights (e.g. after a non-finite lr); every rank holds the same weights under
    DDP, so all ranks raise together. One host sync: the flags of all tensors are stacked first."""
    tensors = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([v.isfinite().all() for v in tensors.values()]).cpu() if tensors else torch.ones(0)
    if not finite.all():
        name = list(tensors)[int((~finite).nonzero()[0])]
        kept = Path(cfg.output_dir) / CHECKPOINT
        raise FloatingPointError(f"non-finite weights after iteration {iteration} (first: {name}), not saved; "
                                 f"{'the last checkpoint ' + str(kept) + ' is kept' if kept.exists() else 'no checkpoint was written'}")


def save_checkpoint(model, optimizer, scheduler, scaler, iteration, cfg, aux) -> None:
    """Every rank contributes its RNG state (one gather); rank 0 writes; the others wait at a barrier."""
    check_finite_weights(model, iteration, cfg)
    rng_per_rank = dist.all_gather_objects(rng_state(cfg.device))
    if dist.is_main_process():
        ckpt = _checkpoint(model, optimizer, scheduler, scaler, iteration, cfg, aux)
        ckpt["rng_per_rank"] = rng_per_rank  # each rank restores its own on resume
        save_atomic(ckpt, Path(cfg.output_dir) / CHECKPOINT)
    dist.barrier()


def save_final(model, iteration, cfg) -> None:
    check_finite_weights(model, iteration, cfg)
    if dist.is_main_process():
        final = {"kind": cfg.kind, "model": model.state_dict(), "args": cfg.args, "iteration": iteration}
        save_atomic(final, Path(cfg.output_dir) / FINAL)
    dist.barrier()


def resume(model, optimizer, scheduler, scaler, cfg, aux) -> int:
    """Restore from OUTPUT_DIR/checkpoint.pth if cfg.resume and it exists; return the iteration to start at."""
    path = Path(cfg.output_dir) / CHECKPOINT
    main = dist.is_main_process()
    if not cfg.resume:
        return 0
    if not path.is_file():
        if main:
            print(f"resume: no checkpoint at {path} yet: a new run starts at iteration 0, from its initial weights")
        return 0
    ckpt = load_checkpoint(path, expected_kind=cfg.kind)
    differ = _differing_args(ckpt["args"], cfg.args)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:  # another architecture: name the arguments, not 100 lines of tensor shapes
        raise ValueError(f"--resume: {path} was trained with other arguments ({', '.join(differ) or 'same args'}); "
                         f"resume with the checkpoint's arguments, or use --overwrite or another --output-dir "
                         f"to start a new run") from None
    if differ and main:
        # The optimizer's state_dict carries its hyper-parameters, so these two stay the checkpoint's.
        kept = [f"--{k.replace('_', '-')} {ckpt['args'][k]}" for k in ("lr", "weight_decay")
                if any(d.startswith(f"--{k.replace('_', '-')} ") for d in differ)]
        print(f"warning: resume: arguments differ from the checkpoint's: {', '.join(differ)}; the new values "
              f"are used{', except the restored optimizer keeps ' + ' and '.join(kept) if kept else ''}",
              file=sys.stderr)
    for name, module in aux.items():
        if name not in ckpt.get("aux", {}):
            raise ValueError(f"{path} has no {name!r} state to resume (saved by a run with other flags)")
        module.load_state_dict(ckpt["aux"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    rank, per_rank = dist.get_rank(), ckpt["rng_per_rank"]
    if rank < len(per_rank):  # a job resumed with more processes keeps the new ranks' own seeds
        set_rng_state(per_rank[rank], cfg.device)
    if main:
        print(f"resume: loaded {path}, continuing at iteration {ckpt['iteration']} of {cfg.iters}")
    return int(ckpt["iteration"])


# Arguments that may change between a run and its resume without any effect on what is computed.
RESUME_FREE_ARGS = frozenset({"resume", "overwrite", "output_dir", "device", "workers", "log_period",
                              "checkpoint_period", "no_eval", "eval_batch_size", "max_images", "compile", "iters",
                              "batch_per_process"})  # derived: --batch-size over another number of processes


def _differing_args(saved: dict, current: dict) -> list[str]:
    """'--name new (checkpoint: old)' for each argument that differs, except RESUME_FREE_ARGS."""
    keys = sorted((saved.keys() & current.keys()) - RESUME_FREE_ARGS)
    return [f"--{k.replace('_', '-')} {current[k]} (checkpoint: {saved[k]})" for k in keys
            if saved[k] != current[k] and not (isinstance(saved[k], (list, tuple)) and list(saved[k]) == list(current[k] or []))]
