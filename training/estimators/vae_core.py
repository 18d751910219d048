"""The fitted VAE as one module — the maths that training, the estimator and the served graphs share —
and the thin graph wrappers the exporter turns into ONNX.

Density of a row (``log_prob``), with y = T(x) the data transform (``vae_networks.DataTransform``):

    log p(x)  ~=  log (1/K) sum_k p(y | z_k) p(z_k) / q(z_k | x)  +  log|dy/dx|,   z_k ~ q(z|x),

the importance-weighted estimate IWAE_K (``vae_losses``), with z_k = mu(x) + sigma(x) * eps_k and
eps the served graph's noise input [N, K, L]: the server draws it from the request's seed, so a
score is reproducible, and K is the size of its ``importance_samples`` axis. E[IWAE_K] is a lower
bound of log p(x) that tightens as K grows; its spread over seeds shrinks like 1/sqrt(K).

Class-conditional models (fit with labels) learn p(x | c) with the one-hot class given to the
encoder and the decoder. Their served score must still be a density of x alone, so it
marginalises over the classes with the training rows' class frequencies p(c):

    log p(x) ~= log sum_c p(c) * (1/K) sum_k p(y | z_kc, c) p(z_kc) / q(z_kc | x, c) + log|dy/dx|,

each class with its own posterior q(z | x, c) and the same noise eps. Each inner average is an
unbiased estimate of p(x | c), so the sum is an unbiased estimate of p(x) and its log is again a
stochastic lower bound (Jensen); scoring costs C times the unconditional one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.estimators.vae_losses import (elbo, importance_log_weights, log_mean_exp, mixture_log_prob,
                                            reparameterise)
from training.estimators.vae_networks import DataTransform, Decoder, Encoder


class VAECore(nn.Module):
    """Transform, encoder, decoder and (if conditional) the class prior of a fitted VAE."""

    def __init__(self, transform: DataTransform, encoder: Encoder, decoder: Decoder, num_classes: int = 0,
                 class_log_prior: torch.Tensor | None = None):
        super().__init__()
        self.transform, self.encoder, self.decoder = transform, encoder, decoder
        self.num_classes = num_classes
        self.latent_dim = encoder.latent_dim
        self.n_features = decoder.n_features
        if num_classes:
            if class_log_prior is None:  # uniform
                class_log_prior = torch.full((num_classes,), -math.log(num_classes))
            self.register_buffer("class_log_prior", class_log_prior.float())
            self.register_buffer("eye", torch.eye(num_classes))

    # ---- pieces --------------------------------------------------------------------------
    def onehot(self, label: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> float [N, C]; built from a comparison so that it exports everywhere."""
        return (label.unsqueeze(-1) == torch.arange(self.num_classes, device=label.device)).to(self.eye.dtype)

    def encode(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_var) [N, L] of q(z | x[, c]) for rows x in data space."""
        return self.encoder(self.transform(x)[0], onehot)

    def decode_mean(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z] per feature, [N, D]: the mixture weights times each component's mean in data
        space (exact for the Gaussian likelihood, the probit approximation for the logit one)."""
        logits, mean, log_scale = self.decoder(z, onehot)
        return (torch.softmax(logits, dim=-1) * self.transform.mean_of(mean, log_scale)).sum(dim=-1)

    def decode_draw(self, z: torch.Tensor, u: torch.Tensor, e: torch.Tensor,
                    onehot: torch.Tensor | None = None) -> torch.Tensor:
        """A draw x ~ p(x | z), [N, D]: per feature, the uniform ``u`` picks a component through the
        cumulative weights, the normal ``e`` is scaled by its standard deviation, and the
        transform is inverted."""
        logits, mean, log_scale = self.decoder(z, onehot)
        cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)[..., :-1]
        index = (u.unsqueeze(-1) > cdf).to(z.dtype).sum(dim=-1, keepdim=True)  # [N, D, 1]
        picked = (index == torch.arange(mean.shape[-1], device=z.device).to(z.dtype)).to(z.dtype)
        y = (picked * mean).sum(-1) + (picked * torch.exp(log_scale)).sum(-1) * e
        return self.transform.inverse(y)

    # ---- densities -----------------------------------------------------------------------
    def log_weights(self, y: torch.Tensor, eps: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | z_k[, c]) + log p(z_k) - log q(z_k | x[, c]) [N, K] for transformed rows
        y [N, D] and noise eps [N, K, L] (the Jacobian of the transform is not included)."""
        mean, log_var = self.encoder(y, onehot)
        z = reparameterise(mean.unsqueeze(1), log_var.unsqueeze(1), eps)  # [N, K, L]
        flat_onehot = None
        if onehot is not None:
            flat_onehot = (onehot.unsqueeze(1) + torch.zeros_like(eps[..., :1])).reshape(-1, onehot.shape[-1])
        logits, mu, log_scale = self.decoder(z.reshape(-1, self.latent_dim), flat_onehot)
        shape = (eps.shape[0], eps.shape[1], self.n_features, logits.shape[-1])
        log_px = mixture_log_prob(y.unsqueeze(1), logits.reshape(shape), mu.reshape(shape),
                                  log_scale.reshape(shape))  # [N, K]
        return importance_log_weights(log_px, z, eps, log_var)

    def log_prob(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """IWAE_K estimate of log p(x) [N] in nats (marginalised over classes if conditional);
        -inf for rows outside the transform's support."""
        y, log_det = self.transform(x)
        if not self.num_classes:
            estimate = log_mean_exp(self.log_weights(y, eps), dim=-1)
        else:
            c = self.num_classes
            zeros = torch.zeros_like(self.eye).unsqueeze(0)  # [1, C, C]
            y_c = (y.unsqueeze(1) + zeros[..., :1]).reshape(-1, y.shape[-1])  # [N*C, D]
            onehot = (self.eye.unsqueeze(0) + torch.zeros_like(y[:, :1]).unsqueeze(-1)).reshape(-1, c)
            eps_c = (eps.unsqueeze(1) + zeros[..., :1].unsqueeze(-1)).reshape(-1, eps.shape[1], eps.shape[2])
            per_class = log_mean_exp(self.log_weights(y_c, eps_c, onehot), dim=-1).reshape(-1, c)
            estimate = torch.logsumexp(per_class + self.class_log_prior, dim=-1)
        value = estimate + log_det
        return torch.where(self.transform.inside(x), value, torch.full_like(value, -float("inf")))

    def training_objective(self, x: torch.Tensor, eps: torch.Tensor, onehot: torch.Tensor | None = None,
                           kl_weight: float = 1.0) -> torch.Tensor:
        """Per-row bound on log p(x[| c]) in nats that training maximises.

        eps [N, L]: the ELBO with one reparameterised sample and the closed-form KL (times
        ``kl_weight``, 1 except during a KL warm-up). eps [N, K, L] with K > 1: the
        importance-weighted bound IWAE_K (Burda et al.; ``kl_weight`` does not apply).
        """
        y, log_det = self.transform(x)
        if eps.dim() == 3:
            return log_mean_exp(self.log_weights(y, eps, onehot), dim=-1) + log_det
        mean, log_var = self.encoder(y, onehot)
        logits, mu, log_scale = self.decoder(reparameterise(mean, log_var, eps), onehot)
        return elbo(mixture_log_prob(y, logits, mu, log_scale) + log_det, mean, log_var, kl_weight)


