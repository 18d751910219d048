"""Gaussian mixture fitted by expectation-maximisation (EM).

The model is a weighted sum of K Gaussians:

    p(x) = sum_k w_k N(x; mu_k, Sigma_k),    w_k >= 0,  sum_k w_k = 1

EM alternates two closed-form steps (Dempster, Laird & Rubin 1977).

E-step — responsibilities, the posterior probability that component k produced row i, kept in
log space so that no density underflows (a 64-dimensional density is easily below 1e-300):

    a_ik = log w_k + log N(x_i; mu_k, Sigma_k)
    log r_ik = a_ik - logsumexp_j a_ij,    and  log p(x_i) = logsumexp_j a_ij

M-step — weighted moments, each row counted with weight r_ik in component k:

    N_k = sum_i r_ik,   w_k = N_k / n,   mu_k = (1/N_k) sum_i r_ik x_i,
    Sigma_k = (1/N_k) sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T    (+ reg_covar I)

("diag" keeps only the diagonal of Sigma_k.)

Why the likelihood never falls. For any distribution q_i over components,

    log p(x_i | theta) = ELBO(q_i, theta) + KL(q_i || p(k | x_i, theta)),
    ELBO(q_i, theta)   = sum_k q_ik log(w_k N(x_i; mu_k, Sigma_k) / q_ik)

and KL >= 0. The E-step sets q = p(k | x, theta_t), making the bound tight:
L(theta_t) = ELBO(q_t, theta_t). The M-step maximises ELBO(q_t, .) exactly (the moments above
are its stationary point), so L(theta_t+1) >= ELBO(q_t, theta_t+1) >= ELBO(q_t, theta_t) = L(theta_t).
The argument needs an *exact* M-step: ``reg_covar > 0`` (a ridge added to the maximiser) and the
handling of a collapsed component (reseeded once, then frozen: see ``_m_step``) step outside it,
which is why the monotonicity test runs with ``reg_covar=0`` on well-conditioned data.

Scoring (the exported maths). With Sigma_k = L_k L_k^T and P_k = L_k^{-T} (so Sigma_k^{-1} =
P_k P_k^T), the Mahalanobis term is ||(x - mu_k) P_k||^2 = ||x P_k - mu_k P_k||^2. Stacking the
P_k side by side gives P [d, K d], so *one* matrix product x @ P scores every component at once:
reshape to [N, K, d] and subtract the stacked mu_k P_k. For diagonal covariances with precisions
pi_k = 1 / sigma_k^2, the same term is (x*x) @ pi^T - 2 x @ (mu pi)^T + sum_j mu_kj^2 pi_kj: two
matrix products. Then

    log N(x; mu_k, Sigma_k) = -d/2 log(2 pi) + sum_j log diag(P_k)_j - 1/2 ||x P_k - mu_k P_k||^2

and log p(x) = m + log sum_k exp(a_k - m) with m = max_k a_k, written out (not torch.logsumexp)
so the legacy ONNX exporter emits plain ReduceMax/Exp/ReduceSum/Log. The served score graph
takes those exponentials in float32 (``logsumexp.py``; a 1,024-row S1 run 1.3-2.0x faster
in four runs of bench/served_tail.py, e.g. 289 -> 220 us, outputs equal to float32 rounding);
fitting and ``log_prob`` stay float64.

Sampling from noise. A uniform u picks component k = #{j : c_j < u} (c the cumulative weights,
clamped to K - 1 against rounding), and a standard normal z becomes x = mu_k + L_k z (full: the
rows' L_k gathered into [N, d, d] and one batched product; diag: mu_k + sigma_k * z).

Model choice ("auto"). Candidate (components, covariance type) pairs are fitted on 80% of the
rows and scored on the held-out 20% (``selection="validation"``), or scored by BIC on all rows
(``selection="bic"``); the winner is refitted on every row.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from serving.repository.manifest import TensorSpec
from training.neural import capped_threads
from training.estimators.base import DensityEstimator
from training.estimators.logsumexp import finite_log_sum_exp

COVARIANCE_TYPES = ("full", "diag")
SELECTIONS = ("validation", "bic")
DEFAULT_CANDIDATES = (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50)
VALIDATION_FRACTION = 0.2
LLOYD_ITERATIONS = 10
# A component with fewer rows' worth of responsibility than this has collapsed (see _m_step).
MIN_COMPONENT_ROWS = 1.0
_TINY = 1e-300  # floor for N_k in divisions and for a frozen component's weight (log = -690.8)
_LOG_2PI = math.log(2 * math.pi)


class SingularCovarianceError(ValueError):
    """A component's covariance is not positive definite even after ``reg_covar``."""


