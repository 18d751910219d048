"""Maximum-likelihood training by minibatch gradient steps with early stopping.

The loss is the mean negative log-likelihood in data space, -mean[log p_m(z) + log|det dz/dx|],
for one ensemble member m drawn per minibatch (the log-determinant does not depend on the
weights; it is included so that the logged losses are nats per row of the data). After every
epoch the whole ensemble's density is measured on the held-out validation rows; the weights of
the best epoch are kept, and training stops after ``patience`` epochs without improvement.

Under ``torchrun`` each process trains on its shard of every epoch through
DistributedDataParallel (``training.neural``); every shard is cut to the same length so that all
processes take the same number of steps. Validation is computed identically on every process,
so they all stop at the same epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from training.neural import distributed_from_env, progress, seeded_generator


# Elements of one step's widest activation (batch x units) that justify one more CPU thread.
_ELEMENTS_PER_THREAD = 1 << 20


@contextlib.contextmanager
def capped_threads(step_elements: int, device: torch.device) -> Iterator[None]:
    """Fewer intra-op threads for small steps on the CPU (restored afterwards).

    Every op of a minibatch step is an OpenMP parallel region whose threads meet at a barrier;
    the steps here are small (64 rows x 256 units), so a second thread gains little on an idle
    machine and, on shared CPUs, one descheduled thread stalls every op: measured on the 2-core
    shared machine, a 2-feature LARC fit took 77 s on 2 threads against about 1 s on 1 (the GMM
    family found the same for EM).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(before, available, step_elements // _ELEMENTS_PER_THREAD)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_log_likelihood: float = -math.inf


@dataclass
class TrainSettings:
    learning_rate: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    seed: int
    verbose: bool
    desc: str = "fvbn"


def train(net: nn.Module, fit: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
          settings: TrainSettings, device: torch.device) -> TrainResult:
    """Fit ``net`` (forward(z, m) -> log p_m(z) [N]; log_prob(z) -> the ensemble's) in place.

    ``fit`` and ``val`` are (z float32 [n, D], log|det dz/dx| float32 [n]) on ``device``.
    """
    z_fit, ld_fit = fit
    z_val, ld_val = val
    result = TrainResult()
    best_state = copy.deepcopy(net.state_dict())
    widest = max(z_fit.shape[1], getattr(net, "width", 0), getattr(net, "n_outputs", 0))
    with capped_threads(settings.batch_size * widest, device), distributed_from_env(device) as dist:
        if len(z_fit) < dist.world_size:
            raise ValueError(f"{len(z_fit)} training rows cannot be shared among {dist.world_size} processes")
        model = dist.wrap(net, device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate,
                                      weight_decay=settings.weight_decay)
        members = seeded_generator(settings.seed * 7919 + dist.rank)
        n_masks = getattr(net, "n_masks", 1)
        stale = 0
        epochs = progress(range(settings.max_epochs), settings.desc, enabled=settings.verbose and dist.is_main)
        for epoch in epochs:
            model.train()
            rows = dist.shard(len(z_fit), settings.seed * 100_003 + epoch)[: len(z_fit) // dist.world_size]
            rows = torch.as_tensor(rows, device=device)
            total = 0.0
            for start in range(0, len(rows), settings.batch_size):
                batch = rows[start:start + settings.batch_size]
                m = int(torch.randint(n_masks, (1,), generator=members))
                loss = -(model(z_fit[batch], m) + ld_fit[batch]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            train_nll = dist.mean(total / max(len(rows), 1), device)
            net.eval()
            with torch.no_grad():
                val_ll = float((net.log_prob(z_val) + ld_val).mean())
            result.history.append({"epoch": epoch + 1, "train_nll": train_nll, "val_nll": -val_ll})
            if val_ll > result.best_val_log_likelihood:
                result.best_val_log_likelihood, result.best_epoch, stale = val_ll, epoch + 1, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                stale += 1
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(train_nll=f"{train_nll:.2f}", val_nll=f"{-val_ll:.2f}",
                                   best=result.best_epoch)
            if not math.isfinite(train_nll) or stale >= settings.patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return result
