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

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from training.neural import capped_threads, distributed_from_env, progress, seeded_generator


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
