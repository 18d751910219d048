"""From a dataset name to a published model: fit, measure, calibrate, export, publish.

This is what ``genserve train`` and the demo run; it reads top to bottom in one screen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from serving.repository.manifest import Manifest
from training import datasets, registry
from training.calibration import calibration_from_scores
from training.datasets import Dataset
from training.publish import publish


def train_and_publish(family: str, data: str | Dataset, repo: Path, name: str,
                      params: dict[str, Any] | None = None, contamination: float = 0.01,
                      calibration_folds: int = 5, log: Callable[[str], None] = print) -> tuple[Path, Manifest]:
    spec = registry.get(family)
    dataset = datasets.load(data) if isinstance(data, str) else data
    log(f"[{name}] {family} on {dataset.name}: {len(dataset.X_train)} training rows of shape "
        f"{list(dataset.X_train.shape[1:])}")

    estimator = spec.create(**(params or {}))
    started = time.perf_counter()
    estimator.fit_dataset(dataset)
    fit_seconds = time.perf_counter() - started
    log(f"[{name}] fitted in {fit_seconds:.1f} s with {estimator.fitted_params()}")

    metrics = {"fit_seconds": fit_seconds, **estimator.evaluate(dataset)}
    log(f"[{name}] " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "fit_seconds"))

    calibration = None
    scores = estimator.calibration_scores(dataset, calibration_folds)
    if scores is not None:
        calibration = calibration_from_scores(scores, contamination, estimator.calibration_method(calibration_folds))
        log(f"[{name}] anomaly threshold {calibration.threshold:.3f} at {contamination:.1%} contamination "
            f"({calibration.method})")

    path, manifest = publish(estimator, repo, name, dataset, calibration=calibration, metrics=metrics,
                             description=spec.summary)
    log(f"[{name}] published {path} (export check {max(manifest.export_check.max_rel_diff.values()):.2g})")
    return path, manifest
