"""The VAE's maths as small functions: Gaussian log-densities, the closed-form KL, the decoder's
per-feature mixture density, the ELBO and the importance-weighted bound.

With an encoder q(z|x) = N(mu(x), diag sigma^2(x)), a standard normal prior p(z) = N(0, I) and a
decoder p(x|z):

    log p(x) >= ELBO(x)   = E_q[ log p(x|z) ] - KL( q(z|x) || p(z) )
    log p(x) >= IWAE_K(x) = E[ log (1/K) sum_k p(x, z_k) / q(z_k|x) ],  z_k ~ q(z|x) i.i.d.

and ELBO = IWAE_1 <= IWAE_K <= IWAE_{K+1} -> log p(x) as K -> infinity (Burda et al. 2016).
The KL between two Gaussians has a closed form, so the ELBO needs Monte Carlo only for the
reconstruction term:

    KL( N(mu, diag sigma^2) || N(0, I) ) = 1/2 sum_j ( mu_j^2 + sigma_j^2 - 1 - log sigma_j^2 ).

Samples use the reparameterisation z = mu + sigma * eps with eps ~ N(0, I), so gradients flow
through mu and sigma; then log q(z|x) = sum_j log N(eps_j; 0, 1) - 1/2 sum_j log sigma_j^2.

Every function works on any leading axes and uses only operations the ONNX exporter maps to
opset 17, with no Python number taken from a tensor's shape: the served score graph has a
dynamic number of importance samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, diag exp(log_var)) || N(0, I) ) in nats, summed over the last axis."""
    return 0.5 * (mean * mean + torch.exp(log_var) - 1.0 - log_var).sum(dim=-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last axis."""
    return -0.5 * (z * z + LOG_2PI).sum(dim=-1)


def posterior_log_prob(eps: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log q(z|x) at z = mean + exp(log_var / 2) * eps, from the standardised noise ``eps``.

    The change of variables from eps to z divides the density by prod_j sigma_j.
    """
    return standard_normal_log_prob(eps) - 0.5 * log_var.sum(dim=-1)


def reparameterise(mean: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mean + sigma * eps: a draw from q(z|x) that is differentiable in mean and log_var."""
    return mean + torch.exp(0.5 * log_var) * eps


def mixture_log_prob(y: torch.Tensor, logits: torch.Tensor, mean: torch.Tensor,
                     log_scale: torch.Tensor) -> torch.Tensor:
    """Per-feature log density of a mixture of M univariate Gaussians, summed over features.

    ``y`` [..., D]; ``logits``, ``mean``, ``log_scale`` [..., D, M] (M = 1: a plain Gaussian).
    log p(y) = sum_d log sum_m softmax(logits_d)_m N(y_d; mean_dm, exp(log_scale_dm)^2).
    """
    u = (y.unsqueeze(-1) - mean) * torch.exp(-log_scale)
    component = -0.5 * (u * u + LOG_2PI) - log_scale
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + component, dim=-1).sum(dim=-1)


def log_mean_exp(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    """log (1/K) sum_k exp(log_w_k) along ``dim``, stable; K is read from the tensor at run time."""
    count = torch.ones_like(log_w).sum(dim=dim)
    return torch.logsumexp(log_w, dim=dim) - torch.log(count)


def elbo(log_px_given_z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor,
         kl_weight: float = 1.0) -> torch.Tensor:
    """ELBO per row: a one-sample estimate of E_q[log p(x|z)] minus the closed-form KL.

    ``kl_weight`` < 1 (KL warm-up, Bowman et al. 2016; Sonderby et al. 2016) is *not* a bound:
    training uses it only in its first epochs, so that the decoder learns to use z before the
    KL term can pull q(z|x) onto the prior (posterior collapse).
    """
    return log_px_given_z - kl_weight * gaussian_kl(mean, log_var)


def importance_log_weights(log_px_given_z: torch.Tensor, z: torch.Tensor, eps: torch.Tensor,
                           log_var: torch.Tensor) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), for samples on the second-to-last axes.

    ``log_px_given_z`` [..., K]; ``z`` and ``eps`` [..., K, L]; ``log_var`` [..., L] (broadcast
    over K). ``log_mean_exp(log_w, dim=-1)`` is the importance-weighted estimate IWAE_K.
    """
    return log_px_given_z + standard_normal_log_prob(z) - posterior_log_prob(eps, log_var.unsqueeze(-2))
