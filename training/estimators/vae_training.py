"""Training the VAE: minibatch Adam on the negative ELBO (or IWAE bound), early-stopped on held-out rows.

Each step draws fresh reparameterisation noise eps ~ N(0, I) from a seeded generator and
maximises the mean per-row bound (``VAECore.training_objective``): the ELBO with the closed-form
KL when ``train_samples`` is 1, the importance-weighted bound IWAE_k otherwise. With a KL warm-up
of W epochs the KL term is weighted e / W in epoch e = 0, 1, ... (1 from epoch W): the decoder learns
to use z before the KL can pull q(z|x) onto the prior (the losses logged meanwhile are not
bounds; the validation figure below always is), and training does not stop before it ends.
After every epoch
the model's density — the importance-weighted estimate with ``val_samples`` samples from *fixed*
noise, so that epochs are compared on equal terms; of log p(x | c) at the true class for a
conditional model — is measured on the validation rows;
the weights of the best epoch are kept, and training stops after ``patience`` epochs without
improvement.

Under ``torchrun`` each process trains on its shard of every epoch through
DistributedDataParallel (``training.neural``): every shard is cut to the same length so all
processes take the same number of steps, and validation is computed identically everywhere
(same rows, same fixed noise, identical weights), so all processes stop at the same epoch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from training.estimators.vae_core import VAECore, VAETrainer
from training.neural import capped_threads, distributed_from_env, progress, seeded_generator


@dataclass
class TrainSettings:
    learning_rate: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    train_samples: int
    kl_warmup: int
    seed: int
    verbose: bool
    val_samples: int = 16


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_log_likelihood: float = -math.inf


def validation_log_likelihood(core: VAECore, x: torch.Tensor, eps: torch.Tensor,
                              onehot: torch.Tensor | None) -> torch.Tensor:
    """IWAE estimate per row: of log p(x) (the served score) for an unconditional model; of
    log p(x | c) at the true class for a conditional one (C times cheaper than marginalising)."""
    if onehot is None:
        return core.log_prob(x, eps)
    return core.training_objective(x, eps, onehot)


def train(core: VAECore, fit: tuple[torch.Tensor, torch.Tensor | None],
          val: tuple[torch.Tensor, torch.Tensor | None], settings: TrainSettings,
          device: torch.device) -> TrainResult:
    """Fit ``core`` in place. ``fit``/``val`` are (rows float32 [n, D], one-hot labels or None)."""
    x_fit, onehot_fit = fit
    x_val, onehot_val = val
    latent = core.latent_dim
    fixed = seeded_generator(settings.seed * 7919 + 1, device)
    eps_val = torch.randn(len(x_val), settings.val_samples, latent, generator=fixed, device=device)
    eps1_val = torch.randn(len(x_val), latent, generator=fixed, device=device)
    result = TrainResult()
    best_state = copy.deepcopy(core.state_dict())
    # one step's widest activation: a batch of decoder outputs (3 mixture parameters per feature
    # and component) or of hidden units; small steps run on one CPU thread (see capped_threads)
    widest = max(core.n_features * 3 * core.decoder.components, core.encoder.head[0].out_features)
    work = settings.batch_size * max(1, settings.train_samples) * widest
    with capped_threads(work, device), distributed_from_env(device) as dist:
        model = dist.wrap(VAETrainer(core), device)
        optimizer = torch.optim.Adam(core.parameters(), lr=settings.learning_rate,
                                     weight_decay=settings.weight_decay)
        noise = seeded_generator(settings.seed * 7919 + 2 + dist.rank, device)
        shape = (settings.train_samples, latent) if settings.train_samples > 1 else (latent,)
        stale = 0
        epochs = progress(range(settings.max_epochs), "vae", enabled=settings.verbose and dist.is_main)
        for epoch in epochs:
            model.train()
            rows = dist.shard(len(x_fit), settings.seed * 100_003 + epoch)[: len(x_fit) // dist.world_size]
            rows = torch.as_tensor(rows, device=device)
            kl_weight = min(1.0, epoch / settings.kl_warmup) if settings.kl_warmup else 1.0
            total = 0.0
            for start in range(0, len(rows), settings.batch_size):
                batch = rows[start:start + settings.batch_size]
                eps = torch.randn(len(batch), *shape, generator=noise, device=device)
                onehot = onehot_fit[batch] if onehot_fit is not None else None
                loss = -model(x_fit[batch], eps, onehot, kl_weight).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            train_loss = dist.mean(total / max(len(rows), 1), device)
            core.eval()
            with torch.no_grad():
                val_ll = float(validation_log_likelihood(core, x_val, eps_val, onehot_val).mean())
                val_elbo = float(core.training_objective(x_val, eps1_val, onehot_val).mean())
            result.history.append({"epoch": epoch + 1, "loss": train_loss, "val_elbo": val_elbo,
                                   "val_log_likelihood": val_ll})
            if val_ll > result.best_val_log_likelihood:
                result.best_val_log_likelihood, result.best_epoch, stale = val_ll, epoch + 1, 0
                best_state = copy.deepcopy(core.state_dict())
            else:
                stale += 1
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{train_loss:.2f}", val_ll=f"{val_ll:.2f}", best=result.best_epoch)
            if not math.isfinite(train_loss) or (stale >= settings.patience and epoch >= settings.kl_warmup):
                break
    core.load_state_dict(best_state)
    core.eval()
    return result
