"""Histogram density on a regular grid, in 1, 2 or 3 dimensions.

    p(x) = count(cell of x) / (n * cell volume)

the maximum-likelihood density among those constant on the cells of a fixed grid. A grid has
bins^d cells, so a histogram is only practical in very few dimensions; we offer d <= 3 and
point to ``kde`` or ``gmm`` beyond.

Bin width. ``bins`` is an int (cells per dimension) or ``"auto"``, Scott's rule per dimension

    h = 3.49 * sigma * n^(-1/3)

(Scott, "On optimal and data-based histograms", Biometrika 1979): the bin width minimising the
integrated mean squared error shrinks like n^(-1/3) — wider bins lower the variance of each
count, narrower ones the bias — and 3.49 sigma is the constant that is optimal for Gaussian
data. With ``"auto"`` the cells are exactly h wide.

Range. The grid runs from half a cell below the smallest training value to (at least) half a
cell above the largest, so that no training point sits on the outer edge: with ``bins = B >= 2``
the cell width is (max - min) / (B - 1); ``bins = 1`` is the single cell
[min - span/2, max + span/2]; a constant feature gets one cell of width 1 (its density is a
point mass, which no histogram represents; the unit is arbitrary).

Zero density. Outside the grid, and in an empty cell unless the pseudo-count ``alpha`` > 0,
the log-density is -inf: the maximum-likelihood histogram gives those regions probability 0,
and an anomaly score (-log p) of +inf is the honest answer there. ``alpha`` adds a pseudo-count
to every cell (p = (count + alpha) / ((n + alpha * cells) * volume)); that still integrates to
one, the mass given to empty cells coming out of the occupied ones, and outside the grid the
density stays 0.

The score graph is ONNX-friendly: floor of (x - lower) / width, an in-range mask, the flat
cell index (cast to int64) gathers from a table of log-densities, and ``where`` puts -inf
outside. Sampling takes a uniform ``pick`` [N] that chooses a cell with positive probability
through the cumulative probabilities (index = #{c_j < u}, clamped; the last c_j is exactly 1),
and a uniform ``offset`` [N, d] that places the point uniformly within that cell. Each draw is
compared with every cell of positive probability (at most n of them when alpha = 0).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.base import DensityEstimator

MAX_DIMENSIONS = 3
# A grid larger than this (32 MiB per float64 table) is refused rather than built.
MAX_CELLS = 1 << 22
# The largest float32 below 1: a uniform drawn as float32 can round up to exactly 1.0, which
# would put a sample on the far edge of its cell, i.e. in the next cell.
_BELOW_ONE = 1.0 - 2.0 ** -24


class HistogramCore(nn.Module):
    def __init__(self, lower: torch.Tensor, width: torch.Tensor, n_bins: torch.Tensor,
                 log_density: torch.Tensor):
        super().__init__()
        d = lower.shape[0]
        strides = torch.ones(d, dtype=torch.float64)
        for j in range(d - 2, -1, -1):
            strides[j] = strides[j + 1] * n_bins[j + 1]
        self.register_buffer("lower", lower)
        self.register_buffer("width", width)
        self.register_buffer("n_bins", n_bins.to(torch.float64))
        self.register_buffer("strides", strides)
        self.register_buffer("log_density", log_density)
        # Sampling only ever picks cells of positive probability.
        probability = torch.exp(log_density) * torch.prod(width)
        support = torch.nonzero(probability > 0).flatten()
        cumulative = torch.cumsum(probability[support], dim=0)
        self.register_buffer("support", support)
        self.register_buffer("cumulative", cumulative / cumulative[-1])  # last entry exactly 1

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        position = torch.floor((x - self.lower) / self.width)
        in_range = ((position >= 0) & (position < self.n_bins)).to(torch.float64)
        inside = in_range.min(dim=1).values > 0.5
        index = torch.minimum(torch.clamp(position, min=0.0), self.n_bins - 1.0)
        flat = (index * self.strides).sum(dim=1).to(torch.int64)
        return torch.where(inside, self.log_density[flat], torch.full_like(x[:, 0], -math.inf))

    def noise_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name="pick", shape=[-1], noise="uniform"),
                TensorSpec(name="offset", shape=[-1, self.lower.shape[0]], noise="uniform")]

    def sample_from_noise(self, pick: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        below = (self.cumulative < pick.to(torch.float64)[:, None]).to(torch.int64)
        chosen = torch.clamp(below.sum(dim=1), max=self.support.shape[0] - 1)
        flat = self.support[chosen].to(torch.float64)[:, None]
        # C-order cell coordinates: floor(flat / stride) mod n_bins, exact in float64.
        index = torch.floor(flat / self.strides) - self.n_bins * torch.floor(flat / (self.strides * self.n_bins))
        within = torch.clamp(offset.to(torch.float64), min=0.0, max=_BELOW_ONE)
        return self.lower + (index + within) * self.width


class HistogramDensity(DensityEstimator):
    """Regular-grid histogram for d <= 3.

    Parameters
    ----------
    bins : int >= 1 or "auto", default "auto"
        Cells per dimension, or Scott's rule h = 3.49 sigma n^(-1/3) per dimension.
    alpha : float >= 0, default 0.0
        Pseudo-count added to every cell; 0 is the maximum-likelihood histogram, whose empty
        cells have density 0.

    Attributes after fit: ``n_bins_`` (cells per dimension), ``bin_width_``, ``lower_``,
    ``counts_`` (an array of shape ``n_bins_``).
    """

    card_limits = ("Outside the grid, and in empty cells, the density is 0 and the log-density −inf "
                   "(anomaly score +inf).")

    family = "histogram"

    def __init__(self, bins: int | str = "auto", alpha: float = 0.0):
        self.bins = bins
        self.alpha = alpha

    def _validate_params(self, x: torch.Tensor) -> None:
        d = x.shape[1]
        if d > MAX_DIMENSIONS:
            raise ValueError(f"histograms need bins^d cells and are only offered for d <= {MAX_DIMENSIONS}, "
                             f"got d = {d}: use kde or gmm")
        if isinstance(self.bins, str):
            if self.bins != "auto":
                raise ValueError(f"bins must be an int >= 1 or 'auto', got {self.bins!r}")
            if x.shape[0] < 2:
                raise ValueError(f"bins='auto' needs at least 2 rows to estimate a spread, got {x.shape[0]}")
        elif not (isinstance(self.bins, numbers.Integral) and not isinstance(self.bins, bool) and self.bins >= 1):
            raise ValueError(f"bins must be an int >= 1 or 'auto', got {self.bins!r}")
        if not (isinstance(self.alpha, numbers.Real) and not isinstance(self.alpha, bool)
                and 0 <= self.alpha < math.inf):
            raise ValueError(f"alpha must be a float >= 0, got {self.alpha!r}")

    def _fit(self, x: torch.Tensor) -> nn.Module:
        xs = x.numpy()
        n = xs.shape[0]
        lower, width, n_bins = self._grid(xs)
        n_cells = math.prod(int(b) for b in n_bins)  # Python ints: no overflow for absurd bins
        if n_cells > MAX_CELLS:
            raise ValueError(f"bins={self.bins!r} gives {n_cells} cells ({' x '.join(map(str, n_bins))}), "
                             f"more than {MAX_CELLS}: pass a smaller int bins")
        # Cell of every training point; the range holds all of them by construction, the clip only
        # guards the last cell's edge against rounding.
        cells = np.clip(np.floor((xs - lower) / width).astype(np.int64), 0, n_bins - 1)
        counts = np.bincount(np.ravel_multi_index(cells.T, tuple(n_bins)), minlength=n_cells)
        volume = float(np.prod(width))
        with np.errstate(divide="ignore"):
            log_density = np.log(counts + self.alpha) - math.log((n + self.alpha * n_cells) * volume)

        self.n_bins_, self.bin_width_, self.lower_ = n_bins, width, lower
        self.counts_ = counts.reshape(tuple(n_bins))
        return HistogramCore(torch.from_numpy(lower), torch.from_numpy(width), torch.from_numpy(n_bins),
                             torch.from_numpy(log_density))

    def _grid(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lower edge, cell width and number of cells per dimension (see the module docstring)."""
        lo, span = xs.min(axis=0), np.ptp(xs, axis=0)
        if self.bins == "auto":
            width = 3.49 * xs.std(axis=0, ddof=1) * xs.shape[0] ** (-1.0 / 3.0)
            safe = np.where(width > 0, width, 1.0)
            n_bins = np.ceil(span / safe).astype(np.int64) + 1  # reaches >= half a cell past the max
            lower = lo - width / 2.0
        elif self.bins == 1:
            n_bins = np.ones(xs.shape[1], dtype=np.int64)
            width, lower = 2.0 * span, lo - span / 2.0
        else:
            n_bins = np.full(xs.shape[1], int(self.bins), dtype=np.int64)
            width = span / (int(self.bins) - 1)
            lower = lo - width / 2.0
        constant = ~(width > 0)
        n_bins[constant], width[constant], lower[constant] = 1, 1.0, lo[constant] - 0.5
        return lower, width, n_bins

    def get_params(self) -> dict[str, Any]:
        params = {"bins": self.bins, "alpha": self.alpha}
        return params

    def fitted_params(self) -> dict[str, Any]:
        # "auto" is a rule of the data (Scott's h), not a search: each calibration fold applies it
        # to its own rows, as the final model did.
        self._check_fitted()
        return self.get_params()