# ---- the fitted core: the maths the ONNX graphs are made of ----------------------------------

class _MixtureCore(nn.Module):
    """Shared by both covariance types: weights, means, the log-sum-exp and the component pick."""

    covariance_type: str

    def __init__(self, weights: torch.Tensor, means: torch.Tensor):
        super().__init__()
        self.n_components, self.n_features = means.shape
        self.register_buffer("weights", weights)
        self.register_buffer("means", means)
        self.register_buffer("cum_weights", torch.cumsum(weights, dim=0))

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """a_ik = log w_k + log N(x_i; mu_k, Sigma_k), float64 [N, K]."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return finite_log_sum_exp(self.log_joint(x))

    def served_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log_prob`` for the score graph: float32 exponentials in the log-sum-exp (log_joint is finite)."""
        return finite_log_sum_exp(self.log_joint(x), torch.float32)

    def noise_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name="u", shape=[-1], noise="uniform"),
                TensorSpec(name="z", shape=[-1, self.n_features], noise="normal")]

    def component_index(self, u: torch.Tensor) -> torch.Tensor:
        """k = #{j : c_j < u}, clamped to K - 1 (u may round to 1.0 in float32): int64 [N]."""
        below = (self.cum_weights.unsqueeze(0) < u.to(torch.float64).unsqueeze(1)).to(torch.float64)
        return below.sum(dim=1).clamp(max=self.n_components - 1).to(torch.int64)

    def sample_from_noise(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        k = self.component_index(u)
        return self.means.index_select(0, k) + self._scale(z.to(torch.float64), k)

    def _scale(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FullMixtureCore(_MixtureCore):
    """Full covariances, scored through stacked precision Cholesky factors P [d, K d]."""

    covariance_type = "full"

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor):
        super().__init__(weights, means)
        K, d = means.shape
        chol, info = torch.linalg.cholesky_ex(covariances)
        if bool((info != 0).any()):
            bad = torch.nonzero(info != 0).flatten().tolist()
            raise SingularCovarianceError(
                f"the covariance of component(s) {bad} is singular even after reg_covar "
                "(constant or collinear features within a component): increase reg_covar, "
                "e.g. 1e-6, or use fewer components")
        eye = torch.eye(d, dtype=chol.dtype).expand(K, d, d)
        prec_chol = torch.linalg.solve_triangular(chol, eye, upper=False).mT  # P_k = L_k^{-T}
        self.register_buffer("chol", chol)
        self.register_buffer("prec_chol_stacked", prec_chol.permute(1, 0, 2).reshape(d, K * d).contiguous())
        self.register_buffer("mean_prec", torch.einsum("kd,kde->ke", means, prec_chol))
        log_det_prec_half = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(dim=1)
        self.register_buffer("log_const", torch.log(weights) - 0.5 * d * _LOG_2PI + log_det_prec_half)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.prec_chol_stacked).reshape(-1, self.n_components, self.n_features) - self.mean_prec
        return self.log_const - 0.5 * (y * y).sum(dim=2)

    def _scale(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (self.chol.index_select(0, k) @ z.unsqueeze(2)).squeeze(2)  # L_k z, [N, d]


class DiagMixtureCore(_MixtureCore):
    """Diagonal covariances, scored as (x*x) @ pi^T - 2 x @ (mu pi)^T + const."""

    covariance_type = "diag"

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        super().__init__(weights, means)
        d = means.shape[1]
        if not bool((variances > 0).all()):
            bad = torch.nonzero((variances <= 0).any(dim=1)).flatten().tolist()
            raise SingularCovarianceError(
                f"component(s) {bad} have a zero variance even after reg_covar (a feature constant "
                "within a component): increase reg_covar, e.g. 1e-6, or use fewer components")
        precisions = 1.0 / variances
        self.register_buffer("std", torch.sqrt(variances))
        self.register_buffer("precisions", precisions)
        self.register_buffer("mean_prec", means * precisions)
        self.register_buffer("log_const", torch.log(weights) - 0.5 * d * _LOG_2PI
                             - 0.5 * torch.log(variances).sum(dim=1)
                             - 0.5 * (means * means * precisions).sum(dim=1))

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_const - 0.5 * ((x * x) @ self.precisions.T) + x @ self.mean_prec.T

    def _scale(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.std.index_select(0, k) * z


def make_core(weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor,
              covariance_type: str) -> _MixtureCore:
    """Core for ``covariances`` [K, d, d] ("full") or variances [K, d] ("diag")."""
    cls = FullMixtureCore if covariance_type == "full" else DiagMixtureCore
    return cls(weights, means, covariances)


# ---- EM ----------------------------------------------------------------------------------

@dataclass
class _EMResult:
    core: _MixtureCore
    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    lower_bounds: list[float]
    converged: bool
    n_iter: int
    n_reseeds: int


def _kmeans_plus_plus(x: torch.Tensor, K: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; 2 + log K trials per centre, as
    scikit-learn does): each new centre is drawn with probability proportional to the squared
    distance to the nearest centre so far, keeping the trial that lowers the total the most."""
    n = x.shape[0]
    sq_norms = (x * x).sum(dim=1)

    def sq_dist(rows: torch.Tensor) -> torch.Tensor:  # [len(rows), n]
        c = x[rows]
        return ((c * c).sum(dim=1, keepdim=True) - 2 * c @ x.T + sq_norms).clamp(min=0)

    centres = [int(rng.integers(n))]
    closest = sq_dist(torch.tensor(centres))[0]
    trials = 2 + int(math.log(K))
    for _ in range(1, K):
        total = float(closest.sum())
        p = closest.numpy() / total if total > 0 else np.full(n, 1.0 / n)
        p = p / p.sum()
        candidates = rng.choice(n, size=trials, p=p)
        d2 = torch.minimum(closest.unsqueeze(0), sq_dist(torch.as_tensor(candidates)))
        best = int(torch.argmin(d2.sum(dim=1)))
        centres.append(int(candidates[best]))
        closest = d2[best]
    return x[torch.tensor(centres)].clone()


def _lloyd(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A few Lloyd iterations; returns (labels [n], squared distance to own centre [n]).
    An empty cluster keeps its centre (EM's reseeding deals with it if it stays empty)."""
    K = centres.shape[0]
    sq_norms = (x * x).sum(dim=1, keepdim=True)
    labels = None
    for _ in range(LLOYD_ITERATIONS):
        d2 = (sq_norms - 2 * x @ centres.T + (centres * centres).sum(dim=1)).clamp(min=0)
        new = torch.argmin(d2, dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=K).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        filled = counts > 0
        centres = torch.where(filled.unsqueeze(1), sums / counts.clamp(min=1).unsqueeze(1), centres)
    d2 = (sq_norms - 2 * x @ centres.T + (centres * centres).sum(dim=1)).clamp(min=0)
    labels = torch.argmin(d2, dim=1)
    return labels, d2.gather(1, labels.unsqueeze(1)).squeeze(1)


@dataclass
class _Collapse:
    """What to do with components that explain (almost) no rows."""

    row_fit: torch.Tensor          # [n] how well each row is explained now; lowest = reseed target
    fallback_cov: torch.Tensor     # the whole data's covariance (+ reg), a reseeded component's start
    reseedable: torch.Tensor       # [K] bool: not yet reseeded in this run
    previous: tuple[torch.Tensor, torch.Tensor] | None  # (means, covs) to freeze at, None at init


def _weighted_scatter(x: torch.Tensor, means: torch.Tensor, resp: torch.Tensor,
                      covariance_type: str) -> torch.Tensor:
    """sum_i r_ik (x_i - mu_k)(x_i - mu_k)^T [K, d, d] (or its diagonal [K, d]).

    Centred on each mu_k rather than E[x x^T] - mu mu^T, which cancels catastrophically when a
    feature's spread is small against its mean. One BLAS product per component: measured on
    digits (K=40), a batched [K, n, d] version was 3-10x slower (memory-bound temporaries).
    """
    if covariance_type == "full":
        out = torch.empty(means.shape[0], x.shape[1], x.shape[1], dtype=x.dtype)
        for k in range(means.shape[0]):
            diff = x - means[k]
            out[k] = (resp[:, k].unsqueeze(1) * diff).T @ diff
        return out
    return torch.stack([resp[:, k] @ (x - means[k]).square() for k in range(means.shape[0])])


def _m_step(x: torch.Tensor, resp: torch.Tensor, covariance_type: str, reg_covar: float,
            collapse: _Collapse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Weighted moments from responsibilities ``resp`` [n, K]; returns (weights, means, covs, reseeds).

    A component with N_k < MIN_COMPONENT_ROWS has collapsed (its moments divide by nearly
    zero). The first time, it is reseeded deterministically at the worst-explained row (lowest
    ``row_fit``; one distinct row per component) with the whole data's covariance and weight
    1/K, so EM can put it to use elsewhere. If it collapses again, the data has no use for it:
    it is frozen at its previous mean and covariance with its (tiny, floored) weight, which is
    what lets EM converge on data with fewer clusters than components. Never a NaN either way.
    """
    n, d = x.shape
    K = resp.shape[1]
    nk = resp.sum(dim=0)
    means = (resp.T @ x) / nk.clamp(min=_TINY).unsqueeze(1)  # |numerator| <= N_k max|x|: finite
    covs = _weighted_scatter(x, means, resp, covariance_type)
    covs = covs / nk.clamp(min=_TINY).reshape(K, *[1] * (covs.dim() - 1))
    if covariance_type == "full":
        covs.diagonal(dim1=1, dim2=2).add_(reg_covar)
    else:
        covs = covs + reg_covar
    collapsed = nk < MIN_COMPONENT_ROWS
    reseed = torch.nonzero(collapsed & collapse.reseedable).flatten()
    if len(reseed):
        worst = torch.argsort(collapse.row_fit, stable=True)[: len(reseed)]
        means[reseed] = x[worst]
        covs[reseed] = collapse.fallback_cov
        nk[reseed] = n / K
        collapse.reseedable[reseed] = False
    freeze = torch.nonzero(collapsed & ~collapse.reseedable).flatten()
    freeze = freeze[~torch.isin(freeze, reseed)]
    if len(freeze):
        prev_means, prev_covs = collapse.previous
        means[freeze], covs[freeze] = prev_means[freeze], prev_covs[freeze]
        nk[freeze] = nk[freeze].clamp(min=_TINY)
    return nk / nk.sum(), means, covs, len(reseed)


def _global_covariance(x: torch.Tensor, covariance_type: str, reg_covar: float) -> torch.Tensor:
    centred = x - x.mean(dim=0)
    if covariance_type == "full":
        return centred.T @ centred / x.shape[0] + reg_covar * torch.eye(x.shape[1], dtype=x.dtype)
    return centred.square().mean(dim=0) + reg_covar


def _em(x: torch.Tensor, K: int, covariance_type: str, reg_covar: float, tol: float,
        max_iter: int, rng: np.random.Generator) -> _EMResult:
    """One EM run from a k-means++ start; ``lower_bounds[t]`` is the mean log-likelihood of the
    parameters after iteration t + 1 (an M-step followed by the E-step that scores it)."""
    n = x.shape[0]
    labels, sq_dist = _lloyd(x, _kmeans_plus_plus(x, K, rng))
    resp = torch.zeros(n, K, dtype=x.dtype)
    resp[torch.arange(n), labels] = 1.0
    collapse = _Collapse(-sq_dist, _global_covariance(x, covariance_type, reg_covar),
                         torch.ones(K, dtype=torch.bool), None)
    weights, means, covs, reseeds = _m_step(x, resp, covariance_type, reg_covar, collapse)
    core = make_core(weights, means, covs, covariance_type)
    log_joint = core.log_joint(x)
    log_px = finite_log_sum_exp(log_joint)
    previous = float(log_px.mean())
    lower_bounds, converged = [], False
    for _ in range(max_iter):
        resp = torch.exp(log_joint - log_px.unsqueeze(1))             # E-step
        collapse.row_fit, collapse.previous = log_px, (means, covs)
        weights, means, covs, r = _m_step(x, resp, covariance_type, reg_covar, collapse)
        reseeds += r
        core = make_core(weights, means, covs, covariance_type)       # M-step done
        log_joint = core.log_joint(x)
        log_px = finite_log_sum_exp(log_joint)
        current = float(log_px.mean())
        lower_bounds.append(current)
        if r == 0 and abs(current - previous) < tol:
            converged = True
            break
        previous = current
    return _EMResult(core, weights, means, covs, lower_bounds, converged, len(lower_bounds), reseeds)


def _n_parameters(K: int, d: int, covariance_type: str) -> int:
    cov = K * d * (d + 1) // 2 if covariance_type == "full" else K * d
    return (K - 1) + K * d + cov


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class GaussianMixtureDensity(DensityEstimator):
    """Gaussian mixture by EM, with the number of components and covariance type chosen on data.

    Parameters
    ----------
    n_components : int >= 1 or "auto", default "auto"
        K, or "auto" to choose it among ``candidate_components`` by ``selection``.
    covariance_type : "full", "diag" or "auto", default "auto"
        Full covariances model correlated features; diagonal ones need far fewer rows per
        component (d instead of d(d+1)/2 numbers). "auto" lets ``selection`` choose.
    tol : float >= 0, default 1e-4
        EM stops when the mean log-likelihood per row changes by less than this.
    max_iter : int >= 1, default 200
        EM iterations per run.
    n_init : int >= 1, default 3
        EM runs from different k-means++ starts; the one with the highest likelihood is kept
        (EM only finds a local maximum).
    reg_covar : float >= 0, default 1e-6
        Added to every covariance diagonal, so a component on a flat patch of data (digits have
        near-constant border pixels) stays invertible. 0 gives pure maximum likelihood.
    init : "kmeans++", default "kmeans++"
        k-means++ seeding, a few Lloyd iterations, then hard responsibilities for the first M-step.
    random_state : int, default 0
        Seeds every random choice (numpy Generators); the same seed gives the same fit.
    selection : "validation" or "bic", default "validation"
        "validation" fits each candidate on 80% of the rows (a seeded split), picks the highest
        held-out mean log-likelihood, then refits the winner on all rows; "bic" fits each on all
        rows and picks the lowest BIC = -2 log L + p log n.
    candidate_components : sequence of int, default (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50)
        K values tried when ``n_components="auto"``; those above half the fitted rows are dropped.
        The list reaches 50 because on digits (D1) the held-out likelihood of diagonal mixtures
        still rises at 30 and peaks near 40.
    verbose : bool, default False
        Show a progress bar over candidates and restarts.

    Attributes (after fit)
    ----------------------
    weights_ [K], means_ [K, d], covariances_ ([K, d, d] full or [K, d] diag, reg_covar included),
    n_components_, covariance_type_, chosen_ (both, as a dict), selection_scores_ (one dict per
    candidate: n_components, covariance_type, score — held-out mean log-likelihood, or BIC),
    lower_bounds_ (mean log-likelihood after each EM iteration of the final fit), converged_,
    n_iter_, n_reseeds_ (collapsed components reseeded in the final fit; each at most once).
    """

    family = "gmm"

    def __init__(self, n_components: int | str = "auto", covariance_type: str = "auto",
                 tol: float = 1e-4, max_iter: int = 200, n_init: int = 3, reg_covar: float = 1e-6,
                 init: str = "kmeans++", random_state: int = 0, selection: str = "validation",
                 candidate_components: Sequence[int] = DEFAULT_CANDIDATES, verbose: bool = False):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.reg_covar = reg_covar
        self.init = init
        self.random_state = random_state
        self.selection = selection
        self.candidate_components = candidate_components
        self.verbose = verbose

    # ---- parameters ----------------------------------------------------------------------
    def _validate_params(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if not (self.n_components == "auto" or (_is_int(self.n_components) and self.n_components >= 1)):
            raise ValueError(f"n_components must be an int >= 1 or 'auto', got {self.n_components!r}")
        if self.covariance_type not in (*COVARIANCE_TYPES, "auto"):
            raise ValueError(f"covariance_type must be one of 'full', 'diag', 'auto', got {self.covariance_type!r}")
        if not (isinstance(self.tol, (int, float)) and not isinstance(self.tol, bool) and self.tol >= 0):
            raise ValueError(f"tol must be a float >= 0, got {self.tol!r}")
        if not (_is_int(self.max_iter) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be an int >= 1, got {self.max_iter!r}")
        if not (_is_int(self.n_init) and self.n_init >= 1):
            raise ValueError(f"n_init must be an int >= 1, got {self.n_init!r}")
        if not (isinstance(self.reg_covar, (int, float)) and not isinstance(self.reg_covar, bool)
                and math.isfinite(self.reg_covar) and self.reg_covar >= 0):
            raise ValueError(f"reg_covar must be a float >= 0, got {self.reg_covar!r}")
        if self.init != "kmeans++":
            raise ValueError(f"init must be 'kmeans++', got {self.init!r}")
        if not _is_int(self.random_state) or self.random_state < 0:
            raise ValueError(f"random_state must be an int >= 0, got {self.random_state!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of 'validation', 'bic', got {self.selection!r}")
        candidates = self.candidate_components
        if (isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__") or len(candidates) == 0
                or not all(_is_int(k) and k >= 1 for k in candidates)):
            raise ValueError(f"candidate_components must be a non-empty sequence of ints >= 1, got {candidates!r}")
        if not isinstance(self.verbose, (bool, np.bool_)):
            raise ValueError(f"verbose must be True or False, got {self.verbose!r}")
        if n < 2:
            raise ValueError(f"a Gaussian mixture needs at least 2 rows, got {n}")
        if _is_int(self.n_components) and self.n_components > n:
            raise ValueError(f"n_components must be <= the number of rows ({n}), got {self.n_components}")
        if len(self._candidates(n)) > 1 and self.selection == "validation" and n < 5:
            raise ValueError(f"selection='validation' needs at least 5 rows to hold some out, got {n}: "
                             "fix n_components and covariance_type, or use selection='bic'")

    def get_params(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "covariance_type": self.covariance_type,
                "tol": self.tol, "max_iter": self.max_iter, "n_init": self.n_init,
                "reg_covar": self.reg_covar, "init": self.init, "random_state": self.random_state,
                "selection": self.selection, "candidate_components": list(self.candidate_components),
                "verbose": self.verbose}

    def fitted_params(self) -> dict[str, Any]:
        """The constructor parameters with "auto" replaced by the chosen K and covariance type."""
        self._check_fitted()
        return {**self.get_params(), "n_components": self.n_components_,
                "covariance_type": self.covariance_type_}

    # ---- fitting -------------------------------------------------------------------------
    def _candidates(self, n_rows: int) -> list[tuple[int, str]]:
        """(K, covariance type) pairs to try; "auto" K keeps candidates <= half the rows."""
        types = COVARIANCE_TYPES if self.covariance_type == "auto" else (self.covariance_type,)
        if self.n_components == "auto":
            cap = max(1, n_rows // 2)
            ks = sorted({int(k) for k in self.candidate_components if k <= cap}) or [1]
        else:
            ks = [int(self.n_components)]
        return [(k, t) for t in types for k in ks]

    def _rng(self, *stream: int) -> np.random.Generator:
        """An independent generator per (purpose, candidate, restart): the result of one
        candidate never depends on which others were tried."""
        return np.random.default_rng(np.random.SeedSequence([int(self.random_state), *stream]))

    def _best_of(self, x: torch.Tensor, K: int, covariance_type: str, stream: tuple[int, ...],
                 progress: tqdm) -> _EMResult:
        """``n_init`` EM runs; the one with the highest final mean log-likelihood."""
        best = None
        for restart in range(self.n_init):
            progress.set_postfix_str(f"K={K} {covariance_type} run {restart + 1}/{self.n_init}")
            result = _em(x, K, covariance_type, float(self.reg_covar), float(self.tol),
                         int(self.max_iter), self._rng(*stream, restart))
            progress.update(1)
            if best is None or result.lower_bounds[-1] > best.lower_bounds[-1]:
                best = result
        return best

    def _fit(self, x: torch.Tensor) -> nn.Module:
        n, d = x.shape
        with capped_threads(x.numel()), torch.no_grad():
            candidates = self._candidates(n)
            searching = len(candidates) > 1
            fits_needed = (len(candidates) + (self.selection == "validation")) if searching else 1
            with tqdm(total=fits_needed * self.n_init, desc="gmm", disable=not self.verbose,
                      leave=False) as progress:
                self.selection_scores_: list[dict[str, Any]] = []
                if not searching:
                    best = self._best_of(x, *candidates[0], (3, *self._key(candidates[0])), progress)
                elif self.selection == "validation":
                    best = self._select_on_validation(x, candidates, progress)
                else:
                    best = self._select_by_bic(x, candidates, progress)
        self.n_components_, self.covariance_type_ = best.means.shape[0], best.core.covariance_type
        self.chosen_ = {"n_components": self.n_components_, "covariance_type": self.covariance_type_}
        self.weights_, self.means_, self.covariances_ = best.weights, best.means, best.covariances
        self.lower_bounds_, self.converged_, self.n_iter_ = best.lower_bounds, best.converged, best.n_iter
        self.n_reseeds_ = best.n_reseeds
        if not self.converged_:
            warnings.warn(f"EM did not converge within max_iter={self.max_iter} iterations (tol={self.tol}); "
                          "increase max_iter or tol", RuntimeWarning, stacklevel=3)
        return best.core

    @staticmethod
    def _key(candidate: tuple[int, str]) -> tuple[int, int]:
        return candidate[0], COVARIANCE_TYPES.index(candidate[1])

    def _select_on_validation(self, x: torch.Tensor, candidates: list[tuple[int, str]],
                              progress: tqdm) -> _EMResult:
        n = x.shape[0]
        order = torch.as_tensor(self._rng(1).permutation(n))
        n_val = max(1, round(VALIDATION_FRACTION * n))
        x_val, x_fit = x[order[:n_val]], x[order[n_val:]]
        scores = []
        for candidate in candidates:
            try:
                fitted = self._best_of(x_fit, *candidate, (2, *self._key(candidate)), progress)
                score = float(fitted.core.log_prob(x_val).mean())
            except SingularCovarianceError:  # e.g. reg_covar=0 and too few rows for full covariances
                score = -math.inf
            scores.append(score)
            self.selection_scores_.append({"n_components": candidate[0], "covariance_type": candidate[1],
                                           "score": score, "metric": "validation_log_likelihood"})
        if all(s == -math.inf for s in scores):
            raise SingularCovarianceError("every candidate had a singular covariance: set reg_covar > 0")
        winner = candidates[int(np.argmax(scores))]
        return self._best_of(x, *winner, (3, *self._key(winner)), progress)

    def _select_by_bic(self, x: torch.Tensor, candidates: list[tuple[int, str]],
                       progress: tqdm) -> _EMResult:
        n, d = x.shape
        best, best_bic = None, math.inf
        for candidate in candidates:
            try:
                fitted = self._best_of(x, *candidate, (3, *self._key(candidate)), progress)
                bic = -2.0 * n * fitted.lower_bounds[-1] + _n_parameters(candidate[0], d, candidate[1]) * math.log(n)
            except SingularCovarianceError:
                fitted, bic = None, math.inf
            self.selection_scores_.append({"n_components": candidate[0], "covariance_type": candidate[1],
                                           "score": bic, "metric": "bic"})
            if bic < best_bic:
                best, best_bic = fitted, bic
        if best is None:
            raise SingularCovarianceError("every candidate had a singular covariance: set reg_covar > 0")
        return best
