"""Discriminator-driven importance resampling of a trained GAN's samples.

A generator with a continuous latent always puts some mass where the data has none (between the
modes of a mixture, say), and a finite game never removes it. The correction (Grover et al.
2019, "Bias correction of learned generative models using likelihood-free importance
weighting"; Azadi et al. 2019, "Discriminator rejection sampling"): after the game, freeze G and
train a *per-sample* classifier c(x) of real rows against G(z) with binary cross-entropy on
balanced batches. Its optimum is c*(x) = log p_data(x) / p_G(x), so exp(c(x)) is an importance
weight that turns samples of p_G into samples of p_data. The game's discriminator cannot serve:
with PacGAN packing it judges ``pack`` rows at once, so its logit is no per-sample ratio, and it
was trained against a moving generator.

Sampling-importance-resampling (SIR, Rubin 1988): draw M candidates x_1..x_M ~ p_G per output
row and return x_j with probability softmax(c(x_1), ..., c(x_M))_j. For M = 1 this is p_G; as
M -> infinity the output's law tends to p_G(x) exp(c(x)) / E exp(c) = p_data(x) (where c is the
true ratio and p_G covers p_data). In the exported graph the choice is a deterministic function
of the noise inputs: candidates from z [N, M, latent] (normal) and one u [N] (uniform) per row;
j = #{k : F_k < u} with F the cumulative softmax — the inverse-CDF draw of the categorical —
so torch and onnxruntime pick the same candidate from the same seed.

The cost of a sample is M generator and classifier evaluations (cheap for small MLPs).
"""

from __future__ import annotations

import torch
from torch import nn

from training.estimators import gan_losses as losses
from training.neural import seeded_generator


def choose(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [N] int64 of the candidate picked from logits [N, M] by uniforms u [N] (inverse CDF of
    softmax(logits)); exportable: Softmax, CumSum, Less, ReduceSum, Min."""
    cdf = torch.cumsum(torch.softmax(logits, dim=1), dim=1)
    index = (cdf < u.reshape(-1, 1).to(cdf.dtype)).to(torch.int64).sum(dim=1)
    return torch.clamp(index, max=logits.shape[1] - 1)  # float rounding may leave F_M just below 1


def pick(candidates: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """candidates [N, M, ...], index [N] -> [N, ...]: the chosen candidate of each row."""
    n, m = candidates.shape[:2]
    flat = candidates.reshape(n, m, -1)
    chosen = torch.gather(flat, 1, index.reshape(n, 1, 1).expand(n, 1, flat.shape[2]))
    return chosen.reshape(n, *candidates.shape[2:])


def classifier_loss(classifier: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                    real_onehot: torch.Tensor | None = None,
                    fake_onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean BCE, accuracy) of the classifier on real (target 1) and fake (target 0) rows."""
    real_logit, fake_logit = classifier(real, real_onehot), classifier(fake, fake_onehot)
    # the game's discriminator loss (real -> 1, fake -> 0) halved: a balanced mean, log 2 = chance
    loss = 0.5 * losses.discriminator_loss(real_logit, fake_logit)
    accuracy = 0.5 * ((real_logit > 0).float().mean() + (fake_logit <= 0).float().mean())
    return loss, accuracy


@torch.no_grad()
def fakes(generator: nn.Module, n: int, latent_dim: int, rng: torch.Generator,
          onehot: torch.Tensor | None) -> torch.Tensor:
    z = torch.randn(n, latent_dim, generator=rng, device=rng.device)
    return generator(z, onehot)


def train_classifier(classifier: nn.Module, generator: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                     latent_dim: int, num_classes: int, steps: int, batch_size: int, learning_rate: float,
                     seed: int) -> list[dict[str, float]]:
    """Train ``classifier`` in place to tell normalised rows ``x`` [n, C, ...] (labels ``y``) from
    the frozen ``generator``'s samples (with the same labels); Adam, learning rate decaying
    linearly to 0. Returns the log (mean loss and accuracy per tenth of the run)."""
    device = x.device
    rng = seeded_generator(seed + 7919, device)
    order = torch.Generator(device="cpu").manual_seed(seed + 7919)
    eye = torch.eye(max(num_classes, 1), device=device)
    opt = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    generator.eval()
    classifier.train()
    history: list[dict[str, float]] = []
    every = max(1, steps // 10)
    total_loss = total_accuracy = 0.0
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=order).to(device)
        onehot = eye[y[idx]] if y is not None else None
        loss, accuracy = classifier_loss(classifier, x[idx], fakes(generator, batch_size, latent_dim, rng, onehot),
                                         onehot, onehot)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        total_loss += float(loss.detach())
        total_accuracy += float(accuracy)
        if (step + 1) % every == 0 or step + 1 == steps:
            count = step % every + 1
            history.append({"step": step + 1, "loss": total_loss / count, "accuracy": total_accuracy / count})
            total_loss = total_accuracy = 0.0
    classifier.eval()
    return history


@torch.no_grad()
def evaluate_classifier(classifier: nn.Module, generator: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                        latent_dim: int, num_classes: int, seed: int) -> dict[str, float]:
    """Held-out BCE and accuracy: real rows ``x`` (not trained on) against as many fresh samples."""
    rng = seeded_generator(seed + 104729, x.device)
    eye = torch.eye(max(num_classes, 1), device=x.device)
    onehot = eye[y] if y is not None else None
    loss, accuracy = classifier_loss(classifier, x, fakes(generator, len(x), latent_dim, rng, onehot),
                                     onehot, onehot)
    return {"loss": float(loss), "accuracy": float(accuracy)}
