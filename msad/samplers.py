"""Batch samplers and the data loaders built on them.

Training is iteration based (as in detectron2 and the released MSAD code): `TrainBatchSampler` is an
infinite, deterministic stream of batches, so `--resume` at iteration k sees exactly the batches that an
uninterrupted run would have seen, including their augmentation (each sample carries its own aug seed).
Evaluation batches (`EvalBatchSampler`) only hold images of the same padded shape.
"""
import atexit
import itertools
import math
import multiprocessing
import signal
import threading
from functools import partial
from typing import Iterator

import numpy as np
import torch

from .data import collate


class TrainBatchSampler(torch.utils.data.Sampler):
    """Infinite, deterministic, distributed stream of batches of (index, aug_seed) (the detectron2 way).

    Epoch e shuffles with torch.Generator seeded seed + e (the same on every rank), pads to a multiple of
    world_size and gives rank r the indices r::world_size, as DistributedSampler does. With aspect grouping,
    indices fill one bucket per orientation (w >= h, w < h) and a bucket is emitted when full; what is left
    at the end of an epoch carries over, so nothing is dropped. aug_seed is drawn from the same generator
    per (epoch, index). `start_iter` skips that many batches without loading any image, so a resumed run
    continues with exactly the batches of an uninterrupted one.
    """

    def __init__(self, aspect_ratios, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, group_by_aspect: bool = True, start_iter: int = 0):
        ratios = np.asarray(aspect_ratios, dtype=np.float64)  # n, width / height of each image
        self.n = len(ratios)
        self.groups = (ratios < 1).astype(np.int64) if group_by_aspect else None  # 0: w >= h, 1: w < h
        if self.n <= 0 or batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: n={self.n} batch_size={batch_size} rank={rank}/{world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.start_iter = seed, start_iter

    def _epoch(self, epoch: int) -> tuple[list, list]:
        """This rank's (indices, aug_seeds) for one epoch."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)  # n
        aug_seeds = torch.randint(2 ** 62, (self.n,), generator=g)  # n, aug seed of each index this epoch
        total = math.ceil(self.n / self.world_size) * self.world_size
        perm = perm.repeat(math.ceil(total / self.n))[:total]  # pad like DistributedSampler
        mine = perm[self.rank::self.world_size]  # total / world_size
        return mine.tolist(), aug_seeds[mine].tolist()

    def _batches(self) -> Iterator[list]:
        buckets = [[], []]
        for epoch in itertools.count():  # infinite; epochs are only a shuffling unit
            indices, seeds = self._epoch(epoch)
            for i, s in zip(indices, seeds):
                bucket = buckets[self.groups[i] if self.groups is not None else 0]
                bucket.append((i, s))
                if len(bucket) == self.batch_size:
                    yield bucket[:]
                    bucket.clear()

    def __iter__(self) -> Iterator[list]:
        batches = self._batches()
        for _ in range(self.start_iter):  # index arithmetic only: no image is loaded
            next(batches)
        yield from batches


class EvalBatchSampler(torch.utils.data.Sampler):
    """Evaluation batches of one rank: strided shard (no padding, no image twice), grouped by padded shape.

    A batch only holds images whose own padded canvas (`padded_shapes`) is the same, so every image is
    evaluated on exactly the canvas it would get alone: the head's GroupNorm and C-FF's global pooling
    both see the padding, and a bigger canvas would change the detections (the released code evaluates
    one image at a time). Groups keep the order of their first image; on COCO a few shapes cover most
    images, so batches stay full.
    """

    def __init__(self, padded_shapes: np.ndarray, batch_size: int, rank: int, world_size: int):
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad eval sampler arguments: batch_size={batch_size} rank={rank}/{world_size}")
        mine = np.arange(rank, len(padded_shapes), world_size)  # this rank's indices
        if not len(mine):  # more processes than images
            self.batches = []
            return
        _, first, group = np.unique(padded_shapes[mine], axis=0, return_index=True, return_inverse=True)
        group = np.argsort(np.argsort(first))[group.ravel()]  # groups renumbered by first appearance
        order = mine[np.argsort(group, kind="stable")]  # indices grouped, shard order inside a group
        sizes = np.bincount(group, minlength=len(first))  # images per group
        self.batches = [chunk.tolist() for g in np.split(order, np.cumsum(sizes)[:-1])
                        for chunk in np.split(g, range(batch_size, len(g), batch_size))]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: loader workers ignore SIGINT / SIGTERM.

    Ctrl-C, `kill -TERM -PGID` and schedulers (scancel) signal every process of the job. The main process
    then finishes its iteration, saves a checkpoint and shuts the workers down; a worker that died of the
    signal first would make it fail with "DataLoader worker exited unexpectedly" instead, losing the run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def kill_loader_workers() -> None:
    """At interpreter exit (or before os._exit), kill this process's data loader workers (daemon children) that
    are still alive.

    multiprocessing's own exit handler, which runs after this one, stops daemon children with SIGTERM and then
    joins them; ours ignore SIGTERM (above), so after an unexpected exception whose traceback keeps a loader
    alive until exit, that join would wait forever. By then every file is written. torch's SIGCHLD handler,
    which would report the killed workers as a second error, is reset first."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join()


def _loader(dataset, workers: int, size_divisible: int, collate_fn=collate, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        collate_fn=partial(collate_fn, size_divisible=size_divisible), worker_init_fn=_ignore_stop_signals, **kwargs)


def _collate_readable(samples, size_divisible: int = 128):
    """`collate` of the samples that are not None (unreadable images of an ImageFolder); None if none is left."""
    samples = [s for s in samples if s is not None]
    return collate(samples, size_divisible) if samples else None


def build_train_loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, workers: int,
                       size_divisible: int = 128, start_iter: int = 0) -> torch.utils.data.DataLoader:
    """Infinite training loader: iterate it with next(); batch_size is per process."""
    sampler = TrainBatchSampler(dataset.aspect_ratios(), batch_size, rank, world_size, seed, True, start_iter)
    return _loader(dataset, workers, size_divisible, batch_sampler=sampler)


def build_eval_loader(dataset, batch_size: int, rank: int, world_size: int, workers: int,
                      size_divisible: int = 128) -> torch.utils.data.DataLoader:
    """Evaluation loader over this rank's share of the images (strided, no duplicates), in batches of images
    with the same padded shape (EvalBatchSampler). A batch whose images were all unreadable is None."""
    sampler = EvalBatchSampler(dataset.padded_shapes(size_divisible), batch_size, rank, world_size)
    return _loader(dataset, workers, size_divisible, _collate_readable, batch_sampler=sampler)
