"""What every gradient-trained family shares: device, seeding, progress, data-parallel training.

Data parallelism follows torch's own recipe rather than a scheduler of ours: run the same
command under ``torchrun --nproc_per_node=N``; each process reads RANK/WORLD_SIZE/LOCAL_RANK
from the environment, joins the process group (NCCL on GPUs, gloo on CPU), wraps its module in
DistributedDataParallel and sees its own shard of every epoch (``shard``). Gradients are
averaged by DDP, so N processes with batch B train like one with batch N·B. Only rank 0 logs,
evaluates and publishes (``is_main``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

T = TypeVar("T")


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" takes the GPU when one is usable (under torchrun, the process's LOCAL_RANK GPU)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {requested!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if not requested.startswith(("cpu", "cuda")):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {requested!r}")
    return torch.device(requested)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DDP-wrap under torchrun; the module itself otherwise."""
        if not self.active:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def shard(self, n: int, epoch_seed: int) -> np.ndarray:
        """This rank's row indices of one epoch: the same permutation everywhere, split by rank."""
        order = np.random.default_rng(epoch_seed).permutation(n)
        return order[self.rank::self.world_size]

    def mean(self, value: float, device: torch.device) -> float:
        """Average a scalar (e.g. an epoch's loss) over the ranks."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size


@contextmanager
def distributed_from_env(device: torch.device) -> Iterator[Distributed]:
    """Join the torchrun process group for the duration of a fit (no-op outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield Distributed(dist.get_rank() if dist.is_initialized() else 0,
                          dist.get_world_size() if dist.is_initialized() else 1)
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def torchrun_rank() -> int:
    """This process's RANK under torchrun, 0 otherwise. Read from the environment, so it holds
    before, during and after the process group: the pipeline leaves evaluating, calibrating and
    publishing to rank 0 once the fit (and its group) is over."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def single_process() -> Iterator[None]:
    """Run the block as one process even under torchrun (WORLD_SIZE=1 while it runs).

    After a data-parallel fit the other ranks leave and rank 0 evaluates and publishes alone;
    a fit in there (a calibration refit) must not wait in ``distributed_from_env`` for ranks
    that are gone.
    """
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on stderr for interactive runs; silent when disabled (tests, non-main ranks)."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True)


@contextmanager
def capped_threads(work: int, device: torch.device | None = None, per_thread: int = 1 << 20) -> Iterator[None]:
    """Fewer intra-op CPU threads while the work per operation is small (restored afterwards).

    ``work`` is the size of one step's operations (rows x features, or a batch's widest
    activation); a thread is granted per ``per_thread`` of it, at least one, never more than the
    CPUs this process may use. Why: every op is an OpenMP region whose threads meet at a barrier,
    so on shared cores one descheduled thread stalls them all. Measured on the 2-core machine
    under load: GMM "auto" on digits 70-108 s on 2 threads vs 5-6 s on 1; a LARC fit 77 s vs 1 s;
    the CycleGAN demo 377 CPU-s vs 43. On an idle machine 2 threads gained well under 2x. GPUs
    are untouched.
    """
    if device is not None and device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(before, available, work // per_thread)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
