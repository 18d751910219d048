"""Kernel density estimation, with scikit-learn's kernels and normalisation.

    p(x) = 1/n sum_i K_h(x - x_i),    K_h(u) = h^-d K(||u|| / h)

for four of the kernels of ``sklearn.neighbors.KernelDensity``, each in the unnormalised form
scikit-learn uses (``r = ||u|| / h``) and with its normalising constant c_d:

    gaussian      exp(-r^2 / 2)          log c_d = (d/2) log 2 pi
    tophat        1            (r < 1)   log c_d = log V_d
    epanechnikov  1 - r^2      (r < 1)   log c_d = log V_d + log(2 / (d + 2))
    linear        1 - r        (r < 1)   log c_d = log V_d - log(d + 1)

with V_d = pi^(d/2) / Gamma(d/2 + 1) the volume of the unit d-ball; the log-density is
``logsumexp_i log K(r_i) - log c_d - d log h - log n``, scikit-learn's ``score_samples`` with
``atol = rtol = 0``. The compact kernels are zero for r >= 1 (strictly, as scikit-learn), so a
point farther than h from every training point has log-density -inf.

We compute the sum exactly. scikit-learn's tree keeps running bounds with log-subtractions,
which leave float64 residue of about 1e-14 (relative to the kernel's peak, summed over the
tree) where the true sum is smaller. In 64 dimensions at small bandwidths it returns that
residue instead of the density: on the BENCHMARKS D1 digits split at h = 0.1, 48 % of the test
rows are too high, by up to 112 nats, for a mean of 38.3 nats per image where the exact KDE
gives 25.5. For the epanechnikov and linear kernels it can also return a finite value where the
density is exactly 0. Where the sum is not tiny the two agree to 1e-9 or better (see
tests/unit/training/test_kde.py).

Scoring is written for the exported graph (ONNX opset 17, legacy exporter, dynamic batch) and
for speed, since an [N, n] matrix is touched a few times per query batch. Squared distances are
the expanded ||x||^2 + ||y||^2 - 2 x.y in units of h, with the ||y||^2 column folded into the
one matrix product ([x/h, 1] @ [y/h; -||y/h||^2/2]^T). The gaussian's log-kernel is then that
product minus a per-row term, which comes out of the log-sum-exp; the compact kernels form
r^2 clamped at 0 (rounding can make it slightly negative) and take log of a value clamped at
0, so outside the support log(0) = -inf cleanly. The log-sum-exp is spelled out as
max + log(sum(exp(a - max))) (not torch.logsumexp: plain ReduceMax/Exp/ReduceSum/Log) with
the max clamped to a finite value, so that a row whose terms are all -inf gives -inf rather
than NaN (-inf - -inf). The served gaussian graph takes that log-sum-exp's exponentials in
float32 (``logsumexp.py``: a 64-row run of the S1 KDE 1.6-1.85x faster in four runs of
bench/served_tail.py, e.g. 6.4 -> 4.1 ms, outputs equal to float32 rounding).

The core's ``log_prob`` takes any number of rows and builds [N, n] matrices; the server chunks
its requests, and the estimator's ``log_prob`` and cross-validation chunk themselves (about
4M matrix elements at a time).

Bandwidth. A float; ``"scott"`` = sigma n^(-1/(d+4)) or ``"silverman"`` =
sigma (n (d+2) / 4)^(-1/(d+4)), the textbook rules with sigma the root mean per-feature
(ddof=1) variance. scikit-learn's string rules return the bare factors n^(-1/(d+4)) etc.,
i.e. they assume standardised data; ours scale with the data. ``"cv"`` picks the bandwidth
from a log-spaced grid by k-fold cross-validation, maximising the mean held-out
log-likelihood (the protocol of BENCHMARKS D1); the default grid is 31 values from
sigma * 10^-2.5 to sigma * 10^0.5 (steps of 26%).

Sampling, with every random number a graph input (see ``serving.repository.noise``):

* ``pick`` uniform [N] chooses a training point, index = #{i : c_i < u} with c the
  cumulative weights (c_n = 1 exactly), clamped to n - 1 — a comparison and a sum, which
  export as Less/ReduceSum rather than a search.
* the kernel offset, scaled by h:

  - gaussian: ``z`` normal [N, d]; offset z.
  - tophat (uniform in the unit ball): ``direction`` normal [N, d] normalised to the unit
    sphere, times v^(1/d) with ``radius`` v uniform [N] — P(r < t) = t^d is the volume
    fraction of the ball of radius t.
  - epanechnikov: a uniform point of the unit ball in d + 2 dimensions (``direction``
    [N, d+2], ``radius`` [N], as above) keeps its first d coordinates. The projection of the
    uniform (d+2)-ball onto d coordinates has density proportional to the volume of the
    2-disc over each point, pi (1 - r^2): exactly the Epanechnikov kernel.
  - linear: the radial density is r^(d-1) (1 - r), i.e. r ~ Beta(d, 2), which is the
    second-largest of d + 1 uniforms (``radius`` [N, d+1]; torch.topk(., 2) exports as TopK),
    times a uniform direction (``direction`` [N, d]).

No data-dependent Python control flow appears in ``log_prob`` or ``sample_from_noise``:
the kernel is fixed at fit time, so the traced graph is valid for every batch size.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.base import DensityEstimator, as_float64
from training.estimators.logsumexp import finite_log_sum_exp

KERNELS = ("gaussian", "tophat", "epanechnikov", "linear")
BANDWIDTH_RULES = ("scott", "silverman", "cv")

# Rows per chunk (cross-validation, the estimator's log_prob) are chosen so that one
# [rows, n_train] float64 matrix holds about this many elements (32 MiB); a handful of such
# temporaries are alive at once.
_CHUNK_ELEMENTS = 1 << 22


def log_unit_ball_volume(d: int) -> float:
    """log V_d, V_d = pi^(d/2) / Gamma(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def log_kernel_norm(kernel: str, h: float, d: int) -> float:
    """log of the factor that makes K_h integrate to 1 (scikit-learn's ``_log_kernel_norm``)."""
    if kernel == "gaussian":
        factor = 0.5 * d * math.log(2.0 * math.pi)
    elif kernel == "tophat":
        factor = log_unit_ball_volume(d)
    elif kernel == "epanechnikov":
        factor = log_unit_ball_volume(d) + math.log(2.0 / (d + 2.0))
    elif kernel == "linear":
        factor = log_unit_ball_volume(d) - math.log(d + 1.0)
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return -factor - d * math.log(h)


def squared_distances(x: torch.Tensor, points: torch.Tensor, points_sq: torch.Tensor) -> torch.Tensor:
    """[N, n] squared distances ||x||^2 + ||y||^2 - 2 x.y, clamped at 0 against rounding."""
    x_sq = (x * x).sum(dim=1, keepdim=True)
    return torch.clamp(x_sq + points_sq - 2.0 * (x @ points.T), min=0.0)


def log_kernel(r2: torch.Tensor, kernel: str) -> torch.Tensor:
    """Unnormalised log K at squared scaled distance r^2 = ||u||^2 / h^2 (-inf outside support)."""
    if kernel == "gaussian":
        return -0.5 * r2
    if kernel == "tophat":
        return torch.where(r2 < 1.0, torch.zeros_like(r2), torch.full_like(r2, -math.inf))
    if kernel == "epanechnikov":
        return torch.log(torch.clamp(1.0 - r2, min=0.0))
    if kernel == "linear":
        return torch.log(torch.clamp(1.0 - torch.sqrt(r2), min=0.0))
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def logsumexp_rows(a: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(a_ij), as max + log(sum(exp(a - max))).

    torch.logsumexp is avoided to keep the exported graph to plain ReduceMax/Exp/ReduceSum/Log.
    The max is clamped to a finite value so an all -inf row gives -inf, not NaN.
    """
    m = torch.clamp(a.max(dim=1).values, min=-1e300)
    return m + torch.log(torch.exp(a - m[:, None]).sum(dim=1))


def _unit_directions(z: torch.Tensor) -> torch.Tensor:
    """Normal rows normalised onto the unit sphere: a uniform direction."""
    norm = torch.sqrt((z * z).sum(dim=1, keepdim=True))
    return z / torch.clamp(norm, min=1e-300)


class KernelDensityCore(nn.Module):
    def __init__(self, points: torch.Tensor, bandwidth: float, kernel: str):
        super().__init__()
        n, d = points.shape
        self.kernel = kernel
        self.n_features = d
        scaled = points / bandwidth
        # [y/h ; -||y/h||^2 / 2] as columns: [x/h, 1] @ this = x.y/h^2 - ||y||^2/2h^2 in one product.
        augmented = torch.cat([scaled, -0.5 * (scaled * scaled).sum(dim=1, keepdim=True)], dim=1)
        self.register_buffer("points", points.contiguous())
        self.register_buffer("augmented_t", augmented.T.contiguous())
        self.register_buffer("bandwidth", torch.tensor(float(bandwidth), dtype=torch.float64))
        self.register_buffer("log_norm", torch.tensor(log_kernel_norm(kernel, bandwidth, d) - math.log(n),
                                                      dtype=torch.float64))
        cumulative = torch.arange(1, n + 1, dtype=torch.float64) / n  # last entry is exactly 1
        self.register_buffer("cumulative_weights", cumulative)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self._log_prob(x, logsumexp_rows)

    def served_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log_prob`` for the score graph: the gaussian kernel's terms are finite, so its
        log-sum-exp takes float32 exponentials; the compact kernels' -inf terms keep float64."""
        if self.kernel == "gaussian":
            return self._log_prob(x, lambda a: finite_log_sum_exp(a, torch.float32))
        return self._log_prob(x, logsumexp_rows)

    def _log_prob(self, x: torch.Tensor, log_sum_exp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        xs = x / self.bandwidth
        half_x_sq = 0.5 * (xs * xs).sum(dim=1)
        # a_ij = -r_ij^2 / 2 + ||x_i||^2 / 2h^2: the expanded squared distance, one matrix product
        a = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1) @ self.augmented_t
        if self.kernel == "gaussian":
            # log K = a_ij - ||x_i||^2/2h^2; the row term leaves the log-sum-exp. Unclamped: a
            # rounding-negative r^2 (~1e-16 ||x||^2/h^2) changes K by that relative amount only.
            return log_sum_exp(a) - half_x_sq + self.log_norm
        r2 = torch.clamp(2.0 * (half_x_sq[:, None] - a), min=0.0)
        return log_sum_exp(log_kernel(r2, self.kernel)) + self.log_norm

    def noise_specs(self) -> list[TensorSpec]:
        d = self.n_features
        specs = [TensorSpec(name="pick", shape=[-1], noise="uniform")]
        if self.kernel == "gaussian":
            specs.append(TensorSpec(name="z", shape=[-1, d], noise="normal"))
        elif self.kernel == "tophat":
            specs += [TensorSpec(name="direction", shape=[-1, d], noise="normal"),
                      TensorSpec(name="radius", shape=[-1], noise="uniform")]
        elif self.kernel == "epanechnikov":
            specs += [TensorSpec(name="direction", shape=[-1, d + 2], noise="normal"),
                      TensorSpec(name="radius", shape=[-1], noise="uniform")]
        else:  # linear
            specs += [TensorSpec(name="direction", shape=[-1, d], noise="normal"),
                      TensorSpec(name="radius", shape=[-1, d + 1], noise="uniform")]
        return specs

    def sample_from_noise(self, pick: torch.Tensor, *kernel_noise: torch.Tensor) -> torch.Tensor:
        n, d = self.points.shape
        below = (self.cumulative_weights < pick.to(torch.float64)[:, None]).to(torch.int64)
        index = torch.clamp(below.sum(dim=1), max=n - 1)
        centre = self.points[index]
        noise = [t.to(torch.float64) for t in kernel_noise]
        if self.kernel == "gaussian":
            offset = noise[0]
        elif self.kernel == "tophat":
            offset = _unit_directions(noise[0]) * torch.pow(noise[1], 1.0 / d)[:, None]
        elif self.kernel == "epanechnikov":
            ball = _unit_directions(noise[0]) * torch.pow(noise[1], 1.0 / (d + 2))[:, None]
            offset = ball[:, :d]
        else:  # linear: r ~ Beta(d, 2), the second-largest of d + 1 uniforms
            radius = torch.topk(noise[1], 2, dim=1).values[:, 1]
            offset = _unit_directions(noise[0]) * radius[:, None]
        return centre + self.bandwidth * offset


class KernelDensity(DensityEstimator):
    """Kernel density estimate: scikit-learn's KernelDensity for the same kernel and bandwidth,
    computed exactly (the two agree wherever scikit-learn's tree arithmetic is exact; see the
    module docstring for where it is not).

    Parameters
    ----------
    kernel : {"gaussian", "tophat", "epanechnikov", "linear"}, default "gaussian"
    bandwidth : float > 0 or {"scott", "silverman", "cv"}, default "cv"
        The rules are scaled by the data's spread (see the module docstring); "cv" is the
        default because in many dimensions the rules of thumb, derived for a Gaussian,
        oversmooth (on the D1 digits split Scott gives 0.23 and 18 held-out nats per image,
        cross-validation 0.13 and 31.6).
    cv_bandwidths : sequence of floats > 0 or None, default None
        The grid for "cv"; None means 31 log-spaced values from 10^-2.5 sigma to 10^0.5 sigma.
    cv_folds : int >= 2, default 3
    random_state : int, default 0
        Seeds the shuffle that assigns rows to folds.

    Attributes after fit: ``bandwidth_``; with "cv", ``cv_bandwidths_`` and ``cv_scores_``
    (mean held-out log-likelihood per grid value).
    """

    family = "kde"

    def __init__(self, kernel: str = "gaussian", bandwidth: float | str = "cv",
                 cv_bandwidths: Any = None, cv_folds: int = 3, random_state: int = 0):
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.cv_bandwidths = cv_bandwidths
        self.cv_folds = cv_folds
        self.random_state = random_state

    def _validate_params(self, x: torch.Tensor) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if isinstance(self.bandwidth, str):
            if self.bandwidth not in BANDWIDTH_RULES:
                raise ValueError(f"bandwidth must be a float > 0 or one of {BANDWIDTH_RULES}, "
                                 f"got {self.bandwidth!r}")
        elif not (_is_real(self.bandwidth) and 0 < self.bandwidth < math.inf):
            raise ValueError(f"bandwidth must be a float > 0 or one of {BANDWIDTH_RULES}, "
                             f"got {self.bandwidth!r}")
        if self.cv_bandwidths is not None:
            grid = np.asarray(self.cv_bandwidths, dtype=object).ravel()
            if grid.size == 0 or not all(_is_real(h) and 0 < h < math.inf for h in grid):
                raise ValueError(f"cv_bandwidths must be None or a non-empty sequence of floats > 0, "
                                 f"got {self.cv_bandwidths!r}")
        if not (isinstance(self.cv_folds, numbers.Integral) and not isinstance(self.cv_folds, bool)
                and self.cv_folds >= 2):
            raise ValueError(f"cv_folds must be an int >= 2, got {self.cv_folds!r}")
        if not isinstance(self.random_state, numbers.Integral):
            raise ValueError(f"random_state must be an int, got {self.random_state!r}")
        n = x.shape[0]
        if self.bandwidth in ("scott", "silverman", "cv") and n < 2:
            raise ValueError(f"bandwidth={self.bandwidth!r} needs at least 2 rows, got {n}")
        if self.bandwidth == "cv" and n < self.cv_folds:
            raise ValueError(f"cv_folds={self.cv_folds} needs at least as many rows, got {n}")

    def _fit(self, x: torch.Tensor) -> nn.Module:
        if isinstance(self.bandwidth, str):
            sigma = data_scale(x)
            if sigma == 0.0:
                raise ValueError(f"bandwidth={self.bandwidth!r} scales with the data's spread, "
                                 "which is 0 (all rows equal): pass a float bandwidth")
            if self.bandwidth == "cv":
                self.bandwidth_ = self._cross_validate(x, sigma)
            else:
                self.bandwidth_ = rule_of_thumb(self.bandwidth, x.shape[0], x.shape[1], sigma)
        else:
            self.bandwidth_ = float(self.bandwidth)
        return KernelDensityCore(x, self.bandwidth_, self.kernel)

    def _cross_validate(self, x: torch.Tensor, sigma: float) -> float:
        """The grid value with the highest mean held-out log-likelihood over k folds.

        The distances of a held-out chunk to the training fold are computed once and reused for
        every bandwidth; chunks bound the memory to a few [rows, n_train] matrices.
        """
        if self.cv_bandwidths is None:
            grid = sigma * np.logspace(-2.5, 0.5, 31)
        else:
            grid = np.sort(np.asarray(self.cv_bandwidths, dtype=np.float64).ravel())
        n, d = x.shape
        order = torch.from_numpy(np.random.default_rng(self.random_state).permutation(n))
        totals = np.zeros(len(grid))
        for held_out in torch.tensor_split(order, self.cv_folds):
            mask = torch.ones(n, dtype=torch.bool)
            mask[held_out] = False
            train, test = x[mask], x[held_out]
            train_sq = (train * train).sum(dim=1)
            chunk = chunk_rows(train.shape[0])
            offsets = np.array([log_kernel_norm(self.kernel, h, d) for h in grid]) - math.log(train.shape[0])
            for start in range(0, test.shape[0], chunk):
                dist2 = squared_distances(test[start:start + chunk], train, train_sq)
                for j, h in enumerate(grid):
                    ll = logsumexp_rows(log_kernel(dist2 / (h * h), self.kernel)) + offsets[j]
                    totals[j] += float(ll.sum())
        self.cv_bandwidths_ = grid
        self.cv_scores_ = totals / n
        finite = np.isfinite(self.cv_scores_)
        if not finite.any():
            raise ValueError(f"every bandwidth in the CV grid gives some held-out row zero density "
                             f"under the {self.kernel} kernel: pass larger cv_bandwidths")
        best = int(np.argmax(np.where(finite, self.cv_scores_, -np.inf)))
        if len(grid) > 1 and best in (0, len(grid) - 1):
            warnings.warn(f"the cross-validated bandwidth {grid[best]:.4g} is at the edge of the grid "
                          f"[{grid[0]:.4g}, {grid[-1]:.4g}]: consider widening cv_bandwidths", stacklevel=3)
        return float(grid[best])

    @torch.no_grad()
    def log_prob(self, X: Any) -> torch.Tensor:
        """As the base class, but in chunks of rows, so the [N, n] matrices stay small."""
        self._check_fitted()
        x = as_float64(X)
        score = super().log_prob
        return torch.cat([score(part) for part in torch.split(x, chunk_rows(self.core_.points.shape[0]))])

    def get_params(self) -> dict[str, Any]:
        params = {"kernel": self.kernel, "bandwidth": self.bandwidth,
                  "cv_bandwidths": None if self.cv_bandwidths is None else [float(h) for h in
                                                                            np.ravel(self.cv_bandwidths)],
                  "cv_folds": self.cv_folds, "random_state": self.random_state}
        return params

    def fitted_params(self) -> dict[str, Any]:
        self._check_fitted()
        return {"kernel": self.kernel, "bandwidth": float(self.bandwidth_), "cv_folds": self.cv_folds,
                "random_state": self.random_state}


def chunk_rows(n_points: int) -> int:
    """Query rows per chunk so that one [rows, n_points] float64 matrix has ~_CHUNK_ELEMENTS."""
    return max(1, _CHUNK_ELEMENTS // n_points)


def data_scale(x: torch.Tensor) -> float:
    """sigma = sqrt(mean per-feature variance), ddof=1: the spread the rules of thumb scale by."""
    return float(torch.sqrt(x.var(dim=0, unbiased=True).mean()))


def rule_of_thumb(rule: str, n: int, d: int, sigma: float) -> float:
    """Scott's sigma n^(-1/(d+4)) or Silverman's sigma (n (d+2)/4)^(-1/(d+4))."""
    if rule == "scott":
        return sigma * n ** (-1.0 / (d + 4))
    if rule == "silverman":
        return sigma * (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
    raise ValueError(f"rule must be 'scott' or 'silverman', got {rule!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
