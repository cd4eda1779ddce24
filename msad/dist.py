"""torchrun / DDP helpers, in one small module (as torchvision's references/detection/utils.py).

`torchrun --nproc_per_node N script.py` sets RANK / LOCAL_RANK / WORLD_SIZE (and the rendezvous
MASTER_ADDR / MASTER_PORT); a plain `python script.py` is the one-process case of the same code and
never creates a process group. Every helper below works in both cases, so callers never branch on
"am I distributed?".
"""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" -> this process's GPU (cuda:LOCAL_RANK)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return torch.device(device)
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _timeout(timeout_s: float | None) -> timedelta:
    """Bounded collective timeout: a rank that dies makes the others fail instead of hanging forever."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("MSAD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    return timedelta(seconds=timeout_s)


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Read the torchrun environment, pick the device and (when world > 1) create the process group.

    Backend nccl on CUDA, gloo on CPU. `timeout_s` (default: env MSAD_DIST_TIMEOUT, else 1800 s) bounds
    every collective; on CUDA the timeout is enforced by NCCL's asynchronous error handling, which is
    on by default in current PyTorch.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = _resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        cuda = dev.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_timeout(timeout_s),
                                device_id=dev if cuda else None)  # device_id binds NCCL to our GPU up front
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor; `t` is left alone). Identity when not distributed.

    Every rank must call it with a tensor of the same shape, or the job hangs until the timeout.
    """
    if get_world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (sum / world size). Identity when not distributed."""
    world = get_world_size()
    if world == 1:
        return t
    return all_reduce_sum(t) / world


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] when not distributed."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group (if any), so the process exits without NCCL/gloo warnings."""
    if _distributed():
        dist.destroy_process_group()


def check_batch_size(global_batch: int, world_size: int) -> int:
    """Per-process batch for a global batch split evenly over `world_size` processes."""
    if global_batch <= 0 or world_size <= 0 or global_batch % world_size:
        raise ValueError(f"global batch size {global_batch} cannot be split evenly over {world_size} processes; "
                         f"use a positive multiple of {world_size}")
    return global_batch // world_size
