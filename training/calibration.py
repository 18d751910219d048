"""Calibrating the anomaly threshold on rows the model has not seen.

The anomaly score is -log p(x). Its threshold at contamination c is the (1 - c) quantile of the
scores of *normal* rows the model did not train on. Scoring the training rows themselves would
be wrong: a kernel density scores its own points far too high (each sees itself at distance 0),
so the threshold would sit too low and flag too many normal rows.

We therefore *cross-fit*: split the training rows into K folds, fit the family with the
hyper-parameters already chosen on each K-1 folds, score the held-out fold, and pool the K
out-of-fold score sets. Every training row gets a score from a model that never saw it, and no
row is withheld from the final model. The out-of-fold models see (K-1)/K of the data, so their
scores are if anything a little higher than the final model's on new rows: the threshold errs
towards fewer false alarms.

The manifest keeps a table of 1001 quantiles so that a request can ask for another
contamination rate without refitting.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from serving.repository.manifest import AnomalyCalibration
from training.estimators.base import DensityEstimator

QUANTILE_LEVELS = 1001
# +inf scores (zero density: outside a histogram's grid) stand in the table as the largest float.
_FINITE_MAX = float(np.finfo(np.float64).max)


def cross_fitted_scores(make_estimator: Callable[[], DensityEstimator], X: np.ndarray,
                        folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold anomaly scores (-log p) for every row of ``X``."""
    if not 2 <= folds <= len(X):
        raise ValueError(f"folds must be between 2 and the number of rows ({len(X)}), got {folds}")
    order = np.random.default_rng(seed).permutation(len(X))
    scores = np.empty(len(X))
    for held_out in np.array_split(order, folds):
        keep = np.setdiff1d(order, held_out)
        model = make_estimator().fit(X[keep])
        scores[held_out] = -model.score_samples(X[held_out])
    return scores


def calibration_from_scores(scores: np.ndarray, contamination: float, method: str) -> AnomalyCalibration:
    """The threshold at ``contamination`` and the quantile table of held-out anomaly scores."""
    if not 0.0 < contamination < 1.0:
        raise ValueError(f"contamination must be in (0, 1), got {contamination}")
    finite = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=_FINITE_MAX, posinf=_FINITE_MAX,
                           neginf=-_FINITE_MAX)
    quantiles = np.quantile(finite, np.linspace(0.0, 1.0, QUANTILE_LEVELS))
    table = AnomalyCalibration(threshold=0.0, contamination=contamination, method=method,
                               n_calibration=len(finite), quantiles=[float(q) for q in quantiles])
    return table.model_copy(update={"threshold": table.threshold_at(contamination)})


def calibrate(make_estimator: Callable[[], DensityEstimator], X: np.ndarray,
              contamination: float = 0.01, folds: int = 5, seed: int = 0) -> AnomalyCalibration:
    scores = cross_fitted_scores(make_estimator, X, folds, seed)
    return calibration_from_scores(scores, contamination, f"{folds}-fold cross-fitted -log p quantile")
