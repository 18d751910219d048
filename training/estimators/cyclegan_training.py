"""CycleGAN's training loop: alternate generator and discriminator steps, data-parallel under torchrun.

One step, on a minibatch of A rows and one of B rows (drawn independently: nothing is paired):

1. generators — G(a), F(b), the round trips F(G(a)), G(F(b)) and the identity terms G(b),
   F(a) in one call of ``Generators``; loss L_adv(G) + L_adv(F) + λ·L_cyc + λ_id·L_id, where the
   adversarial terms ask the discriminators *as they are* (unwrapped: only the generators'
   gradients are wanted, and the discriminators' are cleared before their own step);
2. discriminators — real rows towards 1, fakes towards 0, the fakes drawn through each
   domain's ``ImagePool`` of past fakes.

Adam with β1 = 0.5 for both players; the learning rate is constant for ``epochs - decay_epochs``
epochs, then falls linearly towards 0 (the paper's schedule: the game settles instead of
circling). Under torchrun both players are DDP-wrapped, every rank reads its own shard of each
epoch's permutation of each domain, and all ranks take the same number of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from training.estimators.cyclegan_losses import (cycle_loss, identity_loss, lsgan_discriminator_loss,
                                                 lsgan_generator_loss)
from training.estimators.cyclegan_nets import Discriminators, Generators, ImagePool
from training.neural import Distributed, progress, seeded_generator, unwrap

LOGGED = ("loss_g", "adversarial", "cycle", "identity", "loss_d")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    decay_epochs: int
    batch_size: int
    learning_rate: float
    beta1: float
    beta2: float
    lambda_cycle: float
    lambda_identity: float
    pool_size: int

    def lr_factor(self, epoch: int) -> float:
        """1 for the first ``epochs - decay_epochs`` epochs, then linearly down towards 0."""
        constant = self.epochs - self.decay_epochs
        return 1.0 if epoch < constant else 1.0 - (epoch - constant + 1) / (self.decay_epochs + 1)


def _epoch_rows(n: int, rows: int, dist: Distributed, seed: int) -> torch.Tensor:
    """``rows`` row indices of this rank's shard of one epoch's permutation (wrapping around)."""
    return torch.from_numpy(np.resize(dist.shard(n, seed), rows))


def train(generators: Generators, discriminators: Discriminators, a: torch.Tensor, b: torch.Tensor,
          config: TrainConfig, dist: Distributed, device: torch.device, seed: int,
          verbose: bool) -> list[dict[str, float]]:
    """Train both players in place on rows ``a`` (domain A) and ``b`` (domain B); return the log."""
    generators.to(device).train()
    discriminators.to(device).train()
    gens, discs = dist.wrap(generators, device), dist.wrap(discriminators, device)
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(gens.parameters(), lr=config.learning_rate, betas=betas)
    opt_d = torch.optim.Adam(discs.parameters(), lr=config.learning_rate, betas=betas)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, config.lr_factor) for opt in (opt_g, opt_d)]
    pool_rng = seeded_generator(seed + 1 + 1000 * dist.rank)
    pool_a, pool_b = ImagePool(config.pool_size, pool_rng), ImagePool(config.pool_size, pool_rng)
    a, b = a.to(device), b.to(device)
    use_identity = config.lambda_identity > 0
    # The larger domain sets the epoch; every rank takes the same number of steps (DDP all-reduces once per step).
    steps = max(1, math.ceil(max(len(a), len(b)) / (config.batch_size * dist.world_size)))
    rows = steps * config.batch_size
    critics = unwrap(discs)
    history = []
    for epoch in progress(range(config.epochs), "cyclegan", enabled=verbose and dist.is_main):
        order_a = _epoch_rows(len(a), rows, dist, seed * 100_003 + 2 * epoch)
        order_b = _epoch_rows(len(b), rows, dist, seed * 100_003 + 2 * epoch + 1)
        sums = torch.zeros(len(LOGGED), device=device)
        for start in range(0, rows, config.batch_size):
            real_a = a[order_a[start:start + config.batch_size]]
            real_b = b[order_b[start:start + config.batch_size]]
            # 1. generators
            fake_b, fake_a, a_cycled, b_cycled, g_of_b, f_of_a = gens(real_a, real_b, use_identity)
            adversarial = lsgan_generator_loss(critics.D_B(fake_b)) + lsgan_generator_loss(critics.D_A(fake_a))
            cycle = cycle_loss(real_a, a_cycled, real_b, b_cycled)
            identity = (identity_loss(real_a, f_of_a, real_b, g_of_b) if use_identity
                        else torch.zeros((), device=device))
            loss_g = adversarial + config.lambda_cycle * cycle + config.lambda_identity * identity
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            # 2. discriminators, against pooled past fakes
            on_real_a, on_fake_a, on_real_b, on_fake_b = discs(real_a, pool_a.query(fake_a), real_b,
                                                               pool_b.query(fake_b))
            loss_d = lsgan_discriminator_loss(on_real_a, on_fake_a) + lsgan_discriminator_loss(on_real_b, on_fake_b)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            sums += torch.stack([loss_g, adversarial, cycle, identity, loss_d]).detach()
        for schedule in schedules:
            schedule.step()
        means = (sums / steps).tolist()
        history.append({"epoch": epoch + 1, **{k: dist.mean(v, device) for k, v in zip(LOGGED, means)}})
    generators.eval()
    discriminators.eval()
    return history
