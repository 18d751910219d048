"""From a dataset name to a published model: fit, measure, calibrate, export, publish.

This is what ``genserve train`` and the demo run; it reads top to bottom in one screen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.repository.manifest import Manifest
from training import datasets, registry
from training.calibration import calibrate
from training.datasets import Dataset
from training.publish import publish


def mean_log_likelihood(values: np.ndarray) -> float:
    """Mean log-likelihood; -inf if any row has zero density (reported, never hidden)."""
    return float(np.mean(values))


def train_and_publish(family: str, data: str | Dataset, repo: Path, name: str,
                      params: dict[str, Any] | None = None, contamination: float = 0.01,
                      calibration_folds: int = 5, log: Callable[[str], None] = print) -> tuple[Path, Manifest]:
    spec = registry.get(family)
    dataset = datasets.load(data) if isinstance(data, str) else data
    log(f"[{name}] {family} on {dataset.name}: {len(dataset.X_train)} training rows, {dataset.n_features} features")

    estimator = spec.create(**(params or {}))
    started = time.perf_counter()
    estimator.fit(dataset.X_train)
    fit_seconds = time.perf_counter() - started
    log(f"[{name}] fitted in {fit_seconds:.1f} s with {estimator.fitted_params()}")

    metrics = {"fit_seconds": fit_seconds,
               "train_log_likelihood": mean_log_likelihood(estimator.score_samples(dataset.X_train)),
               "test_log_likelihood": mean_log_likelihood(estimator.score_samples(dataset.X_test))}
    log(f"[{name}] test log-likelihood {metrics['test_log_likelihood']:.2f} nats/row")

    chosen = estimator.fitted_params()
    calibration = calibrate(lambda: spec.create(**chosen), dataset.X_train, contamination, calibration_folds)
    log(f"[{name}] anomaly threshold {calibration.threshold:.3f} at {contamination:.1%} contamination "
        f"({calibration.method})")

    path, manifest = publish(estimator, repo, name, dataset, calibration=calibration, metrics=metrics,
                             description=spec.summary)
    log(f"[{name}] published {path} (export check {max(manifest.export_check.max_rel_diff.values()):.2g})")
    return path, manifest
