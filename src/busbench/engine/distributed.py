"""Data-parallel training across processes: ``torchrun --nproc_per_node N -m busbench train ...``.

torchrun starts N copies of the command and tells each its place through environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`setup` reads them and joins the process
group (NCCL when training on CUDA, one GPU per process; gloo on the CPU). Without those variables, or with
``WORLD_SIZE=1``, everything here is a no-op and training runs in one process as usual.

What stays the same as a single-process run of the same config:

* ``train.batch_size`` is the *global* batch: each of the N processes takes ``batch_size / N`` images per step
  (it must divide evenly), so the number of steps per epoch, the learning-rate schedule, the config hash and the
  run folder do not depend on how many processes train it, and a checkpoint written by one resumes in the other.
* The training order and the per-sample augmentation seeds come from the one :class:`~busbench.data.loader.EpochSampler`
  stream of ``(train.seed, epoch)``; :class:`ShardedEpochSampler` cuts every global batch of that stream into N
  consecutive blocks, block r going to rank r. Global batch j therefore holds exactly the images, with exactly the
  augmentations, of batch j of the single-process run.
* Gradients are averaged across processes (DistributedDataParallel). For losses that are means over images and
  pixels (``bce``, ``focal``) this is the single-process gradient; Dice-type losses are computed over each process's
  share of the batch, as with gradient accumulation.
* BatchNorm: on CUDA the layers become SyncBatchNorm (statistics over the global batch, as in one process);
  torch has no SyncBatchNorm on the CPU, so there each process normalises its own share and rank 0's running
  statistics are used (DDP broadcasts them every step) - a CPU multi-process run of a BatchNorm model is close to,
  not equal to, the single-process run.
* Validation is split into N contiguous blocks of the validation fold; the per-image rows are gathered in order,
  so ``val_per_image.csv``, the best epoch and early stopping are those of a single process (every rank receives
  the full table and takes the same decisions).
* Only rank 0 writes files (checkpoints, logs, ``run.json``, ``done.json``, TensorBoard, the data cache, which it
  builds while the others wait); the ranks meet at a barrier before a fold starts and after it is finished. Resume
  reads the same ``checkpoint_last.pt`` on every rank; it holds each rank's CUDA generator state, and each rank
  restores its own.
* With ``train.accumulate > 1`` the micro-batches before a step's last run under ``no_sync``
  (:func:`gradient_sync`): one all-reduce per optimiser step. ``train.compile`` compiles the DDP-wrapped model.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from busbench.data.loader import EpochSampler, make_loader
from busbench.errors import ConfigError
from busbench.locking import locked

#: how long a collective may wait for the slowest rank (a fold's validation or checkpoint write happens in between)
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs progress."""
        return self.rank == 0


_SINGLE = DistContext()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer"
        ) from None


def context() -> DistContext:
    """The running process group's context, or a single-process one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _SINGLE


def setup(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (idempotent); single-process when not launched by torchrun.

    On CUDA each process takes GPU ``LOCAL_RANK`` (made the current device, so ``torch.device("cuda")`` is that GPU).
    """
    world = env_world_size()
    if world <= 1:
        return context()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun (one process)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"torchrun started process LOCAL_RANK={local_rank} but only {visible} GPU(s) are visible; "
                f"use --nproc_per_node {visible} or fewer"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
        if device.type == "cuda":
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
        atexit.register(shutdown)
    ctx = context()
    if not ctx.is_main:
        logging.getLogger("busbench").setLevel(logging.WARNING)  # progress is logged once, by rank 0
    return ctx


def check_config(cfg: Any) -> None:
    """Settings a multi-process run cannot honour: refused by every rank before the ranks connect, so the error is
    the only message (no rank is left waiting for one that stopped)."""
    world = env_world_size()
    if world <= 1:
        return
    per_rank_batch(cfg.train.batch_size, world)
    if cfg.train.strategy != "standard":
        raise ConfigError(
            f"config key 'train.strategy' is {cfg.train.strategy!r}, which trains extra networks with their own "
            "optimisers; multi-process (torchrun) training supports train.strategy=standard only - run it in one process"
        )


