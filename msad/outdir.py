"""The output folder of a training run: claimed before any work, so that no finished work is lost.

A fresh run refuses a folder that holds a finished model or an unfinished run (the user chooses: --resume,
--overwrite, or another --output-dir); the folder is created and test-written in the first second rather
than at the first checkpoint; a lock file keeps a second run from writing into it at the same time.
"""
import fcntl
import os
from pathlib import Path

CHECKPOINT = "checkpoint.pth"
FINAL = "model_final.pth"
LOCK = ".lock"

_LOCKS: dict[str, object] = {}  # output folder -> open lock file, locked until this process exits


def check_output_dir(output_dir, resume: bool, overwrite: bool) -> None:
    """Refuse (one line, nothing touched) to start a fresh run where a finished or unfinished one lives.

    Read-only, so every rank can call it before the process group exists and all fail alike.
    """
    out = Path(output_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it: give one of them")
    if resume or overwrite:
        return
    for name, what in ((FINAL, "a finished model"), (CHECKPOINT, "an unfinished run")):
        if (out / name).is_file():
            raise FileExistsError(f"{out} already holds {what} ({out / name}); add --resume to continue it, "
                                  f"--overwrite to train again from scratch and replace it, or choose "
                                  f"another --output-dir")


def claim_output_dir(output_dir, resume: bool = False, overwrite: bool = False) -> None:
    """Before any work (rank 0): the refusal above, then create and test-write the folder and lock it against
    a second writer. The lock is a POSIX record lock (fcntl.lockf): it belongs to this process alone, so data
    loader workers forked later do not hold it, and it is released when this process exits, however it exits,
    even on SIGKILL (an flock would live on in the workers for seconds). A second call for the same folder
    checks again and keeps its lock. engine.train, which requires the claim, removes an overwritten run's files
    just before its first step.
    """
    check_output_dir(output_dir, resume, overwrite)
    lock_output_dir(output_dir)


def lock_output_dir(output_dir) -> None:
    """Create and test-write `output_dir` and hold OUTPUT_DIR/.lock until this process exits (a second process
    locking it is refused in one line naming the holder's pid); training runs and evaluate.py both take it."""
    out = Path(output_dir)
    if str(out.resolve()) not in _LOCKS:
        _LOCKS[str(out.resolve())] = _lock_and_test(out)


def require_claimed(output_dir) -> None:
    """engine.train writes only into a folder this process claimed first (claim_output_dir, before any work)."""
    if str(Path(output_dir).resolve()) not in _LOCKS:
        raise RuntimeError(f"{output_dir}: claim the output folder (outdir.claim_output_dir) before training into it")


def test_write(folder) -> None:
    """Write, fsync and remove a hidden file in `folder`, as checkpoints and outputs are written (OSError if not)."""
    path = Path(folder) / ".write-test"
    with open(path, "wb") as f:
        f.write(b"msad")
        os.fsync(f.fileno())
    path.unlink()


def _lock_and_test(out: Path):
    """Create `out`, take OUT/.lock (lockf, non-blocking), write and fsync a test file; returns the lock file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")
    except OSError as e:
        raise ValueError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise ValueError(f"--output-dir {out} is in use by another run (pid {owner} holds {out / LOCK}); "
                         f"wait for it to end or choose another --output-dir") from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        test_write(out)
    except OSError as e:
        lock.close()
        raise ValueError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    return lock
