"""A toy training problem for the engine / dist tests, importable and runnable as a script.

    python tests/helpers/toy_train.py --output-dir OUT --iters 20            # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/toy_train.py --output-dir OUT ...

The model is a small conv net with GroupNorm (per-sample, so a DDP run over 2 x B/2 images matches one
process over B images); batch `it` of the global stream is a pure function of `it`, so runs are
deterministic on CPU and resumable at any iteration.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import msad`
from msad import dist, engine, outdir  # noqa: E402


@dataclass
class ToyBatch:
    images: torch.Tensor  # (B, 3, 8, 8)
    targets: torch.Tensor  # (B, 2)

    def to(self, device, non_blocking=False):
        return ToyBatch(self.images.to(device, non_blocking=non_blocking),
                        self.targets.to(device, non_blocking=non_blocking))


class ToyNet(nn.Module):
    """conv -> GroupNorm -> ReLU -> conv -> mean pool -> linear; `width` grows the checkpoint."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.conv2 = nn.Conv2d(width, hidden, 3, padding=1)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x):
        x = F.relu(self.norm(self.conv1(x)))
        return self.fc(self.conv2(x).mean(dim=(2, 3)))  # (B, 2)


def make_batch(it: int, batch_size: int) -> ToyBatch:
    """Global batch number `it`: random images, targets a fixed function of the channel means."""
    g = torch.Generator().manual_seed(1000 + it)
    images = torch.randn(batch_size, 3, 8, 8, generator=g)
    w = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.5]])
    return ToyBatch(images, images.mean(dim=(2, 3)) @ w * 4)


def data_iter_fn(global_batch: int, rank: int = 0, world_size: int = 1):
    """data_iter_fn(start_iter) for engine.train: this rank's slice of each global batch from start_iter on."""
    per = global_batch // world_size

    def make(start_iter):
        it = start_iter
        while True:
            b = make_batch(it, global_batch)
            yield ToyBatch(b.images[rank * per:(rank + 1) * per], b.targets[rank * per:(rank + 1) * per])
            it += 1

    return make


def make_criterion(hook=None):
    """Two named loss terms, as the detector's loss dict; `hook(it)` may raise, sleep, return a loss override."""

    def criterion(pred, batch, it):
        losses = {"loss_mse": F.mse_loss(pred, batch.targets), "loss_l1": 0.1 * F.l1_loss(pred, batch.targets)}
        if hook is not None:
            losses = hook(it, losses) or losses
        return losses

    return criterion


def train(train_model, criterion, model, optimizer, scheduler, data, cfg, **kw):
    """engine.train after claiming the output folder, as the scripts do first (runner.claim_output_dir)."""
    if dist.is_main_process():
        outdir.claim_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
    return engine.train(train_model, criterion, model, optimizer, scheduler, data, cfg, **kw)


def build(lr=0.05, width=8, warmup_iters=5, steps=(1000,), seed=0):
    torch.manual_seed(seed)
    model = ToyNet(width)
    optimizer = engine.build_optimizer(model, lr)
    scheduler = engine.build_scheduler(optimizer, warmup_iters=warmup_iters, steps=steps)
    return model, optimizer, scheduler


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--checkpoint-period", type=int, default=5)
    p.add_argument("--log-period", type=int, default=5)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per iteration (to be killed mid-run)")
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank raises at --fail-iter")
    p.add_argument("--fail-iter", type=int, default=2)
    p.add_argument("--hang-rank", type=int, default=-1, help="this rank never joins the training loop")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = dist.init_distributed("cpu")
    per_rank = dist.check_batch_size(args.global_batch, info.world_size)
    model, optimizer, scheduler = build(width=args.width)
    forward_model = model
    if info.world_size > 1:
        forward_model = nn.parallel.DistributedDataParallel(model)

    def hook(it, losses):
        if info.rank == args.fail_rank and it == args.fail_iter:
            raise RuntimeError(f"rank {info.rank} fails on purpose at iteration {it}")
        if args.sleep:
            time.sleep(args.sleep)

    if info.rank == args.hang_rank:
        time.sleep(600)  # never reaches the loop's first all-reduce; the others must time out
    cfg = engine.TrainConfig(output_dir=args.output_dir, iters=args.iters, kind="fcos", args=vars(args),
                             checkpoint_period=args.checkpoint_period, log_period=args.log_period,
                             resume=args.resume, device=info.device)
    print("training", flush=True)
    result = train(forward_model, make_criterion(hook), model, optimizer, scheduler,
                          data_iter_fn(args.global_batch, info.rank, info.world_size), cfg)
    if info.is_main:
        print(json.dumps({"per_rank_batch": per_rank, **result}), flush=True)
    dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
