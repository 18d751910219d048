"""The masked autoencoder (MADE) with residual masked blocks and mixture-of-Gaussian outputs.

    h_0 = W_in z                                    (mask: hidden <- input)
    h_l = h_{l-1} + W_l2 relu(W_l1 relu(h_{l-1}))   (masks: hidden <- hidden), l = 1..L
    out = W_out relu(h_L) + W_dir z                 (masks: output <- hidden, output <- input)

``out`` [N, D, 3K] holds each feature's mixture parameters (``mog``), a function of the features
before it in the ordering only (``masks``), so

    log p(z) = sum_d log p(z_d | z_<d)              (exact: the chain rule, no bound)

The weights are shared by the ``n_masks`` orderings of the ensemble (connectivity-agnostic
training, Germain et al. 2015 §4): each minibatch uses one ordering, so the net learns every
member at once, which regularises it on small data; the ensemble's density is their average,
log p(z) = log (1/M) sum_m p_m(z) — a mixture of normalised densities, hence normalised.

``masked_layers`` hands the fitted weights, multiplied by each member's masks, to the exported
core (``cores``), which computes every member in one batched product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.estimators.fvbn import mog
from training.estimators.fvbn.masks import hidden_mask, make_degrees, output_mask


class MADE(nn.Module):
    def __init__(self, n_features: int, width: int, n_blocks: int, n_components: int, n_masks: int,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        D, H, K = n_features, width, n_components
        self.n_features, self.width, self.n_components, self.n_masks = D, H, K, n_masks
        self.n_outputs = D * 3 * K
        self.dropout = dropout
        deg_in, deg_h = make_degrees(D, H, n_masks, seed)
        self.register_buffer("deg_in", deg_in)
        self.register_buffer("deg_h", deg_h)
        self.inp = nn.Linear(D, H)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Linear(H, H), nn.Linear(H, H)]) for _ in range(n_blocks))
        self.out = nn.Linear(H, D * 3 * K)
        self.direct = nn.Linear(D, D * 3 * K, bias=False)
        with torch.no_grad():
            for first, second in self.blocks:  # each block starts as (almost) the identity
                second.weight.uniform_(-1e-3, 1e-3)
                second.bias.zero_()
            self.out.weight.mul_(0.1)
            self.direct.weight.zero_()
            bias = self.out.bias.view(D, 3, K)
            bias[:, 0].zero_()                                   # equal weights
            bias[:, 1] = torch.linspace(-2.0, 2.0, K) if K > 1 else 0.0  # means spread over the data
            bias[:, 2].fill_(math.log(0.5) if K > 1 else 0.0)    # narrower than the data
        masks = [self._masks(m) for m in range(n_masks)]
        for i, name in enumerate(("mask_in", "mask_hidden", "mask_out", "mask_direct")):
            self.register_buffer(name, torch.stack([mk[i] for mk in masks]), persistent=False)

    def _masks(self, m: int) -> tuple[torch.Tensor, ...]:
        K3 = 3 * self.n_components
        deg_out = self.deg_in[m].repeat_interleave(K3)  # output unit d*3K + j belongs to feature d
        return (hidden_mask(self.deg_h[m], self.deg_in[m]), hidden_mask(self.deg_h[m], self.deg_h[m]),
                output_mask(deg_out, self.deg_h[m]), output_mask(deg_out, self.deg_in[m]))

    def conditionals(self, z: torch.Tensor, m: int) -> torch.Tensor:
        """Raw conditional parameters [N, D, 3K] of member ``m`` for inputs z [N, D]."""
        h = F.linear(z, self.inp.weight * self.mask_in[m], self.inp.bias)
        hidden = self.mask_hidden[m]
        for first, second in self.blocks:
            t = F.linear(F.relu(h), first.weight * hidden, first.bias)
            t = F.dropout(F.relu(t), self.dropout, self.training)
            h = h + F.linear(t, second.weight * hidden, second.bias)
        out = F.linear(F.relu(h), self.out.weight * self.mask_out[m], self.out.bias)
        out = out + F.linear(z, self.direct.weight * self.mask_direct[m])
        return out.view(z.shape[0], self.n_features, 3 * self.n_components)

    def forward(self, z: torch.Tensor, m: int) -> torch.Tensor:
        """log p_m(z) [N] of member ``m`` in z-space: the sum over features of the conditionals."""
        return mog.log_density(self.conditionals(z, m), z, self.n_components).sum(dim=1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """The ensemble's log p(z) [N] = log mean_m p_m(z)."""
        members = torch.stack([self(z, m) for m in range(self.n_masks)])
        return mog.log_sum_exp(members.to(torch.float64), dim=0) - math.log(self.n_masks)

    @torch.no_grad()
    def masked_layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each layer's weights times every member's mask, [M, out, in], and its bias."""
        layers = {"inp": (self.inp.weight * self.mask_in, self.inp.bias)}
        for i, (first, second) in enumerate(self.blocks):
            layers[f"block{i}a"] = (first.weight * self.mask_hidden, first.bias)
            layers[f"block{i}b"] = (second.weight * self.mask_hidden, second.bias)
        layers["out"] = (self.out.weight * self.mask_out, self.out.bias)
        layers["direct"] = (self.direct.weight * self.mask_direct, None)
        return {k: (w.detach().clone(), None if b is None else b.detach().clone()) for k, (w, b) in layers.items()}
