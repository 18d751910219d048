"""The logistic autoregressive net (LARC) for binary rows: a fully-visible sigmoid belief net.

    p(x) = prod_d p(x_d | x_<d),    p(x_d = 1 | x_<d) = sigmoid(a_d),    a = b + W x,

with W strictly lower-triangular (feature d sees only features j < d), so the product is a
normalised distribution over {0, 1}^D by the chain rule. With a = b + W x,

    log p(x) = sum_d [x_d log sigmoid(a_d) + (1 - x_d) log(1 - sigmoid(a_d))]
             = sum_d [x_d a_d - softplus(a_d)]

(softplus(a) = log(1 + e^a)). Maximum likelihood decomposes into D logistic regressions of x_d
on x_<d; they are fitted jointly by minibatch gradient steps with an L2 penalty (weight decay),
which keeps the weights finite when a feature is perfectly predictable from the ones before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LARC(nn.Module):
    n_masks = 1

    def __init__(self, n_features: int, initial_bias: torch.Tensor | None = None):
        super().__init__()
        self.n_features = n_features
        self.weight = nn.Parameter(torch.zeros(n_features, n_features))
        self.bias = nn.Parameter(torch.zeros(n_features) if initial_bias is None else initial_bias.clone().float())
        self.register_buffer("mask", torch.tril(torch.ones(n_features, n_features), diagonal=-1))

    def forward(self, x: torch.Tensor, m: int = 0) -> torch.Tensor:
        """log p(x) [N] for binary rows x [N, D]."""
        a = F.linear(x, self.weight * self.mask, self.bias)
        return (x * a - F.softplus(a)).sum(dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).to(torch.float64)

    @torch.no_grad()
    def fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W strictly lower-triangular [D, D], b [D])."""
        return (self.weight * self.mask).detach().clone(), self.bias.detach().clone()


def marginal_logits(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit of each feature's smoothed frequency of ones: the bias of an independent model,
    LARC's starting point (with W = 0 it is the best fully-factorised model)."""
    p = (x.mean(dim=0) + eps) / (1 + 2 * eps)
    return torch.log(p) - torch.log1p(-p)
