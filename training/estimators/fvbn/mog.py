"""One-dimensional mixture-of-Gaussians conditionals: the net's raw outputs -> density and samples.

For feature d the net emits 3K numbers (a_1..a_K, mu_1..mu_K, r_1..r_K), read as

    p(z_d | z_<d) = sum_k pi_k N(z_d; mu_k, sigma_k^2),   pi = softmax(a),   log sigma_k = max(r_k, R)

(``R = LOG_SCALE_MIN`` keeps a component from collapsing onto a repeated value, which would make
the likelihood unbounded). In logs, with the log-sum-exp written out so that the exported graph
is plain ReduceMax / Exp / ReduceSum / Log:

    log p(z_d | z_<d) = logsumexp_k [ log pi_k - log sigma_k - log(2 pi)/2 - (z_d - mu_k)^2 / (2 sigma_k^2) ]

Sampling from noise: a uniform u picks k = #{j : c_j < u} with c the cumulative weights (clamped
to K - 1 against rounding), and a standard normal e gives z_d = mu_k + sigma_k e.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -7.0
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def split(raw: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [..., 3K] -> (log weights, means, log scales), each [..., K]."""
    logits, means, log_scales = raw.split(k, dim=-1)
    return F.log_softmax(logits, dim=-1), means, torch.clamp(log_scales, min=LOG_SCALE_MIN)


def log_sum_exp(a: torch.Tensor, dim: int) -> torch.Tensor:
    m = a.amax(dim=dim, keepdim=True)
    return (m + torch.log(torch.exp(a - m).sum(dim=dim, keepdim=True))).squeeze(dim)


def log_density(raw: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """log p(z | params) for raw [..., 3K] and z [...]: the mixture's log-density, shape [...]."""
    log_w, means, log_scales = split(raw, k)
    t = (z.unsqueeze(-1) - means) * torch.exp(-log_scales)
    return log_sum_exp(log_w - log_scales - _HALF_LOG_2PI - 0.5 * t * t, dim=-1)


def sample(raw: torch.Tensor, u: torch.Tensor, e: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """One draw per row: raw [..., 3K], uniform u and standard normal e broadcastable to [..., 1],
    ``components`` = arange(K) in raw's dtype (a buffer, so a graph stores it once). Returns [..., 1].

    k = #{j : c_j < u} clamped to K - 1, picked as a one-hot row, so the exported step is a
    handful of elementwise nodes (no gather).
    """
    k = components.shape[0]
    logits, means, log_scales = raw.split(k, dim=-1)
    cum = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)
    index = torch.clamp((cum < u).to(raw.dtype).sum(dim=-1, keepdim=True), max=k - 1)
    pick = (index == components).to(raw.dtype)
    scale = torch.exp(torch.clamp(log_scales, min=LOG_SCALE_MIN))
    return (pick * (means + scale * e)).sum(dim=-1, keepdim=True)
