"""Multivariate Gaussian fitted by maximum likelihood.

The MLE is the sample mean and the *biased* sample covariance (divide by n, not n - 1):

    mu = (1/n) sum_i x_i,    Sigma = (1/n) sum_i (x_i - mu)(x_i - mu)^T

    log p(x) = -1/2 [ d log(2 pi) + log det Sigma + (x - mu)^T Sigma^{-1} (x - mu) ]

Scoring uses the Cholesky factor Sigma = L L^T: log det Sigma = 2 sum log diag(L), and the
Mahalanobis term is ||L^{-1}(x - mu)||^2, computed as (x - mu) @ P with P = L^{-T}, so the
exported graph is one matrix product. Sampling is x = mu + z L^T with z ~ N(0, I).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from training.estimators.base import DensityEstimator


class GaussianCore(nn.Module):
    def __init__(self, mean: torch.Tensor, chol: torch.Tensor):
        super().__init__()
        d = mean.shape[0]
        self.register_buffer("mean", mean)
        self.register_buffer("chol", chol)
        self.register_buffer("precision_chol", torch.linalg.inv(chol).T.contiguous())
        log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
        self.register_buffer("log_norm", -0.5 * (d * math.log(2 * math.pi) + log_det))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) @ self.precision_chol
        return self.log_norm - 0.5 * (z * z).sum(dim=1)

    def noise_specs(self) -> list[TensorSpec]:
        return [TensorSpec(name="z", shape=[-1, self.mean.shape[0]], noise="normal")]

    def sample_from_noise(self, z: torch.Tensor) -> torch.Tensor:
        return self.mean + z.to(torch.float64) @ self.chol.T


class GaussianDensity(DensityEstimator):
    """Full-covariance Gaussian by MLE.

    Parameters
    ----------
    reg_covar : float, default 1e-6
        Added to the diagonal of the covariance so that constant features do not make it
        singular (scikit-learn's GaussianMixture uses the same default). 0 gives the pure MLE.
    """

    family = "gaussian"

    def __init__(self, reg_covar: float = 1e-6):
        self.reg_covar = reg_covar

    def _validate_params(self, x: torch.Tensor) -> None:
        if not (isinstance(self.reg_covar, (int, float)) and self.reg_covar >= 0):
            raise ValueError(f"reg_covar must be a float >= 0, got {self.reg_covar!r}")
        if x.shape[0] < 2:
            raise ValueError(f"a Gaussian needs at least 2 rows to estimate a covariance, got {x.shape[0]}")

    def _fit(self, x: torch.Tensor) -> nn.Module:
        mean = x.mean(dim=0)
        centred = x - mean
        cov = centred.T @ centred / x.shape[0]
        self.covariance_ = cov
        cov = cov + self.reg_covar * torch.eye(x.shape[1], dtype=x.dtype)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise ValueError("the covariance is singular (constant or collinear features): "
                             "set reg_covar > 0, e.g. 1e-6")
        self.mean_ = mean
        return GaussianCore(mean, chol)

    def get_params(self) -> dict[str, Any]:
        return {"reg_covar": self.reg_covar}
