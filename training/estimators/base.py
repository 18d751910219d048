"""The estimator interfaces every family implements.

``GenerativeEstimator`` is what the pipeline, the exporter and the registry rely on: fit on a
dataset, graphs to export, and optional hooks (figures, anomaly calibration scores, pictures).
Neural and latent-variable families (VAE, GAN, CycleGAN, FVBN, HMM) implement it directly.
``DensityEstimator`` below is the classical families' specialisation with an exact log-density.

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
check measures. One licensed difference: a core may offer ``served_log_prob(x)``, the same
log-density with its final log-sum-exp taking float32 exponentials (``logsumexp.py``: well
within the float32 output's rounding, and the served graph's slowest node otherwise), which the
score graph uses instead of ``log_prob``.
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
    """x float32 [N, d] -> log_prob float32 [N]; computes in float64 inside (the core's
    ``served_log_prob`` where it has one, else its ``log_prob``)."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = getattr(self.core, "served_log_prob", self.core.log_prob)
        return score(x.to(torch.float64)).to(torch.float32)


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


class GenerativeEstimator(abc.ABC):
    """What every family offers the pipeline; hooks have defaults a family overrides as needed."""

    family: ClassVar[str]
    # Conditional families set this to the number of classes after fit; ``fit_dataset`` then
    # passes the labels, and the sample graph takes a ``label`` input.
    num_classes: int | None = None
    # What a user must know before trusting the model's numbers; printed in the model card.
    card_limits: ClassVar[str] = ""
    # Per-epoch training log, e.g. [{"epoch": 1, "loss": 2.3, "val_loss": 2.1}], drawn as training.png.
    history_: list[dict[str, float]]

    @abc.abstractmethod
    def fit(self, X: Any, y: Any = None) -> "GenerativeEstimator":
        ...

    @abc.abstractmethod
    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as given to the constructor."""

    def fitted_params(self) -> dict[str, Any]:
        """Hyper-parameters with every search ("cv", "auto") replaced by what ``fit`` chose.

        ``type(self)(**self.fitted_params())`` refits the same model without searching again:
        the cross-fitted threshold calibration relies on it.
        """
        return self.get_params()

    @abc.abstractmethod
    def export_graphs(self) -> list[ExportGraph]:
        """The graphs to publish, named from {score, sample, anomaly, encode, reconstruct,
        translate_a2b, translate_b2a}; the manifest's capabilities follow from the names."""

    # ---- hooks the pipeline calls ------------------------------------------------------
    def fit_dataset(self, data: Any) -> "GenerativeEstimator":
        """Fit on a ``training.datasets.Dataset``: training rows, and labels if conditional."""
        return self.fit(data.X_train, data.y_train if self.uses_labels else None)

    @property
    def uses_labels(self) -> bool:
        return bool(getattr(self, "conditional", False))

    def input_shape(self, data: Any) -> list[int]:
        """One row's shape for the manifest; sequence families return [-1, D]."""
        return list(data.X_train.shape[1:])

    def evaluate(self, data: Any) -> dict[str, float]:
        """Figures for the manifest and card, measured on the dataset's test part."""
        return {}

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray | None:
        """Anomaly scores of normal rows the model did not train on, or None if it has none."""
        return None

    def calibration_method(self, folds: int) -> str:
        return "held-out anomaly score quantile"

    def check_feeds(self, graph: ExportGraph, data: Any, rows: int) -> dict[str, np.ndarray]:
        """Inputs for the export check: held-out rows, held-out labels, noise as the server draws it."""
        feeds = draw_noise(graph.inputs, rows, seed=0)
        for spec in graph.inputs:
            if spec.noise is not None:
                continue
            if spec.name == "label":
                feeds["label"] = np.asarray(data.y_test[:rows], dtype=np.int64)
            else:
                feeds[spec.name] = np.ascontiguousarray(data.X_test[:rows], dtype=np.float32)
        return feeds

    def save_pictures(self, data: Any, folder: Any, title: str) -> None:
        """samples.png (and training.png when there is a training log) for the model card."""
        from training.plots import save_model_picture, save_training_curve

        save_model_picture(self, data, folder / "samples.png", title)
        if getattr(self, "history_", None):
            save_training_curve(self.history_, folder / "training.png", title)


class DensityEstimator(GenerativeEstimator):
    """Classical families: subclasses implement ``_fit`` returning the fitted core."""

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

    def evaluate(self, data: Any) -> dict[str, float]:
        """Mean log-likelihood per row on the training and test parts (-inf if a row has zero density)."""
        return {"train_log_likelihood": float(np.mean(self.score_samples(data.X_train))),
                "test_log_likelihood": float(np.mean(self.score_samples(data.X_test)))}

    def calibration_method(self, folds: int) -> str:
        return f"{folds}-fold cross-fitted -log p quantile"

    def calibration_scores(self, data: Any, folds: int) -> np.ndarray:
        """Cross-fitted -log p of every training row (see ``training.calibration``)."""
        from training.calibration import cross_fitted_scores

        chosen = self.fitted_params()
        return cross_fitted_scores(lambda: type(self)(**chosen), data.X_train, folds)

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
