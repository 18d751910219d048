"""k-nearest-neighbour density estimate.

    p(x) = k / (n * V_d * d_k(x)^d),    V_d = pi^(d/2) / Gamma(d/2 + 1)

with d_k(x) the distance from x to its k-th nearest training point: the ball of radius d_k(x)
holds k of the n points, i.e. probability mass about k/n, spread over its volume V_d d_k^d.
Where a histogram or a kernel fixes the volume and counts the points, kNN fixes the count
and measures the volume, so it adapts its resolution to the local density of the data.

It is *not* a normalised density: in the tails d_k(x) grows like |x|, so p decays only like
|x|^-d and its integral diverges (in 1-D, p ~ k / (2 n |x|) and the integral over [-R, R]
grows like (k/n) log R). It is still a useful score: -log p is a classic anomaly score, and it
ranks points the way the neighbour distance does. Hence no sampling (there is no distribution
to sample), and with ``k="auto"`` the held-out likelihood used to choose k is only a
heuristic: it compares functions that are not normalised, by different amounts for each k.
In practice it favours small k. Where the density is locally constant,
n V_d d_k^d p ~ Gamma(k, 1), so E[log p_hat] = log p + log k - digamma(k): an upward bias
that is largest at k = 1 (+0.58 nats) and fades as 1/(2k). In many dimensions the
-d log d_k term dominates. On 500 rows we measured k = 1 for Gaussian data in 1-D and 2-D and
for 64-D digits. So the default is a fixed k = 5 (PyOD's KNN detector uses the same default),
and "auto" is there for when a data-driven choice is wanted anyway.

Scoring, for the exported graph: squared distances by the expanded form
||x||^2 + ||y||^2 - 2 x.y (one matrix product), then the k smallest by ``torch.topk`` (ONNX
TopK with a fixed k), floored at a tiny positive value so that a query sitting on k or more
identical training points gets a large finite log-density instead of +inf. Note that a
training point scored against its own training set counts itself as its first neighbour.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

from training.estimators.base import DensityEstimator, as_float64
from training.estimators.kde import log_unit_ball_volume, squared_distances

# Floor on the squared k-th distance: the smallest normal float64, so log stays finite.
_MIN_SQ_DISTANCE = float(torch.finfo(torch.float64).tiny)
# Rows per chunk (choosing k, the estimator's log_prob), so that one [rows, n_train] matrix holds about 4M elements.
_CHUNK_ELEMENTS = 1 << 22


class KNNDensityCore(nn.Module):
    def __init__(self, points: torch.Tensor, k: int):
        super().__init__()
        n, d = points.shape
        self.k = int(k)
        self.n_features = d
        self.register_buffer("points", points.contiguous())
        self.register_buffer("points_sq", (points * points).sum(dim=1))
        self.register_buffer("log_const", torch.tensor(knn_log_const(self.k, n, d), dtype=torch.float64))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        dist2 = squared_distances(x, self.points, self.points_sq)
        kth = torch.topk(dist2, self.k, dim=1, largest=False).values[:, self.k - 1]
        return self.log_const - 0.5 * self.n_features * torch.log(torch.clamp(kth, min=_MIN_SQ_DISTANCE))


def knn_log_const(k: int, n: int, d: int) -> float:
    """log k - log n - log V_d."""
    return math.log(k) - math.log(n) - log_unit_ball_volume(d)


class KNNDensity(DensityEstimator):
    """k-nearest-neighbour density (unnormalised; scores only, no sampling).

    Parameters
    ----------
    k : int in [1, n] or "auto", default 5
        "auto" holds out ``validation_fraction`` of the rows, tries k on a log-spaced grid
        from 1 to the number of remaining rows, keeps the k with the highest mean held-out
        log p (a heuristic, see the module docstring), and uses that k with all rows.
    validation_fraction : float in (0, 1), default 0.2
    random_state : int, default 0
        Seeds the validation split.

    Attributes after fit: ``k_``; with "auto", ``k_candidates_`` and ``validation_scores_``.
    """

    card_limits = ("The kNN estimate k/(n·V_d·d_k^d) does not integrate to 1: its tails decay like "
                   "1/|x|^d. Use its scores to rank rows, not as probabilities.")

    family = "knn"

    def __init__(self, k: int | str = 5, validation_fraction: float = 0.2, random_state: int = 0):
        self.k = k
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _validate_params(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if isinstance(self.k, str):
            if self.k != "auto":
                raise ValueError(f"k must be an int in [1, n_samples={n}] or 'auto', got {self.k!r}")
            if n < 2:
                raise ValueError(f"k='auto' needs at least 2 rows (a validation split), got {n}")
        elif not (isinstance(self.k, numbers.Integral) and not isinstance(self.k, bool) and 1 <= self.k <= n):
            raise ValueError(f"k must be an int in [1, n_samples={n}] or 'auto', got {self.k!r}")
        if not (isinstance(self.validation_fraction, numbers.Real) and 0 < self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must be a float in (0, 1), got {self.validation_fraction!r}")
        if not isinstance(self.random_state, numbers.Integral):
            raise ValueError(f"random_state must be an int, got {self.random_state!r}")

    def _fit(self, x: torch.Tensor) -> nn.Module:
        self.k_ = self._choose_k(x) if self.k == "auto" else int(self.k)
        return KNNDensityCore(x, self.k_)

    def _choose_k(self, x: torch.Tensor) -> int:
        n, d = x.shape
        n_val = min(n - 1, max(1, round(self.validation_fraction * n)))
        order = torch.from_numpy(np.random.default_rng(self.random_state).permutation(n))
        val, train = x[order[:n_val]], x[order[n_val:]]
        n_train = train.shape[0]
        ks = np.unique(np.round(np.geomspace(1, n_train, 20)).astype(np.int64))
        train_sq = (train * train).sum(dim=1)
        chunk = max(1, _CHUNK_ELEMENTS // n_train)
        totals = np.zeros(len(ks))
        for start in range(0, n_val, chunk):
            dist2 = squared_distances(val[start:start + chunk], train, train_sq)
            nearest = torch.topk(dist2, int(ks[-1]), dim=1, largest=False).values
            kth = torch.clamp(nearest[:, torch.from_numpy(ks - 1)], min=_MIN_SQ_DISTANCE)
            totals += (-0.5 * d * torch.log(kth)).sum(dim=0).numpy()
        self.k_candidates_ = ks
        self.validation_scores_ = totals / n_val + np.array([knn_log_const(int(k), n_train, d) for k in ks])
        return int(ks[int(np.argmax(self.validation_scores_))])

    @torch.no_grad()
    def log_prob(self, X: Any) -> torch.Tensor:
        """As the base class, but in chunks of rows, so the [N, n] distance matrix stays small."""
        self._check_fitted()
        x = as_float64(X)
        score = super().log_prob
        rows = max(1, _CHUNK_ELEMENTS // self.core_.points.shape[0])
        return torch.cat([score(part) for part in torch.split(x, rows)])

    def get_params(self) -> dict[str, Any]:
        params = {"k": self.k, "validation_fraction": self.validation_fraction,
                  "random_state": self.random_state}
        return params

    def fitted_params(self) -> dict[str, Any]:
        self._check_fitted()
        return {"k": int(self.k_), "validation_fraction": self.validation_fraction,
                "random_state": self.random_state}
