"""MADE's connectivity masks (Germain et al. 2015), one set per ordering of the features.

Every unit gets a *degree*. Feature d gets its position in the ordering, deg(d) in {1..D};
hidden units get degrees in {1..D-1}. A hidden unit may see an input (or a hidden unit of the
layer below) of degree not above its own; the output block of feature d may see units of degree
strictly below deg(d):

    hidden <- input:   M[k, j] = 1  iff  deg_h(k) >= deg(j)
    hidden <- hidden:  M[k, l] = 1  iff  deg_h(k) >= deg_h(l)
    output <- hidden:  M[d, k] = 1  iff  deg(d) >  deg_h(k)
    output <- input:   M[d, j] = 1  iff  deg(d) >  deg(j)      (the direct, "LARC-like" path)

By induction every path from input j to the outputs of feature d passes through degrees
deg(j) <= ... < deg(d), so output d depends only on the features before it in the ordering:
the net's outputs are the parameters of p(x_d | x_<d), and the product over d is a normalised
joint density (the chain rule). ``tests/unit/training/test_fvbn.py`` checks this with autograd.

All hidden layers share one degree vector, so a residual connection h + f(h) never connects a
unit to one of higher degree (ResMADE, Nash & Durkan 2019). Hidden degrees cycle evenly through
1..D-1 (every degree is equally represented) and are shuffled per ordering, so each member of an
ensemble uses the shared weights with a different connectivity.
"""

from __future__ import annotations

import numpy as np
import torch


def orderings(n_features: int, n_masks: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n_masks, D]: the natural order first, then random permutations."""
    out = [np.arange(n_features)]
    out += [rng.permutation(n_features) for _ in range(n_masks - 1)]
    return np.stack(out)


def input_degrees(order: np.ndarray) -> np.ndarray:
    """deg(d) = 1 + position of feature d in ``order``."""
    degrees = np.empty_like(order)
    degrees[order] = np.arange(1, len(order) + 1)
    return degrees


def hidden_degrees(n_features: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``width`` degrees cycling through 1..D-1, shuffled (degree D for D = 1: connects nowhere)."""
    top = max(n_features - 1, 1)
    degrees = (np.arange(width) % top) + 1
    if n_features == 1:
        degrees[:] = 1  # no output (degree 1) may see it: p(x_1) is a plain mixture
    return rng.permutation(degrees)


def make_degrees(n_features: int, width: int, n_masks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input degrees int64 [M, D], hidden degrees int64 [M, H]) for ``n_masks`` orderings."""
    rng = np.random.default_rng(seed)
    orders = orderings(n_features, n_masks, rng)
    deg_in = np.stack([input_degrees(o) for o in orders])
    deg_h = np.stack([hidden_degrees(n_features, width, rng) for _ in range(n_masks)])
    return torch.as_tensor(deg_in, dtype=torch.int64), torch.as_tensor(deg_h, dtype=torch.int64)


def ordering_of(deg_in: torch.Tensor) -> torch.Tensor:
    """int64 [M, D]: the feature sampled at each step (inverse of ``input_degrees``)."""
    return torch.argsort(deg_in, dim=1)


def hidden_mask(deg_out: torch.Tensor, deg_in: torch.Tensor) -> torch.Tensor:
    """float [out, in] mask of a hidden layer: deg_out(k) >= deg_in(j)."""
    return (deg_out.unsqueeze(1) >= deg_in.unsqueeze(0)).to(torch.float32)


def output_mask(deg_out: torch.Tensor, deg_in: torch.Tensor) -> torch.Tensor:
    """float [out, in] mask of an output layer: deg_out(d) > deg_in(k) (strict)."""
    return (deg_out.unsqueeze(1) > deg_in.unsqueeze(0)).to(torch.float32)