class VAETrainer(nn.Module):
    """What DistributedDataParallel wraps: forward returns the per-row training bound."""

    def __init__(self, core: VAECore):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor, eps: torch.Tensor, onehot: torch.Tensor | None = None,
                kl_weight: float = 1.0) -> torch.Tensor:
        return self.core.training_objective(x, eps, onehot, kl_weight)


# ---- graphs (float32 in and out) ----------------------------------------------------------
class ScoreGraph(nn.Module):
    """x [N, D], eps [N, K, L] -> log_prob [N]."""

    def __init__(self, core: VAECore):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.core.log_prob(x, eps)


class SampleGraph(nn.Module):
    """Prior samples: z [N, L] (+ u [N, D], e [N, D] when drawing) (+ label [N]) -> x [N, D]."""

    def __init__(self, core: VAECore, draw: bool):
        super().__init__()
        self.core, self.draw = core, draw

    def forward(self, z: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        onehot = self.core.onehot(rest[-1]) if self.core.num_classes else None
        if self.draw:
            return self.core.decode_draw(z, rest[0], rest[1], onehot)
        return self.core.decode_mean(z, onehot)


class EncodeGraph(nn.Module):
    """x [N, D] (+ label [N]) -> (z_mean, z_log_var) [N, L] of q(z | x[, c])."""

    def __init__(self, core: VAECore):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor, *label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core.encode(x, self.core.onehot(label[0]) if label else None)


class ReconstructGraph(nn.Module):
    """x [N, D] (+ label [N]) -> E[x' | z = posterior mean]: the deterministic reconstruction."""

    def __init__(self, core: VAECore):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor, *label: torch.Tensor) -> torch.Tensor:
        onehot = self.core.onehot(label[0]) if label else None
        mean, _ = self.core.encode(x, onehot)
        return self.core.decode_mean(mean, onehot)
