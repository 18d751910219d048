"""The estimator interface every family implements.

In the spirit of scikit-learn's density estimators (``fit``, ``score_samples``, ``sample``):
hyper-parameters are constructor arguments, validated in ``fit`` with messages naming the
allowed values; fitted state ends with an underscore.

One piece of maths per family, used three ways. ``fit`` produces a *fitted core*: an
``nn.Module`` holding the parameters as buffers, with

* ``log_prob(x)`` — float64 [N, d] -> float64 [N] log-density in nats, and, where the family
  can sample,
* ``noise_specs()`` — the noise tensors one sample needs (``TensorSpec`` with the batch axis
  -1), and ``sample_from_noise(*noise)`` — a deterministic map from those tensors to samples.

``log_prob`` and ``sample`` below call the core directly; ``export_graphs`` wraps the same core
in the ``score`` and ``sample`` graphs that the exporter turns into ONNX. So the served graph
and the torch estimator cannot disagree except by the exporter's numerics, which the export
check measures.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from serving.repository.manifest import TensorSpec
from serving.repository.noise import draw_noise


@dataclass
class ExportGraph:
    """A graph to export: the torch module plus its manifest input/output specs."""

    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ScoreGraph(nn.Module):
    """x float32 [N, d] -> log_prob float32 [N]; computes in float64 inside."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core.log_prob(x.to(torch.float64)).to(torch.float32)


class SampleGraph(nn.Module):
    """Noise tensors -> samples float32 [N, *row_shape]."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, *noise: torch.Tensor) -> torch.Tensor:
        return self.core.sample_from_noise(*noise).to(torch.float32)


def as_float64(X: Any, name: str = "X") -> torch.Tensor:
    """Validate a 2-D array of finite rows and return it as a float64 tensor."""
    array = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


class DensityEstimator(abc.ABC):
    """Base class: subclasses implement ``_fit`` returning the fitted core."""

    family: ClassVar[str]

    core_: nn.Module
    n_features_in_: int

    def fit(self, X: Any, y: Any = None) -> "DensityEstimator":
        """Fit on rows ``X`` [n, d]; ``y`` is ignored by unsupervised families."""
        x = as_float64(X)
        self._validate_params(x)
        self.n_features_in_ = x.shape[1]
        self.core_ = self._fit(x).eval()
        return self

    @abc.abstractmethod
    def _validate_params(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the parameter and its allowed values."""

    @abc.abstractmethod
    def _fit(self, x: torch.Tensor) -> nn.Module:
        """Return the fitted core for float64 rows ``x``."""

    @abc.abstractmethod
    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as given to the constructor."""

    def fitted_params(self) -> dict[str, Any]:
        """Hyper-parameters with every search ("cv", "auto") replaced by what ``fit`` chose.

        ``type(self)(**self.fitted_params())`` refits the same model without searching again:
        the cross-fitted threshold calibration relies on it.
        """
        return self.get_params()

    # ---- derived behaviour -------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "core_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit first")

    @property
    def can_sample(self) -> bool:
        self._check_fitted()
        return hasattr(self.core_, "sample_from_noise")

    @torch.no_grad()
    def log_prob(self, X: Any) -> torch.Tensor:
        """float64 [N] log-density in nats of each row of ``X``."""
        self._check_fitted()
        x = as_float64(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, the model was fitted on {self.n_features_in_}")
        return self.core_.log_prob(x)

    def score_samples(self, X: Any) -> np.ndarray:
        """scikit-learn spelling of ``log_prob``, as a NumPy array."""
        return self.log_prob(X).numpy()

    def score(self, X: Any) -> float:
        """Mean log-likelihood per row (scikit-learn's ``score`` is the sum; the mean reads better)."""
        return float(self.log_prob(X).mean())

    def noise_specs(self) -> list[TensorSpec]:
        self._check_fitted()
        if not self.can_sample:
            raise NotImplementedError(f"{type(self).__name__} cannot sample")
        return self.core_.noise_specs()

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` samples, float64, from noise drawn exactly as the server draws it for ``seed``."""
        noise = draw_noise(self.noise_specs(), n, seed)
        tensors = [torch.from_numpy(noise[s.name]) for s in self.noise_specs()]
        return self.core_.sample_from_noise(*tensors)

    def export_graphs(self) -> list[ExportGraph]:
        """The graphs to publish: always ``score``; ``sample`` where the family samples."""
        self._check_fitted()
        d = self.n_features_in_
        graphs = [ExportGraph("score", ScoreGraph(self.core_).eval(),
                              [TensorSpec(name="x", shape=[-1, d])],
                              [TensorSpec(name="log_prob", shape=[-1])])]
        if self.can_sample:
            graphs.append(ExportGraph("sample", SampleGraph(self.core_).eval(), self.noise_specs(),
                                      [TensorSpec(name="samples", shape=[-1, d])]))
        return graphs
