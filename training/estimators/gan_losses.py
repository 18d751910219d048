"""The GAN's losses, each a few lines of maths on the discriminator's outputs.

Notation: D(x) = sigmoid(l(x)) is the probability the discriminator gives that x is real, l its
*logit*; G(z) the generator. Losses take logits because log sigmoid(l) = -softplus(-l) and
log(1 - sigmoid(l)) = -softplus(l) are exact and stable for any l, where log(D) is not.

* Discriminator (binary cross-entropy, real target t; Goodfellow et al. 2014):

      L_D = -E_x[t log D(x) + (1 - t) log(1 - D(x))] - E_z[log(1 - D(G(z)))]

  with t = 1 it is the min-max game's inner maximisation written as a loss. One-sided label
  smoothing (Salimans et al. 2016) sets t = 0.9 for real rows only: it caps how confident D may
  be on data, so its gradient stays informative, while fake targets stay at 0 (smoothing them
  too would reward G's samples where there is no data).
* Generator, non-saturating: L_G = -E_z[log D(G(z))] = E_z softplus(-l(G(z))). The min-max
  generator loss E log(1 - D(G(z))) saturates (its gradient vanishes) exactly when D rejects
  G's samples confidently, i.e. early in training; -log D has the same fixed point and strong
  gradients there.
* Feature matching (Salimans et al. 2016): L_FM = ||E_x f(x) - E_z f(G(z))||^2 with f an
  intermediate discriminator layer: G matches the statistics D uses rather than fooling D's
  current output, which is harder to over-fit to.
* WGAN-GP (Gulrajani et al. 2017): a critic l (no sigmoid) approximates the Wasserstein-1
  distance sup_{||l||_L <= 1} E l(x) - E l(G(z)). Critic loss E l(G(z)) - E l(x) +
  lambda E (||grad l(x_hat)||_2 - 1)^2 on interpolates x_hat = t x + (1 - t) G(z), t ~ U(0, 1):
  the optimal critic has unit gradient norm on the lines between coupled points, so the penalty
  enforces the Lipschitz constraint softly. Generator loss -E l(G(z)).
* R1 (Mescheder et al. 2018): gamma/2 E_x ||grad l(x)||^2 on real rows: penalising the
  discriminator's slope on the data stops it from growing sharp cliffs that the generator then
  chases round in circles; the training's local convergence proof needs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       real_target: float = 1.0) -> torch.Tensor:
    """BCE of real logits against ``real_target`` (0.9 = one-sided smoothing) plus fake against 0."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_target))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating -E log D(G(z)) = E softplus(-l)."""
    return F.softplus(-fake_logits).mean()


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """||mean_x f(x) - mean_z f(G(z))||^2 over the feature axis (rows are averaged first)."""
    return (real_features.mean(dim=0) - fake_features.mean(dim=0)).pow(2).sum()


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN critic: E l(G(z)) - E l(x) (minimised, so the critic raises data and lowers samples)."""
    return fake_scores.mean() - real_scores.mean()


def wasserstein_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN generator: -E l(G(z))."""
    return -fake_scores.mean()


def interpolates(real: torch.Tensor, fake: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_hat = t x + (1 - t) G(z), one t per row broadcast over the row's other axes."""
    t = t.reshape(-1, *([1] * (real.dim() - 1)))
    return t * real + (1.0 - t) * fake


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, t: torch.Tensor,
                     *extra: torch.Tensor) -> torch.Tensor:
    """E (||grad l(x_hat)||_2 - 1)^2 at ``interpolates(real, fake, t)``; differentiable (double backward).

    ``extra`` are further critic inputs held fixed (a conditional critic's labels).
    """
    x_hat = interpolates(real, fake.detach(), t).requires_grad_(True)
    scores = critic(x_hat, *extra)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    # One norm per critic input: a packed critic's input is its pack of rows together.
    return (grad.reshape(len(scores), -1).norm(dim=1) - 1.0).pow(2).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """1/2 E ||grad_x l(x)||^2 at the real rows (``real`` must require grad before l was computed)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return 0.5 * grad.reshape(len(real_logits), -1).pow(2).sum(dim=1).mean()


def coverage_loss(real: torch.Tensor, fake: torch.Tensor, real_onehot: torch.Tensor | None = None,
                  fake_onehot: torch.Tensor | None = None) -> torch.Tensor:
    """IMLE's coverage term (Li and Malik 2018): E_x min_j ||x - G(z_j)||^2 over the batch's fakes.

    Every real row pulls its nearest fake towards it, so a mode that the generator has dropped
    (whose rows the adversarial loss no longer sees any fake near) still sends a gradient.
    Conditional: a row's nearest fake is sought among the fakes of its own class only.
    """
    # explicit differences, not torch.cdist: its square root has no gradient at distance 0
    distances = (real.flatten(1).unsqueeze(1) - fake.flatten(1).unsqueeze(0)).pow(2).sum(dim=2)
    if real_onehot is not None:
        same = real_onehot @ fake_onehot.T.to(real_onehot.dtype)
        distances = torch.where(same > 0.5, distances, torch.full_like(distances, float("inf")))
    nearest = distances.amin(dim=1)
    return nearest[torch.isfinite(nearest)].mean() if real_onehot is not None else nearest.mean()
