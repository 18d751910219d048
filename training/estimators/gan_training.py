"""The GAN training loop: alternate discriminator and generator steps, log, repeat.

One iteration (Goodfellow et al. 2014, Algorithm 1, with the stabilisers of ``gan_losses``):

1. ``d_steps`` times: a batch of real rows x (with labels y if conditional), fakes G(z) for
   z ~ N(0, I) with the *same* labels, and a step down the discriminator's loss (BCE, or the WGAN
   critic loss + gradient penalty), plus R1 on the real rows if asked;
2. one step down the generator's loss on fresh z (non-saturating -log D(G(z)), feature
   matching, or -critic), plus ``coverage_weight`` times IMLE's coverage term (each real row of
   the batch pulls its nearest fake towards it: a dropped mode keeps sending the generator a
   gradient, which the adversarial loss alone stops doing once no fake lands near it).

Batches are drawn from an endless stream of epochs, each a permutation sharded over the torchrun
ranks (``Distributed.shard``), so every rank sees its own rows and DDP averages the gradients.
Adam with beta1 = 0.5 (DCGAN's choice: momentum that lags behind a moving adversary makes the
game oscillate), and the learning rate decays linearly to 0 over the run, which lets the
generator settle onto the modes instead of circling them at the end. Optionally the served
generator is the exponential moving average of the generator's weights over the run (Yazici et
al. 2019): the players' oscillations around the equilibrium average out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from training.estimators import gan_losses as losses
from training.neural import Distributed, progress, seeded_generator, unwrap


@dataclass(frozen=True)
class TrainConfig:
    loss: str  # "nonsaturating" or "wgan-gp"
    steps: int
    batch_size: int
    learning_rate: float
    d_steps: int
    real_target: float  # 1.0, or 0.9 with one-sided label smoothing
    feature_matching: bool
    gp_weight: float
    r1_weight: float
    latent_dim: int
    num_classes: int  # 0 when unconditional
    betas: tuple[float, float] = (0.5, 0.999)
    # Share of the steps over which coarse-to-fine Fourier features switch on (gan_networks).
    fourier_anneal: float = 0.0
    # Decay of the exponential moving average of the generator's weights (0 = off).
    ema: float = 0.0
    # Weight of the IMLE coverage term added to the generator's loss (0 = off).
    coverage_weight: float = 0.0
    log_points: int = 100


def index_stream(n: int, batch: int, dist: Distributed, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of row indices: epoch e is ``dist.shard(n, seed + e)``, read in order."""
    buffer = np.empty(0, dtype=np.int64)
    epoch = 0
    while True:
        while len(buffer) < batch:
            buffer = np.concatenate([buffer, dist.shard(n, seed + epoch)])
            epoch += 1
        yield buffer[:batch]
        buffer = buffer[batch:]


def train_gan(generator: nn.Module, discriminator: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
              config: TrainConfig, dist: Distributed, seed: int,
              verbose: bool) -> tuple[list[dict[str, float]], nn.Module | None]:
    """Train in place (modules already on x's device and DDP-wrapped if distributed).

    Returns the log and, with ``config.ema``, the moving average of the generator (else None).

    ``x`` holds the normalised training rows [n, C, ...]; ``y`` int64 labels [n] or None.
    """
    device = x.device
    rng = seeded_generator(seed + 1000 * dist.rank, device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.learning_rate, betas=config.betas)
    decay = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 - s / config.steps) for o in (opt_g, opt_d)]
    eye = torch.eye(max(config.num_classes, 1), device=device)
    batches = index_stream(len(x), config.batch_size, dist, seed)
    wgan = config.loss == "wgan-gp"
    every = max(1, config.steps // config.log_points)
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}

    def real_batch() -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.from_numpy(next(batches)).to(device)
        return x[idx], (eye[y[idx]] if y is not None else None)

    def fakes(onehot: torch.Tensor | None) -> torch.Tensor:
        z = torch.randn(config.batch_size, config.latent_dim, generator=rng, device=device)
        return generator(z, onehot)

    core = unwrap(discriminator)
    average = copy.deepcopy(unwrap(generator)).requires_grad_(False) if config.ema else None
    for step in progress(range(config.steps), "gan", enabled=verbose and dist.is_main):
        core.set_progress(min(1.0, step / (config.fourier_anneal * config.steps)) if config.fourier_anneal else 1.0)
        for _ in range(config.d_steps):
            real, onehot = real_batch()
            if config.r1_weight:
                real.requires_grad_(True)
            with torch.no_grad():
                fake = fakes(onehot)
            real_out, fake_out = discriminator(real, onehot), discriminator(fake, onehot)
            if wgan:
                t = torch.rand(len(real), generator=rng, device=device)
                penalty = losses.gradient_penalty(unwrap(discriminator), real.detach(), fake, t, onehot)
                d_loss = losses.critic_loss(real_out, fake_out) + config.gp_weight * penalty
            else:
                d_loss = losses.discriminator_loss(real_out, fake_out, config.real_target)
            if config.r1_weight:
                d_loss = d_loss + config.r1_weight * losses.r1_penalty(real_out, real)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

        # The generator's step sees the discriminator unwrapped: only G's gradients are wanted (and
        # averaged by G's DDP wrapper); D's are discarded before its next step.
        critic = core
        real, onehot = real_batch()
        fake = fakes(onehot)
        if config.feature_matching:
            with torch.no_grad():
                real_features = critic.features(real, onehot)
            g_loss = losses.feature_matching_loss(real_features, critic.features(fake, onehot))
        else:
            g_out = critic(fake, onehot)
            g_loss = losses.wasserstein_generator_loss(g_out) if wgan else losses.generator_loss(g_out)
        if config.coverage_weight:
            g_loss = g_loss + config.coverage_weight * losses.coverage_loss(real, fake, onehot, onehot)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if average is not None:
            with torch.no_grad():
                for mean, current in zip(average.parameters(), unwrap(generator).parameters()):
                    mean.lerp_(current, 1.0 - config.ema)
                for mean, current in zip(average.buffers(), unwrap(generator).buffers()):
                    mean.copy_(current)
        for scheduler in decay:
            scheduler.step()

        for key, value in (("d_loss", d_loss), ("g_loss", g_loss),
                           ("d_real", real_out.mean()), ("d_fake", fake_out.mean())):
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        if (step + 1) % every == 0 or step + 1 == config.steps:
            count = (step % every) + 1
            history.append({"step": step + 1,
                            **{k: dist.mean(v / count, device) for k, v in sums.items()}})
            sums = {}
    core.set_progress(1.0)
    return history, average