def shutdown() -> None:
    """Leave the process group (registered at exit by :func:`setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_lock(folder: Path) -> contextlib.AbstractContextManager:
    """The folder lock of :mod:`busbench.locking`, held by rank 0 for all ranks (one lock per training job)."""
    return locked(folder) if context().is_main else contextlib.nullcontext()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    ctx = context()
    if not ctx.active:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a decision only rank 0 can make, such as whether a file exists)."""
    if not context().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over the ranks (itself in one process); every rank gets the result."""
    ctx = context()
    if not ctx.active:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def gather_frames(frame: pd.DataFrame) -> pd.DataFrame:
    """Every rank's rows concatenated in rank order, on every rank (the frame itself in one process)."""
    ctx = context()
    if not ctx.active:
        return frame
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, frame)
    return pd.concat([p for p in parts if p is not None and len(p)], ignore_index=True)


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list concatenated in rank order, on every rank."""
    ctx = context()
    if not ctx.active:
        return items
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# ------------------------------------------------------------------------------------------------ samplers


class ShardedEpochSampler(EpochSampler):
    """This rank's share of :class:`EpochSampler`'s ``(index, seed)`` stream.

    The full stream of an epoch is cut into global batches of ``batch_size * world_size`` pairs, and each global
    batch into ``world_size`` consecutive blocks of ``batch_size``; rank r yields block r of every global batch.
    With ``drop_last`` a trailing partial global batch is dropped (a single process drops its partial batch of
    the same size); otherwise the stream is padded by repeating it from the start until it fills whole global
    batches, so every rank takes the same number of steps.
    """

    def __init__(
        self,
        n: int,
        shuffle: bool,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        drop_last: bool,
        indices: Sequence[int] | None = None,
    ):
        super().__init__(n, shuffle, seed, indices)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)

    def _total(self) -> int:
        step = self.batch_size * self.world_size
        if self.n == 0:
            return 0
        return (self.n // step) * step if self.drop_last else math.ceil(self.n / step) * step

    def __len__(self) -> int:
        return self._total() // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pairs = list(super().__iter__())
        total = self._total()
        if total > len(pairs) and pairs:
            pairs = [pairs[i % len(pairs)] for i in range(total)]
        pairs = pairs[:total]
        b, step = self.batch_size, self.batch_size * self.world_size
        for start in range(0, total, step):
            yield from pairs[start + self.rank * b : start + (self.rank + 1) * b]


class BlockSampler(EpochSampler):
    """Rank r's contiguous block of an unshuffled pass (validation): blocks in rank order give the whole set."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int):
        super().__init__(n, False, seed)
        per = math.ceil(n / world_size) if n else 0
        self.start, self.stop = min(n, rank * per), min(n, (rank + 1) * per)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pairs = list(super().__iter__())
        yield from pairs[self.start : self.stop]


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """``train.batch_size`` split over the ranks; it must divide evenly (so the global batch stays as configured)."""
    if global_batch % world_size:
        lower = (global_batch // world_size) * world_size
        options = [v for v in (lower, lower + world_size) if v > 0]
        raise ConfigError(
            f"config key 'train.batch_size' is {global_batch}, the global batch over {world_size} processes; it must "
            f"be a multiple of {world_size} (e.g. {' or '.join(str(v) for v in options)}), or change --nproc_per_node"
        )
    return global_batch // world_size


def train_loader(
    ctx: DistContext,
    dataset: Dataset,
    global_batch: int,
    seed: int,
    num_workers: int,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """This rank's training loader: global batch j of the single-process order, block ``ctx.rank``.

    ``indices`` lists an epoch's items when they are not ``range(len(dataset))`` (oversampling).
    """
    b = per_rank_batch(global_batch, ctx.world_size)
    sampler = ShardedEpochSampler(
        len(dataset),  # type: ignore[arg-type]
        shuffle=True,
        seed=seed,
        batch_size=b,
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=len(dataset) >= global_batch,  # type: ignore[arg-type]  # the single-process rule
        indices=indices,
    )
    return make_loader(dataset, b, shuffle=True, seed=seed, num_workers=num_workers, sampler=sampler)


def eval_loader(
    ctx: DistContext, dataset: Dataset, batch_size: int, seed: int, num_workers: int
) -> DataLoader:
    """This rank's contiguous block of ``dataset``, unshuffled, for scoring."""
    sampler = BlockSampler(len(dataset), seed, ctx.rank, ctx.world_size)  # type: ignore[arg-type]
    return make_loader(
        dataset, batch_size, shuffle=False, seed=seed, num_workers=num_workers, sampler=sampler
    )


# ------------------------------------------------------------------------------------------------ model


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Before wrapping: BatchNorm -> SyncBatchNorm on CUDA (torch has no CPU SyncBatchNorm)."""
    if context().active and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(module: nn.Module, device: torch.device, accumulate: int = 1) -> nn.Module:
    """``module`` in DistributedDataParallel (itself in one process).

    Some models hold layers a configuration never uses (auxiliary heads with deep supervision off), so DDP must
    know which parameters receive no gradient. Without gradient accumulation a static graph lets it learn that set
    once, in the first step. With ``train.accumulate > 1`` the micro-batches before the last one run under
    :func:`gradient_sync` (``no_sync``), which DDP's static graph does not support in torch 2.x (it fails in the
    first backward, or stops all-reducing after it), so the unused set is searched every step instead
    (``find_unused_parameters``).
    """
    if not context().active:
        return module
    device_ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    if accumulate > 1:
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, static_graph=True)


def _ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper of a training forward (also inside ``torch.compile``), or None."""
    module = getattr(module, "_orig_mod", module)
    return module if isinstance(module, nn.parallel.DistributedDataParallel) else None


def gradient_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward and backward: gradients are all-reduced only when ``sync``.

    With gradient accumulation only the last micro-batch of an optimiser step needs the all-reduce; the others
    accumulate locally under DDP's ``no_sync`` (the summed gradient is the same, with one all-reduce per step
    instead of one per micro-batch). A no-op in one process.
    """
    ddp = _ddp(module)
    return contextlib.nullcontext() if sync or ddp is None else ddp.no_sync()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper and ``torch.compile`` (for forward passes only one rank
    makes, which must not run DDP's collectives)."""
    ddp = _ddp(module)
    return ddp.module if ddp is not None else module
